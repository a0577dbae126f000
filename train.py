"""
Train a DeepLabV3 teacher, a baseline student, or a student distilled with FCKD, KD or CWD.

    python train.py                                                 # small student, synthetic set, CPU
    python train.py --dataset voc --model deeplabv3_resnet101 --pretrained-backbone resnet101.pth
    torchrun --nproc_per_node=8 train.py --dataset voc --pretrained-backbone resnet18.pth \
        --teacher-ckpt runs/voc_deeplabv3_resnet101/best.pt --kd fckd

One iteration-based loop. Each step: poly learning rate, SGD (momentum 0.9), loss
    CE(up(out), y) + 0.4 CE(up(aux), y) [+ distillation(student logits, teacher logits)]
where up() resizes the logits to the label size and the distillation term compares logits at
the nets' own resolution (losses.LOSSES: FCKD, KD or CWD from fckd.py). The teacher is frozen, in
eval mode, runs under no_grad and is never wrapped in DDP.

Launched by torchrun this is DDP (NCCL on GPUs, gloo on CPUs; --batch-size is global). run.py keeps
a run safe: OUT/last.pt is written every --save-every iterations, before each validation and on
SIGINT/SIGTERM; `--resume auto` continues from it exactly (weights, optimiser, LR, RNG states and
the position in the shuffled order); a folder that holds a run is written only by that run.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from data import DATASET_NAMES, DATASETS, IGNORE_INDEX, PartlyLabelled, build_dataset, listed_indices, synthetic_options
from losses import FLAGS, add_loss_flags, distillation, unused_flags
from models import MODEL_NAMES, build_model
from run import (FRESH_PROGRESS, Interrupted, StopRequest, agreed_stop, append_log, check_finite_model,
                 check_resumed_model, checkpoint_state, checkpoint_to_resume, claimed_out_folder, cut_log, decode_split,
                 input_fingerprints, last_good, load_state, model_from_checkpoint, next_batch, restartable_stream,
                 restore, run_cli, save_checkpoint, seed_everything, training_batches)
from utils import (all_reduce, autocast, check_num_classes, evaluate, is_main, memory_format, metrics_line,
                   progress_bar, resolve_amp, segmentation_metrics, setup_distributed, teardown_distributed, upsample,
                   use_fast_cuda_kernels)

MOMENTUM = 0.9
POLY_POWER = 0.9
AUX_WEIGHT = 0.4
MIN_CROP = 32  # pixels a side: at output stride 16 still 2 x 2 logits, which BatchNorm needs at batch 1
WIDTHS = (1 / 16, 4.0)  # below 1/16 the nets have layers of a single channel
PATH_FLAGS = ("data_root", "labelled_list", "pretrained_backbone", "teacher_ckpt", "out", "resume")

# (flag, rule, test) for the numbers parse_args checks; NaN fails every test
NUMBER_RULES = (
    ("lr", "a finite number > 0", lambda x: math.isfinite(x) and x > 0),
    ("weight_decay", "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0),
    ("tau_spatial", "a finite number > 0", lambda x: math.isfinite(x) and x > 0),
    ("tau_channel", "a finite number > 0", lambda x: math.isfinite(x) and x > 0),
    ("lambda_spatial", "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0),
    ("lambda_channel", "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0),
    ("fckd_threshold", "in [0, 1]", lambda x: 0 <= x <= 1),
    ("fckd_keep", "in (0, 1]", lambda x: 0 < x <= 1),
    ("fckd_gamma", "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0),
    ("fckd_temperature", "a finite number > 0", lambda x: math.isfinite(x) and x > 0),
    ("width", f"in [{WIDTHS[0]}, {WIDTHS[1]}]", lambda x: WIDTHS[0] <= x <= WIDTHS[1]),
    ("image_scale", "in (0, 1]", lambda x: x is None or 0 < x <= 1),
    ("iters", ">= 1", lambda x: x >= 1),
    ("batch_size", ">= 1", lambda x: x >= 1),
    ("unlabelled_batch_size", ">= 0", lambda x: x is None or x >= 0),
    ("val_every", ">= 1", lambda x: x >= 1),
    ("save_every", ">= 1", lambda x: x >= 1),
    ("log_every", ">= 1", lambda x: x >= 1),
    ("workers", ">= 0", lambda x: x >= 0),
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    per_dataset = "default: per dataset, see DATASETS in data.py"
    p.add_argument("--dataset", choices=DATASET_NAMES, default="synthetic", help="default: %(default)s")
    p.add_argument("--data-root", help=f"dataset folder; {per_dataset}")
    p.add_argument("--synthetic-length", type=int, help="images per split of the synthetic set (default: data.py's)")
    p.add_argument("--synthetic-size", type=int, help="side of the synthetic images in pixels (default: data.py's)")
    p.add_argument("--image-scale", type=float, help="real sets: resize every image by this factor in (0, 1] first; "
                   "validation scores against the full-resolution labels (default: 1)")
    p.add_argument("--labelled-list", metavar="FILE",
                   help="train on the training frames this file lists only (lines as in the dataset's own lists: "
                        "an image path or id first; IDD-Lite: sequence/frame; synthetic: the scene index)")
    p.add_argument("--unlabelled-batch-size", type=int,
                   help="with --labelled-list and a teacher: frames the list leaves out, added to each batch without "
                        "their labels, which feed the distillation loss only (global; default: --batch-size)")
    p.add_argument("--model", choices=MODEL_NAMES, default="deeplabv3_resnet18", help="default: %(default)s")
    p.add_argument("--width", type=float, help=f"width multiplier of the model; {per_dataset}")
    p.add_argument("--output-stride", type=int, choices=(8, 16), default=8, help="default: %(default)s")
    p.add_argument("--pretrained-backbone", help="torchvision ResNet state dict (ImageNet weights)")
    p.add_argument("--teacher-ckpt", help="checkpoint of a trained teacher: distil it into the student")
    add_loss_flags(p)
    p.add_argument("--iters", type=int, help=f"training iterations; {per_dataset}")
    p.add_argument("--batch-size", type=int, help=f"global batch size, split over the ranks; {per_dataset}")
    p.add_argument("--crop-size", type=int, nargs="+", metavar="SIZE", help=f"training crop, H or H W; {per_dataset}")
    p.add_argument("--lr", type=float, help=f"base learning rate; {per_dataset}")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="default: %(default)s")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), help="autocast dtype (default: bf16 on CUDA, off on CPU)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--out", help="output folder (default: runs/DATASET_MODEL[_KD]_sSEED)")
    p.add_argument("--resume", metavar="{PATH,auto}", help="continue from a checkpoint; auto: OUT/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run: its last.pt, best.pt and log.jsonl are deleted "
                        "once every input of the new run has been checked")
    p.add_argument("--val-every", type=int, help=f"validate every N iterations (and at the end); {per_dataset}")
    p.add_argument("--save-every", type=int, help=f"write OUT/last.pt every N iterations; {per_dataset}")
    p.add_argument("--log-every", type=int, default=20,
                   help="reduce and log the losses every N iterations (default: %(default)s)")
    p.add_argument("--workers", type=int, help=f"data loading processes per rank; {per_dataset}")
    return p


def given_flags(parser, argv):
    """The dests of the flags that `argv` sets (a flag left at its default is not given)."""
    actions = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in actions:
            action.default = default


def parse_args(argv=None):
    """The flags, with the dataset record's defaults (data.DATASETS) for those left unset; argparse's
    usage error (exit 2) for flags that do not go together, flags the run would not use, empty
    paths and numbers outside NUMBER_RULES."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.teacher_ckpt and not args.kd:
        args.kd = "fckd"
    refuse_idle_flags(p, args, given_flags(p, argv))
    for key, value in DATASETS[args.dataset].defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val_every is None:
        args.val_every = args.iters
    if args.crop_size is not None and len(args.crop_size) not in (1, 2):
        p.error(f"--crop-size takes H or H W, got {len(args.crop_size)} numbers")
    if args.crop_size is not None and len(args.crop_size) == 1:
        args.crop_size = args.crop_size * 2  # H -> H x H
    if args.crop_size is not None and min(args.crop_size) < MIN_CROP:
        p.error(f"--crop-size must be at least {MIN_CROP} pixels a side, got {' '.join(map(str, args.crop_size))}")
    if args.labelled_list and args.teacher_ckpt and args.unlabelled_batch_size is None:
        args.unlabelled_batch_size = args.batch_size
    for key, rule, test in NUMBER_RULES:
        if not test(getattr(args, key)):
            p.error(f"--{key.replace('_', '-')} must be {rule}, got {getattr(args, key)}")
    if args.out is None:  # one folder per seed, so that runs over seeds never share one
        args.out = os.path.join("runs", f"{args.dataset}_{args.model}" + (f"_{args.kd}" if args.kd else "")
                                + f"_s{args.seed}")
    return args


def refuse_idle_flags(p, args, given):
    """argparse's usage error for an empty path and for a flag that `given` sets but the run would
    not use: silently ignored, it would make the run look like something it is not."""
    for dest in PATH_FLAGS:
        if getattr(args, dest) == "":
            p.error(f"--{dest.replace('_', '-')} is empty: give a path, or leave the flag out")
    synthetic, distilled_few = args.dataset == "synthetic", bool(args.labelled_list and args.teacher_ckpt)
    for dest, unused, why in (
            ("synthetic_length", not synthetic, "it applies to --dataset synthetic only"),
            ("synthetic_size", not synthetic, "it applies to --dataset synthetic only"),
            ("image_scale", synthetic, "the synthetic set has --synthetic-size"),
            ("data_root", synthetic, "the synthetic set is generated"),
            ("unlabelled_batch_size", not distilled_few, "it adds frames without labels to a run with "
                                                         "--labelled-list and --teacher-ckpt")):
        if unused and dest in given:
            p.error(f"--{dest.replace('_', '-')} does nothing in this run ({why}): drop it")
    if args.kd and not args.teacher_ckpt:
        p.error(f"--kd {args.kd} needs a teacher: pass --teacher-ckpt PATH")
    if args.overwrite and args.resume:
        p.error("--overwrite starts afresh, --resume continues: pass one of them")
    idle_loss = sorted(FLAGS[dest][0] for dest in unused_flags(args.kd, vars(args)) & given)
    if idle_loss:
        run = "without a teacher" if args.kd is None else f"with --kd {args.kd}" + (
            f" and --fckd-condense {args.fckd_condense}, --fckd-gamma {args.fckd_gamma}" if args.kd == "fckd" else "")
        p.error(f"{' '.join(idle_loss)} {'does' if len(idle_loss) == 1 else 'do'} nothing in a run {run}: drop "
                f"{'it' if len(idle_loss) == 1 else 'them'}")


# -----------------------------------------------------------------------------
# the objective


def make_optimizer(model, lr, weight_decay, device):
    """SGD with momentum 0.9; on CUDA the fused kernel (one launch for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay, **fused)


def poly_lr(base_lr, iteration, iters, power=POLY_POWER):
    """lr = base_lr * (1 - iteration / iters) ** power, iteration counted from 0."""
    return base_lr * (1 - iteration / iters) ** power


def labelled_cross_entropy(logits, labels):
    """Cross-entropy averaged over the labelled pixels (label 255 ignored); 0, with a zero gradient,
    when no pixel is labelled (an all-void frame), where F.cross_entropy's mean is 0 / 0 = NaN.
    Otherwise bit for bit F.cross_entropy's mean: the same sum divided by the same count."""
    labelled = (labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.clamp(min=1)


def train_losses(model, images, labels, teacher=None, distill=None):
    """{"loss": total, "ce", "aux"[, "kd", diagnostics]} for one batch, all scalar tensors.

    loss = CE(up(out), y) + 0.4 CE(up(aux), y) [+ kd(out, teacher out)], CE over the labelled
    pixels (labelled_cross_entropy: 0 for a batch without any).
    """
    out = model(images)
    size = labels.shape[-2:]
    losses = {
        "ce": labelled_cross_entropy(upsample(out["out"], size), labels),
        "aux": AUX_WEIGHT * labelled_cross_entropy(upsample(out["aux"], size), labels),
    }
    if teacher is not None:
        # no_grad, not inference_mode: inference tensors could not be saved for the student's backward
        with torch.no_grad():
            teacher_logits = teacher(images)["out"]
        losses.update(distill(out["out"], teacher_logits))
    losses["loss"] = losses["ce"] + losses["aux"] + losses.get("kd", 0.0)
    return losses


# -----------------------------------------------------------------------------
# data, teacher, student


def training_data(args, rank, world_size, cuda):
    """(train_set, val_set, streams): this rank's share of the shuffled training batches as
    streams of (loader, sampler, batches_per_epoch), in an order a resumed run can pick up
    (run.restartable_stream); run.training_batches joins them. With --labelled-list only the
    listed frames are sampled as the labelled batch, and a distilled run draws a second stream of
    --unlabelled-batch-size unlisted frames (labels all-ignore) that feed the distillation loss
    alone: distillation adds frames and takes no label visits away. The real sets' val images are
    all decoded first, so that a bad file stops the run now and not at the first validation."""
    options = synthetic_options(args.dataset, args.synthetic_length, args.synthetic_size)
    image_scale = args.image_scale or 1.0
    train_set = build_dataset(args.dataset, args.data_root, "train", train=True, crop_size=args.crop_size,
                              image_scale=image_scale, **options)
    parts = [(train_set, f"{args.dataset} train split", args.batch_size, args.seed)]
    if args.labelled_list:
        labelled = listed_indices(train_set, args.labelled_list)
        parts = [(Subset(train_set, labelled), f"{args.dataset} labelled list {args.labelled_list}", args.batch_size,
                  args.seed)]
        if args.teacher_ckpt and args.unlabelled_batch_size:
            listed = set(labelled)
            unlabelled = Subset(PartlyLabelled(train_set, []), [i for i in range(len(train_set)) if i not in listed])
            # another seed: the two streams' samples would otherwise share their augmentations
            parts.append((unlabelled, "set of frames the labelled list leaves out", args.unlabelled_batch_size,
                          args.seed + 1))
    val_set = build_dataset(args.dataset, args.data_root, "val", train=False, image_scale=image_scale, **options)
    streams = [restartable_stream(sampled, what, batch_size, seed, rank, world_size, args.workers, cuda)
               for sampled, what, batch_size, seed in parts]
    if args.dataset != "synthetic":  # the synthetic scenes are generated, not read
        decode_split(val_set, args.workers, rank, world_size, f"{args.dataset} val")
    return train_set, val_set, streams


def seeded_student(args, num_classes, rank):
    """(model, model_options): the student, with the same initial weights on every rank; the RNG
    is then seeded per rank, so that the ranks draw different dropout masks."""
    seed_everything(args.seed)
    model_options = {"width": args.width, "output_stride": args.output_stride, "head_channels": None}
    model = build_model(args.model, num_classes, args.pretrained_backbone, **model_options)
    seed_everything(args.seed + rank)
    return model, model_options


def frozen_teacher(args, num_classes, device):
    """(teacher, distill) for --teacher-ckpt: the net and weights of its checkpoint, frozen, in
    eval mode, on `device`, and the --kd loss; (None, None) without a teacher."""
    if not args.teacher_ckpt:
        return None, None
    teacher, checkpoint = model_from_checkpoint(args.teacher_ckpt)
    check_num_classes(checkpoint, f"teacher checkpoint {args.teacher_ckpt}", args.dataset, num_classes)
    teacher.requires_grad_(False).eval().to(device, memory_format=memory_format(device))
    return teacher, distillation(args.kd, vars(args))


def prepare(args, rank, world_size, device):
    """Everything a run needs before its first step, every input checked: the checkpoint to resume
    (or none), the data, the teacher and the loss, the student and its optimiser, and the run's
    progress so far."""
    for flag, size in (("--batch-size", args.batch_size), ("--unlabelled-batch-size", args.unlabelled_batch_size or 0)):
        if size % world_size:
            raise ValueError(f"{flag} {size} is not divisible by the {world_size} ranks")
    cuda = device.type == "cuda"
    if cuda:
        use_fast_cuda_kernels()
    args.__dict__.update(input_fingerprints(args))
    resume_path, checkpoint = checkpoint_to_resume(args, device, world_size, build_parser())
    train_set, val_set, streams = training_data(args, rank, world_size, cuda)
    teacher, distill = frozen_teacher(args, train_set.num_classes, device)
    model, model_options = seeded_student(args, train_set.num_classes, rank)
    if checkpoint is not None:
        check_resumed_model(checkpoint, resume_path, args, train_set.num_classes, model_options)
        load_state(model, checkpoint["model"], resume_path)
    if world_size > 1 and cuda:  # SyncBatchNorm needs CUDA; on CPU (gloo) each rank keeps its own BN statistics
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=memory_format(device))
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    amp = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    progress = restore(checkpoint, optimizer, scaler, rank) if checkpoint is not None else dict(FRESH_PROGRESS)
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    return dict(model=model, train_model=train_model, optimizer=optimizer, scaler=scaler, amp=amp, teacher=teacher,
                distill=distill, val_set=val_set, streams=streams, num_classes=train_set.num_classes,
                model_options=model_options, progress=progress, resume_path=resume_path)


def train_step(run, images, labels, lr, device):
    """One SGD step of the student at learning rate lr; returns its losses (tensors on the device)."""
    for group in run["optimizer"].param_groups:
        group["lr"] = lr
    images = images.to(device, non_blocking=True, memory_format=memory_format(device))
    labels = labels.to(device, non_blocking=True)
    with autocast(device, run["amp"]):
        losses = train_losses(run["train_model"], images, labels, run["teacher"], run["distill"])
    run["optimizer"].zero_grad(set_to_none=True)
    run["scaler"].scale(losses["loss"]).backward()
    run["scaler"].step(run["optimizer"])
    run["scaler"].update()
    return losses


# -----------------------------------------------------------------------------
# the loop: bookkeeping, validation


class LossLog:
    """The losses of the steps since the last record, summed on the device, so that the host never
    waits for it in between; record() waits once, for all of them, and checks them for NaN."""

    def __init__(self, device, iters):
        self.iters, self.sums, self.steps = iters, {}, 0
        self.first_nonfinite = torch.tensor(iters + 1, device=device)  # the first iteration with a NaN/inf loss
        self.unlabelled = torch.tensor(0, device=device)  # batches without a labelled pixel since the last record
        self.clock = time.perf_counter()

    def add(self, losses, labels, iteration):
        self.first_nonfinite = torch.where(torch.isfinite(losses["loss"]), self.first_nonfinite,
                                           self.first_nonfinite.clamp(max=iteration))
        self.unlabelled += (labels == IGNORE_INDEX).all()
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.steps += 1

    def record(self, iteration, lr, batch_size, world_size, saved):
        """{"iter", "lr", the mean of each loss over the steps and ranks, "img_per_s"[, "unlabelled_batches"]};
        FloatingPointError naming the first iteration whose loss was not finite (`saved`: what
        last.pt holds). Starts the next interval."""
        if all_reduce(self.first_nonfinite, dist.ReduceOp.MIN).item() <= self.iters:
            raise FloatingPointError(f"the loss is not finite at iteration {self.first_nonfinite.item()}; "
                                     f"training stopped ({saved}, the last good state)")
        means = all_reduce(torch.stack(list(self.sums.values()))).div_(self.steps * world_size).tolist()
        record = {"iter": iteration, "lr": lr, **dict(zip(self.sums, means)),
                  "img_per_s": self.steps * batch_size / (time.perf_counter() - self.clock)}
        empty = all_reduce(self.unlabelled).item()
        if empty:  # logged where it happened; such a batch adds 0 to the cross-entropy
            record["unlabelled_batches"] = empty
            self.unlabelled.zero_()
        self.sums, self.steps = {}, 0
        return record

    def restart_clock(self):
        """Throughput counts training steps only: not validation, saving or logging."""
        self.clock = time.perf_counter()


def show(bar, record, iters):
    """A log record on the progress bar; without a bar (not a terminal), one line per record instead."""
    summary = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "iter")
    if bar.disable and is_main():
        bar.write(f"iteration {record['iter']}/{iters}: {summary}")
    bar.set_postfix_str(summary)


def validate_and_save(model, val_set, device, amp, world_size, state, out, log, bar):
    """Validate the weights saved in `state` (last.pt, val_pending), record the result, write
    best.pt if the mIoU improved and last.pt again with the validation done. Returns the mIoU."""
    if world_size > 1:  # evaluate the weights and BN statistics that rank 0 saves
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    try:
        confusion = evaluate(model, val_set, device, amp)
    except FloatingPointError as e:  # finite weights whose logits overflow
        raise FloatingPointError(f"validation at iteration {state['iteration']}: {e} val images; training "
                                 f"stopped ({os.path.join(out, 'last.pt')} holds these weights)") from e
    metrics = segmentation_metrics(confusion, val_set.class_names)
    miou = metrics["mIoU"]
    improved = miou is not None and (state["best_miou"] is None or miou > state["best_miou"])
    if improved:
        state["best_miou"], state["best_iteration"] = miou, state["iteration"]
    state["val_pending"] = False
    log({"iter": state["iteration"], "val": {k: metrics[k] for k in ("aAcc", "mAcc", "mIoU")}})
    if is_main():  # tqdm.write prints even where the bar is disabled
        best = "-" if state["best_miou"] is None else f"{state['best_miou']:.2f} (iteration {state['best_iteration']})"
        bar.write(f"iteration {state['iteration']}: {metrics_line(metrics)}; best mIoU {best}")
        if improved:
            save_checkpoint(state, os.path.join(out, "best.pt"))
        save_checkpoint(state, os.path.join(out, "last.pt"))
    return miou



# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    try:
        with claimed_out_folder(args) if rank == 0 else contextlib.nullcontext(lambda: None) as clear_old_run, \
                StopRequest() as stop:
            train(args, rank, world_size, device, stop, clear_old_run)
    finally:
        teardown_distributed()


def train(args, rank, world_size, device, stop, clear_old_run):
    run = prepare(args, rank, world_size, device)
    clear_old_run()  # --overwrite: only now that every input of the new run has been checked
    last_path = os.path.join(args.out, "last.pt")
    log = functools.partial(append_log, os.path.join(args.out, "log.jsonl"))
    # the ranks agree on stopping every step: over gloo, on the CPU, also when NCCL carries the rest
    stop_group = dist.new_group(backend="gloo") if world_size > 1 and device.type == "cuda" else None
    progress = run["progress"]
    iteration = start = progress["iteration"]
    if is_main():
        print(f"resuming from {run['resume_path']} at iteration {start}" if run["resume_path"] else f"training {args.out}")
        cut_log(os.path.join(args.out, "log.jsonl"), start, progress["val_pending"])

    def state():
        return checkpoint_state(args, run["model"], run["optimizer"], run["scaler"], world_size, run["num_classes"],
                                run["model_options"], progress)

    def validate(saved):
        miou = validate_and_save(run["model"], run["val_set"], device, run["amp"], world_size, saved, args.out, log, bar)
        progress.update(best_miou=saved["best_miou"], best_iteration=saved["best_iteration"])
        return miou

    data = training_batches(run["streams"], start)
    saved_iteration, last_miou, losses = (start if run["resume_path"] else None), None, LossLog(device, args.iters)
    with progress_bar(total=args.iters, initial=start, desc=os.path.basename(args.out)) as bar:
        if progress["val_pending"]:  # the validation that the interrupted run saved before and did not finish
            last_miou = validate(state())
        while iteration < args.iters:
            batch = next_batch(data, stop, world_size)
            if batch is not None:  # None: stopped by a signal before this step (no step, no validation)
                lr = poly_lr(args.lr, iteration, args.iters)
                step_losses = train_step(run, *batch, lr, device)
                iteration += 1
                bar.update(1)
                losses.add(step_losses, batch[1], iteration)
            signum = agreed_stop(stop, world_size, stop_group)
            validating = batch is not None and (iteration % args.val_every == 0 or iteration == args.iters)
            save = validating or iteration % args.save_every == 0 or signum
            if losses.steps and (save or iteration % args.log_every == 0):  # every save comes after this check
                record = losses.record(iteration, lr, args.batch_size, world_size, last_good(last_path, saved_iteration))
                progress["unlabelled_batches"] += record.get("unlabelled_batches", 0)
                log(record)
                show(bar, record, args.iters)
            if save:  # before the validation: a failure there loses no training
                check_finite_model(run["model"], iteration, last_path, saved_iteration)
                progress.update(iteration=iteration, val_pending=validating)
                saved = state()
                if is_main():
                    save_checkpoint(saved, last_path)
                saved_iteration = iteration
            if signum:
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; "
                                  f"{last_path} holds it: continue with --resume auto", signum)
            if validating:
                last_miou = validate(saved)
            if save or iteration % args.log_every == 0:
                losses.restart_clock()
    if is_main():
        print(json.dumps({"out": args.out, "iterations": iteration, "best_mIoU": progress["best_miou"],
                          "best_iteration": progress["best_iteration"], "last_mIoU": last_miou,
                          "best_checkpoint": os.path.join(args.out, "best.pt"),
                          "unlabelled_batches": progress["unlabelled_batches"]}))


if __name__ == "__main__":
    run_cli(main)
