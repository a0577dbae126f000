"""
Train a DeepLabV3 teacher, a baseline student, or a student distilled with FCKD, KD or CWD.

    python train.py                                                 # small student, synthetic set, CPU
    python train.py --dataset voc --model deeplabv3_resnet101 --pretrained-backbone resnet101.pth
    torchrun --nproc_per_node=8 train.py --dataset voc --pretrained-backbone resnet18.pth \
        --teacher-ckpt runs/voc_deeplabv3_resnet101/best.pt --kd fckd

One iteration-based loop. Each step: poly learning rate, SGD (momentum 0.9), loss
    CE(up(out), y) + 0.4 CE(up(aux), y) [+ distillation(student logits, teacher logits)]
where up() resizes the logits to the label size and the distillation term compares logits at
the nets' own resolution (FCKDLoss, spatial_kd or channel_kd from fckd.py). The teacher is
frozen, in eval mode, runs under no_grad and is never wrapped in DDP.

Launched by torchrun this is DDP (NCCL on GPUs, gloo on CPUs; --batch-size is global). OUT/last.pt
is written every --save-every iterations, before each validation and on SIGINT/SIGTERM; `--resume
auto` continues from it exactly: same weights, optimiser, LR, RNG states and position in the
epoch's shuffled order. A fresh run refuses a folder that holds a run (--overwrite allows it), and
a run holds OUT's lock while it trains.
"""

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import signal
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from data import DATASET_NAMES, DATASETS, IGNORE_INDEX, PartlyLabelled, build_dataset, listed_indices, synthetic_options
from fckd import (APPLY_MODES, CONDENSE_MODES, DEFAULT_APPLY, DEFAULT_GAMMA, DEFAULT_KEEP, DEFAULT_SIMILARITY,
                  DEFAULT_TEMPERATURE, DEFAULT_THRESHOLD, SIMILARITIES, FCKDLoss, channel_kd, spatial_kd)
from models import MODEL_NAMES, build_model, listing
from utils import (FRESH_PROGRESS, Interrupted, all_reduce, atomic_write, autocast, check_num_classes, evaluate,
                   file_sha256, is_main, load_checkpoint, load_state, memory_format, metrics_line,
                   model_from_checkpoint, non_finite_tensors, progress_bar, quiet_on_stop_signals,
                   remove_temporaries, resolve_amp, run_cli, save_checkpoint, segmentation_metrics, setup_distributed,
                   teardown_distributed, upsample, writable_folder)

MOMENTUM = 0.9
POLY_POWER = 0.9
AUX_WEIGHT = 0.4
RUN_FILES = ("last.pt", "best.pt", "log.jsonl")  # a folder with any of them holds a run
# The settings a resumed run may change: they do not change what is trained. Every other setting
# (and any flag added later) must equal the checkpoint's (check_resumed_settings).
MAY_DIFFER_ON_RESUME = ("workers", "log_every", "val_every", "save_every", "out", "resume", "overwrite")
LOCK_FILE = ".lock"
MIN_CROP = 32  # pixels a side: at output stride 16 still 2 x 2 logits, which BatchNorm needs at batch 1
WIDTHS = (1 / 16, 4.0)  # below 1/16 the nets have layers of a single channel

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
    add_distillation_flags(p)
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
                   help="start afresh in an --out that holds a run, deleting its last.pt, best.pt and log.jsonl")
    p.add_argument("--val-every", type=int, help=f"validate every N iterations (and at the end); {per_dataset}")
    p.add_argument("--save-every", type=int, help=f"write OUT/last.pt every N iterations; {per_dataset}")
    p.add_argument("--log-every", type=int, default=20,
                   help="reduce and log the losses every N iterations (default: %(default)s)")
    p.add_argument("--workers", type=int, help=f"data loading processes per rank; {per_dataset}")
    return p


def add_distillation_flags(p):
    """--kd and the flags of its loss, one to one FCKDLoss's keyword arguments (loss_settings)."""
    p.add_argument("--kd", choices=("fckd", "kd", "cwd"), help="distillation loss (default: fckd with a teacher)")
    p.add_argument("--fckd-condense", choices=CONDENSE_MODES, default="hard", help="default: %(default)s")
    p.add_argument("--fckd-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="entropy threshold of the hard condensation (default: %(default)s)")
    p.add_argument("--fckd-keep", type=float, default=DEFAULT_KEEP,
                   help="share of each image's lowest-entropy pixels the quantile condensation keeps "
                        "(default: %(default)s)")
    p.add_argument("--fckd-apply", choices=APPLY_MODES, default=DEFAULT_APPLY,
                   help="how the condensation matrix acts on both nets' logits (default: %(default)s)")
    p.add_argument("--no-fckd-enhance", dest="fckd_enhance", action="store_false", help="no soft enhancement")
    p.add_argument("--fckd-similarity", choices=SIMILARITIES, default=DEFAULT_SIMILARITY,
                   help="attention score of the soft enhancement (default: %(default)s)")
    p.add_argument("--fckd-temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="temperature of the cosine similarity (default: %(default)s)")
    p.add_argument("--fckd-gamma", type=float, default=DEFAULT_GAMMA,
                   help="soft enhancement weight (default: %(default)s)")
    p.add_argument("--tau-spatial", type=float, default=1.0,
                   help="temperature of the spatial loss, fckd and kd (default: %(default)s)")
    p.add_argument("--tau-channel", type=float, default=4.0,
                   help="temperature of the channel loss, fckd and cwd (default: %(default)s)")
    p.add_argument("--lambda-spatial", type=float, default=1.0,
                   help="weight of the spatial loss, fckd and kd (default: %(default)s)")
    p.add_argument("--lambda-channel", type=float, default=3.0,
                   help="weight of the channel loss, fckd and cwd (default: %(default)s)")


def parse_args(argv=None):
    """The flags, with the dataset record's defaults (data.DATASETS) for those left unset; argparse's usage error (exit 2) for
    flags that do not go together and for numbers outside NUMBER_RULES."""
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in DATASETS[args.dataset].defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset != "synthetic" and (args.synthetic_length is not None or args.synthetic_size is not None):
        p.error("--synthetic-length and --synthetic-size apply to --dataset synthetic only")
    if args.dataset == "synthetic" and args.image_scale is not None:
        p.error("--image-scale applies to the real sets; the synthetic set has --synthetic-size")
    if args.val_every is None:
        args.val_every = args.iters
    if args.crop_size is not None and len(args.crop_size) not in (1, 2):
        p.error(f"--crop-size takes H or H W, got {len(args.crop_size)} numbers")
    if args.crop_size is not None and len(args.crop_size) == 1:
        args.crop_size = args.crop_size * 2  # H -> H x H
    if args.crop_size is not None and min(args.crop_size) < MIN_CROP:
        p.error(f"--crop-size must be at least {MIN_CROP} pixels a side, got {' '.join(map(str, args.crop_size))}")
    if args.kd and not args.teacher_ckpt:
        p.error(f"--kd {args.kd} needs a teacher: pass --teacher-ckpt PATH")
    if args.teacher_ckpt and not args.kd:
        args.kd = "fckd"
    if args.unlabelled_batch_size is not None and not (args.labelled_list and args.teacher_ckpt):
        p.error("--unlabelled-batch-size applies to a distilled run with --labelled-list (a teacher's frames "
                "without labels): pass --labelled-list and --teacher-ckpt, or drop it")
    if args.labelled_list and args.teacher_ckpt and args.unlabelled_batch_size is None:
        args.unlabelled_batch_size = args.batch_size
    if args.overwrite and args.resume:
        p.error("--overwrite starts afresh, --resume continues: pass one of them")
    for key, rule, test in NUMBER_RULES:
        if not test(getattr(args, key)):
            p.error(f"--{key.replace('_', '-')} must be {rule}, got {getattr(args, key)}")
    if args.out is None:  # one folder per seed, so that runs over seeds never share one
        args.out = os.path.join("runs", f"{args.dataset}_{args.model}" + (f"_{args.kd}" if args.kd else "")
                                + f"_s{args.seed}")
    return args


# -----------------------------------------------------------------------------
# data order that survives a restart


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, seeded per epoch, drop_last) that yields (epoch, index) pairs
    and can start part-way into an epoch: `start` indices of this rank's share are skipped
    without being loaded, which is how a resumed run picks up at the exact batch it stopped at."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return self.num_samples - self.start


class SeededSamples(Dataset):
    """dataset[index], with torch's global RNG seeded from (seed, epoch, index) for the duration.

    The random augmentation of a sample (data.py draws it from torch's global generator) then
    depends only on which sample is drawn in which epoch: not on the number of workers or ranks,
    and not on whether the run was interrupted and resumed in between. The caller's RNG state is
    restored afterwards, so with workers=0 the training RNG stream is untouched.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


def batches(loader, sampler, iteration, batches_per_epoch):
    """Batches without end, epoch after epoch, starting at batch `iteration` of the run: the
    sampler skips the part of the current epoch that was consumed before (without loading it)."""
    epoch, consumed = divmod(iteration, batches_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = consumed * loader.batch_size
        yield from loader
        epoch, consumed = epoch + 1, 0


# -----------------------------------------------------------------------------
# the objective


def make_optimizer(model, lr, weight_decay, device):
    """SGD with momentum 0.9; on CUDA the fused kernel (one launch for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay, **fused)


def poly_lr(base_lr, iteration, iters, power=POLY_POWER):
    """lr = base_lr * (1 - iteration / iters) ** power, iteration counted from 0."""
    return base_lr * (1 - iteration / iters) ** power


# FCKDLoss's keyword arguments and the train.py flags (argparse dests) that set them, one to one
LOSS_FLAGS = {"condense": "fckd_condense", "threshold": "fckd_threshold", "keep": "fckd_keep",
              "apply": "fckd_apply", "enhance": "fckd_enhance", "similarity": "fckd_similarity",
              "temperature": "fckd_temperature", "gamma": "fckd_gamma", "tau_spatial": "tau_spatial",
              "tau_channel": "tau_channel", "lambda_spatial": "lambda_spatial", "lambda_channel": "lambda_channel"}


def loss_settings(args):
    """FCKDLoss's keyword arguments, one to one from the --fckd-*, --tau-* and --lambda-* flags."""
    return {keyword: getattr(args, dest) for keyword, dest in LOSS_FLAGS.items()}


def distillation(kd, settings):
    """The distillation term as a function (student logits, teacher logits) -> {"kd": weighted loss, ...}.

    kd: "fckd", "kd" or "cwd"; settings: FCKDLoss's keyword arguments (kd uses only tau_spatial and
    lambda_spatial, cwd only tau_channel and lambda_channel). FCKD also reports keep_ratio, the
    share of pixels its condensation matrix keeps.
    """
    if kd == "fckd":
        fckd_loss = FCKDLoss(**settings)

        def distill(student_logits, teacher_logits):
            parts = fckd_loss(student_logits, teacher_logits)
            return {"kd": parts["loss"], "keep_ratio": parts["keep_ratio"]}
    elif kd == "kd":
        def distill(student_logits, teacher_logits):
            return {"kd": settings["lambda_spatial"] * spatial_kd(student_logits, teacher_logits,
                                                                  settings["tau_spatial"])}
    else:
        def distill(student_logits, teacher_logits):
            return {"kd": settings["lambda_channel"] * channel_kd(student_logits, teacher_logits,
                                                                  settings["tau_channel"])}
    return distill


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
# RNG states, stored per rank in the checkpoint


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(world_size):
    """Every rank's RNG states, indexed by rank (each rank draws its own dropout masks)."""
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


# -----------------------------------------------------------------------------
# the output folder: one run at a time, never overwritten by accident


@contextlib.contextmanager
def claimed_out_folder(args):
    """Hold OUT's lock for the duration: create OUT, lock OUT/.lock (flock, released by the kernel
    whatever way the process ends), refuse a fresh run where a run is, remove what killed runs left.

    ValueError when OUT cannot be written, when another run holds the lock, or when OUT holds a run
    (RUN_FILES) and neither --resume nor --overwrite says what to do with it.
    """
    writable_folder(args.out, "--out")
    with open(os.path.join(args.out, LOCK_FILE), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            raise ValueError(f"{args.out} is in use by another train.py run{f' (pid {holder})' if holder else ''}; "
                             "wait for it to end or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")  # names the holder in the error above
        lock.flush()
        held = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
        if held and not args.resume and not args.overwrite:
            raise ValueError(f"{args.out} already holds a run ({', '.join(held)}); continue it with --resume auto, "
                             "start it afresh with --overwrite, or choose another --out")
        if args.overwrite:
            for name in held:
                os.remove(os.path.join(args.out, name))
        remove_temporaries(args.out)
        yield


def cut_log(log_path, iteration, val_pending):
    """Cut log.jsonl back to the records up to `iteration`, the checkpoint a run resumes from
    (0: a fresh run, an empty log). Records written after that checkpoint, by a run that was killed,
    are written again by the resumed one; a half-written last line goes too. Atomic."""
    kept = []
    if os.path.exists(log_path):
        with open(log_path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    at = record["iter"]
                except (ValueError, TypeError, KeyError):
                    continue
                # a validation still pending at the checkpoint is done, and logged, again
                if at < iteration or (at == iteration and not (val_pending and "val" in record)):
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
    atomic_write(log_path, lambda f: f.writelines(kept))


# -----------------------------------------------------------------------------
# stopping on SIGINT and SIGTERM, after the current step


class StopRequest:
    """While active, SIGINT and SIGTERM only record the signal (`signum`): the loop stops after
    the current step, saves last.pt and raises Interrupted. A signal that comes while the process
    waits for its next batch (`fetching`) abandons the wait. A second signal stops at once (the
    signal's default action; temporaries are removed at the next start)."""

    def __init__(self):
        self.signum, self.previous, self.fetching = 0, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        if self.fetching:
            raise FetchAbandoned


class FetchAbandoned(Exception):
    """Raised by StopRequest into a wait for the next batch."""


def next_batch(data, stop, world_size):
    """The next training batch, or None when a stop signal comes first: the run then stops
    before this step, at once, also when the signal has ended the data workers it waits for (a
    scheduler may signal every process). Under DDP the ranks must agree on the last step, so
    there the batch is always fetched and the ranks stop together after it (agreed_stop)."""
    if world_size > 1:
        return next(data)
    if stop.signum:  # came during the last step's validation or save
        return None
    try:
        stop.fetching = True  # inside the try: from here on a signal abandons the wait
        batch = next(data)
        stop.fetching = False
        return batch
    except FetchAbandoned:
        return None
    finally:
        stop.fetching = False


def agreed_stop(stop, world_size, group):
    """The signal that ends training after this step (0: go on). Under DDP every rank must stop
    at the same step, so the ranks agree every step, over gloo on the CPU: no wait for the GPU."""
    if world_size == 1:
        return stop.signum
    flag = torch.tensor(stop.signum)
    dist.all_reduce(flag, dist.ReduceOp.MAX, group=group)
    return int(flag)


# -----------------------------------------------------------------------------
# checks that save a run from bad data and bad numbers


def decode_split(dataset, workers, rank, world_size, name):
    """Read every item of `dataset` (this rank a share) so that a bad file stops the run before
    training, not at the first validation thousands of iterations later (data.py's errors name it)."""
    share = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(share, batch_size=None, num_workers=workers, worker_init_fn=quiet_on_stop_signals)
    for _ in progress_bar(loader, desc=f"checking the {name} images", leave=False):
        pass


def last_good(last_path, saved_iteration):
    """What the error of a stopped run says about last.pt."""
    if saved_iteration is None:
        return "no checkpoint was written"
    return f"{last_path} holds iteration {saved_iteration}"


def check_finite_model(model, iteration, last_path, saved_iteration):
    """FloatingPointError naming the tensors if a parameter or buffer holds NaN or inf, so that a
    checkpoint is only ever a good state: BatchNorm statistics can overflow while the loss stays
    finite. Called before each save: one fused check and one host sync there, none in between."""
    bad = non_finite_tensors(model.state_dict())
    if all_reduce(torch.tensor(len(bad), device=next(model.parameters()).device)).item():
        where = f"{len(bad)} tensors of the model ({listing(bad, 3)})" if bad else "the model on another rank"
        raise FloatingPointError(f"iteration {iteration} left NaN or inf in {where}; training stopped "
                                 f"({last_good(last_path, saved_iteration)}, the last good state)")


# -----------------------------------------------------------------------------
# the pieces of train(): data, teacher, resuming, checkpoints and validation


def use_fast_cuda_kernels():
    """cuDNN autotuning (every crop has the same size, so the search pays off) and TF32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def training_data(args, rank, world_size, cuda):
    """(train_set, val_set, streams): this rank's share of the shuffled training batches as
    streams of (loader, sampler, batches_per_epoch), in an order a resumed run can pick up
    (ResumableSampler, SeededSamples); training_batches joins them. With --labelled-list only the
    listed frames are sampled as the labelled batch, and a distilled run draws a second stream of
    --unlabelled-batch-size unlisted frames (labels all-ignore) that feed the distillation loss
    alone: distillation adds frames and takes no label visits away. The real sets' val images are
    all decoded first, so that a bad file stops the run now and not at the first validation."""
    options = synthetic_options(args.dataset, args.synthetic_length, args.synthetic_size)
    image_scale = args.image_scale or 1.0
    train_set = build_dataset(args.dataset, args.data_root, "train", train=True, crop_size=args.crop_size,
                              image_scale=image_scale, **options)
    parts = [(train_set, "train split", args.batch_size, args.seed)]
    if args.labelled_list:
        labelled = listed_indices(train_set, args.labelled_list)
        parts = [(Subset(train_set, labelled), f"labelled list {args.labelled_list}", args.batch_size, args.seed)]
        if args.teacher_ckpt and args.unlabelled_batch_size:
            listed = set(labelled)
            unlabelled = Subset(PartlyLabelled(train_set, []), [i for i in range(len(train_set)) if i not in listed])
            # another seed: the two streams' samples would otherwise share their augmentations
            parts.append((unlabelled, "frames the labelled list leaves out", args.unlabelled_batch_size,
                          args.seed + 1))
    val_set = build_dataset(args.dataset, args.data_root, "val", train=False, image_scale=image_scale, **options)
    streams = []
    for sampled, what, batch_size, seed in parts:
        batch_per_rank = batch_size // world_size
        batches_per_epoch = len(sampled) // world_size // batch_per_rank
        if batches_per_epoch == 0:
            raise ValueError(f"the {args.dataset} {what} has {len(sampled)} images, fewer than the "
                             f"global batch size {batch_size}")
        sampler = ResumableSampler(sampled, world_size, rank, seed)
        loader = DataLoader(SeededSamples(sampled, seed), batch_size=batch_per_rank, sampler=sampler,
                            num_workers=args.workers, pin_memory=cuda, drop_last=True,
                            persistent_workers=args.workers > 0, worker_init_fn=quiet_on_stop_signals,
                            generator=torch.Generator())  # its own generator: iter(loader) leaves the global RNG alone
        streams.append((loader, sampler, batches_per_epoch))
    if args.dataset != "synthetic":  # the synthetic scenes are generated, not read
        decode_split(val_set, args.workers, rank, world_size, f"{args.dataset} val")
    return train_set, val_set, streams


def training_batches(streams, iteration):
    """The training batches from `iteration` on: one batch of each stream, concatenated."""
    data = [batches(loader, sampler, iteration, per_epoch) for loader, sampler, per_epoch in streams]
    if len(data) == 1:
        return data[0]
    return ((torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts]))
            for parts in zip(*data))


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
    return teacher, distillation(args.kd, loss_settings(args))


def checkpoint_to_resume(args, device, world_size):
    """(path, checkpoint) that --resume names (auto: OUT/last.pt when it exists), or (None, None)
    for a fresh start. ValueError unless every rank sees OUT/last.pt or none does, unless the
    checkpoint was trained with this run's settings (check_resumed_settings), and unless it is at
    an iteration no later than --iters."""
    path = args.resume
    if path == "auto":
        last_path = os.path.join(args.out, "last.pt")
        path = last_path if os.path.exists(last_path) else None
        resuming = all_reduce(torch.tensor(int(path is not None), device=device)).item()
        if 0 < resuming < world_size:  # every rank loads last.pt: they must all see it
            raise ValueError(f"{last_path} exists on {resuming} of {world_size} ranks only; put --out on a "
                             "filesystem that every node shares, or pass --resume PATH with a copy on each node")
    if not path:
        return None, None
    checkpoint = load_checkpoint(path)
    check_resumed_settings(checkpoint["args"], args, path)
    if checkpoint["iteration"] > args.iters:
        raise ValueError(f"cannot resume from {path}: it is at iteration {checkpoint['iteration']}, "
                         f"beyond --iters {args.iters}")
    return path, checkpoint


def teacher_sha256(args):
    """SHA-256 of --teacher-ckpt's bytes (None without a teacher). Stored with the run's settings,
    so that a resume refuses a teacher file that changed on disk since the run started."""
    return file_sha256(args.teacher_ckpt) if args.teacher_ckpt else None


def unused_settings(kd, enhance):
    """The loss flags that a run with --kd `kd` (None: no teacher) does not use, so that they do not
    change what it trains: every one without a teacher, all but tau/lambda_spatial for kd, ...,
    and the enhancement's own flags for fckd without enhancement."""
    loss_flags = set(LOSS_FLAGS.values())
    used = {"fckd": loss_flags, "kd": {"tau_spatial", "lambda_spatial"}, "cwd": {"tau_channel", "lambda_channel"}}
    unused = loss_flags - used.get(kd, set())
    return unused if enhance else unused | {LOSS_FLAGS[k] for k in ("gamma", "similarity", "temperature")}


def check_resumed_settings(stored, args, path):
    """ValueError naming every setting (but MAY_DIFFER_ON_RESUME, and the loss flags the run's --kd
    does not use) in which this run's args differ from `stored`, the args of the checkpoint at
    `path`, with both values: a resumed run must be the run its checkpoint records. A setting that
    an older checkpoint lacks counts as its default."""
    parser = build_parser()
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    differ = []
    same_loss = stored.get("kd") == args.kd and stored.get("fckd_enhance", True) == args.fckd_enhance
    ignored = set(MAY_DIFFER_ON_RESUME) | (unused_settings(args.kd, args.fckd_enhance) if same_loss else set())
    for key in sorted((set(stored) | set(vars(args))) - ignored):
        then, now = stored.get(key, parser.get_default(key)), getattr(args, key, parser.get_default(key))
        if then != now:
            name = "the teacher checkpoint's content (SHA-256)" if key == "teacher_sha256" else flags.get(key, key)
            differ.append(f"{name}: {then!r} in the checkpoint, {now!r} now")
    if differ:
        raise ValueError(f"cannot resume from {path}: this run's settings differ from the ones it was trained with "
                         f"({'; '.join(differ)}); resume with the checkpoint's settings, or start a new run "
                         f"(another --out, or --overwrite to replace this one)")


def check_resumed_model(checkpoint, path, args, num_classes, model_options):
    """ValueError unless the checkpoint holds this run's net (--model, model_options) for this run's data."""
    trained = tuple(checkpoint[key] for key in ("dataset", "model_name", "num_classes", "model_options"))
    if trained != (args.dataset, args.model, num_classes, model_options):
        raise ValueError(f"cannot resume from {path}: it holds {trained[1]} {trained[3]} for {trained[0]} "
                         f"({trained[2]} classes), this run trains {args.model} {model_options} for "
                         f"{args.dataset} ({num_classes} classes)")


def restore(checkpoint, optimizer, scaler, rank):
    """Put the optimiser, the loss scaler and this rank's RNG states back as `checkpoint` holds
    them; returns the run's progress there (the keys of FRESH_PROGRESS)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])])
    return {key: checkpoint[key] for key in FRESH_PROGRESS}


def checkpoint_state(args, model, optimizer, scaler, world_size, num_classes, model_options, progress):
    """What last.pt and best.pt hold: the keys of utils.CHECKPOINT_KEYS. progress: the keys of
    FRESH_PROGRESS (val_pending: saved before its validation, which a resume then does first)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "args": vars(args), "rng": all_rng_states(world_size), "num_classes": num_classes,
            "dataset": args.dataset, "model_name": args.model, "model_options": model_options,
            **{key: progress[key] for key in FRESH_PROGRESS}}


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


def append_log(log_path, record):
    """One JSON line in log.jsonl, on rank 0."""
    if is_main():
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed()
    try:
        with claimed_out_folder(args) if rank == 0 else contextlib.nullcontext(), StopRequest() as stop:
            train(args, rank, world_size, device, stop)
    finally:
        teardown_distributed()


def train(args, rank, world_size, device, stop):
    for flag, size in (("--batch-size", args.batch_size), ("--unlabelled-batch-size", args.unlabelled_batch_size or 0)):
        if size % world_size:
            raise ValueError(f"{flag} {size} is not divisible by the {world_size} ranks")
    cuda = device.type == "cuda"
    amp = resolve_amp(args.amp, device)
    if cuda:
        use_fast_cuda_kernels()
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    log = functools.partial(append_log, log_path)
    # the ranks agree on stopping every step: over gloo, on the CPU, also when NCCL carries the rest
    stop_group = dist.new_group(backend="gloo") if world_size > 1 and cuda else None

    args.teacher_sha256 = teacher_sha256(args)
    resume_path, checkpoint = checkpoint_to_resume(args, device, world_size)
    train_set, val_set, streams = training_data(args, rank, world_size, cuda)
    num_classes = train_set.num_classes
    teacher, distill = frozen_teacher(args, num_classes, device)
    model, model_options = seeded_student(args, num_classes, rank)
    if checkpoint is not None:
        check_resumed_model(checkpoint, resume_path, args, num_classes, model_options)
        load_state(model, checkpoint["model"], resume_path)
    if world_size > 1 and cuda:  # SyncBatchNorm needs CUDA; on CPU (gloo) each rank keeps its own BN statistics
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=memory_format(device))
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    progress = restore(checkpoint, optimizer, scaler, rank) if checkpoint is not None else dict(FRESH_PROGRESS)
    start = progress["iteration"]
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if is_main():
        print(f"resuming from {resume_path} at iteration {start}" if checkpoint else f"training {args.out}")
        cut_log(log_path, start, progress["val_pending"])

    # the loop: losses stay on the device and are reduced every --log-every iterations, so the
    # host never waits for the device in between
    data = training_batches(streams, start)
    iteration, saved_iteration, last_miou = start, (start if checkpoint else None), None
    sums, steps = {}, 0
    first_nonfinite = torch.tensor(args.iters + 1, device=device)  # the first iteration with a NaN/inf loss
    unlabelled = torch.tensor(0, device=device)  # batches without a labelled pixel since the last log record
    timer = time.perf_counter()
    with progress_bar(total=args.iters, initial=start, desc=os.path.basename(args.out)) as bar:
        if progress["val_pending"]:  # the validation that the interrupted run saved before and did not finish
            state = checkpoint_state(args, model, optimizer, scaler, world_size, num_classes, model_options, progress)
            last_miou = validate_and_save(model, val_set, device, amp, world_size, state, args.out, log, bar)
            progress.update(best_miou=state["best_miou"], best_iteration=state["best_iteration"])
        while iteration < args.iters:
            batch = next_batch(data, stop, world_size)
            if batch is not None:  # None: stopped by a signal before this step (no step, no validation)
                images, labels = batch
                lr = poly_lr(args.lr, iteration, args.iters)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True, memory_format=memory_format(device))
                labels = labels.to(device, non_blocking=True)
                with autocast(device, amp):
                    losses = train_losses(train_model, images, labels, teacher, distill)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                iteration += 1
                bar.update(1)
                first_nonfinite = torch.where(torch.isfinite(losses["loss"]), first_nonfinite,
                                              first_nonfinite.clamp(max=iteration))
                unlabelled += (labels == IGNORE_INDEX).all()
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                steps += 1

            signum = agreed_stop(stop, world_size, stop_group)
            validate = batch is not None and (iteration % args.val_every == 0 or iteration == args.iters)
            save = validate or iteration % args.save_every == 0 or signum
            if steps and (save or iteration % args.log_every == 0):
                # the one host sync of the interval; every save comes after this check
                if all_reduce(first_nonfinite, dist.ReduceOp.MIN).item() <= args.iters:
                    raise FloatingPointError(f"the loss is not finite at iteration {first_nonfinite.item()}; "
                                             f"training stopped ({last_good(last_path, saved_iteration)}, "
                                             "the last good state)")
                means = all_reduce(torch.stack(list(sums.values()))).div_(steps * world_size).tolist()
                record = {"iter": iteration, "lr": lr, **dict(zip(sums, means)),
                          "img_per_s": steps * args.batch_size / (time.perf_counter() - timer)}
                empty = all_reduce(unlabelled).item()
                if empty:  # logged where it happened; such a batch adds 0 to the cross-entropy
                    record["unlabelled_batches"] = empty
                    progress["unlabelled_batches"] += empty
                    unlabelled.zero_()
                log(record)
                summary = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "iter")
                if bar.disable and is_main():  # no bar (not a terminal): one line per record instead
                    bar.write(f"iteration {iteration}/{args.iters}: {summary}")
                bar.set_postfix_str(summary)
                sums, steps = {}, 0

            if save:  # before the validation: a failure there loses no training
                check_finite_model(model, iteration, last_path, saved_iteration)
                progress.update(iteration=iteration, val_pending=validate)
                state = checkpoint_state(args, model, optimizer, scaler, world_size, num_classes, model_options,
                                         progress)
                if is_main():
                    save_checkpoint(state, last_path)
                saved_iteration = iteration
            if signum:
                raise Interrupted(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; "
                                  f"{last_path} holds it: continue with --resume auto", signum)
            if validate:
                last_miou = validate_and_save(model, val_set, device, amp, world_size, state, args.out, log, bar)
                progress.update(best_miou=state["best_miou"], best_iteration=state["best_iteration"])
            if save or iteration % args.log_every == 0:
                timer = time.perf_counter()  # throughput counts training steps only
    if is_main():
        print(json.dumps({"out": args.out, "iterations": iteration, "best_mIoU": progress["best_miou"],
                          "best_iteration": progress["best_iteration"], "last_mIoU": last_miou,
                          "best_checkpoint": best_path, "unlabelled_batches": progress["unlabelled_batches"]}))


if __name__ == "__main__":
    run_cli(main)
