"""
What train.py and eval.py share: the torchrun process group, the segmentation metrics (one
confusion matrix, summed over all ranks), whole-image prediction (multi-scale, flip, sliding
window), checkpoint files (atomic save, checked load) and building a model, and its evaluation data, from a checkpoint.
"""

import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from data import IGNORE_INDEX, build_dataset
from models import build_model

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them we are one process


def setup_distributed():
    """Join torchrun's process group if launched by torchrun. Returns (rank, world_size, device).

    NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is available, gloo on CPU.
    """
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def teardown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    """True on rank 0, and in a plain single process: the rank that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """In-place all-reduce across ranks (a no-op in a single process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def resolve_amp(amp, device):
    """--amp default: bf16 on CUDA, off elsewhere (on a 2-core x86 CPU, bf16 autocast trained the
    small student about 7x slower than fp32)."""
    if amp is None:
        return "bf16" if device.type == "cuda" else "off"
    return amp


def autocast(device, amp):
    """The autocast context for --amp {bf16, fp16, off}."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def synthetic_options(dataset, length=None, image_size=None):
    """build_dataset's options for the synthetic set (--synthetic-length, --synthetic-size);
    the real sets take none."""
    if dataset != "synthetic":
        return {}
    return {key: value for key, value in (("length", length), ("image_size", image_size)) if value is not None}


# -----------------------------------------------------------------------------
# metrics


def confusion_matrix(prediction, label, num_classes):
    """K x K int64 counts, rows = true class, columns = predicted class; label 255 is skipped.

    prediction, label: integer tensors of the same shape on the same device.
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != IGNORE_INDEX
    index = label[valid] * num_classes + prediction[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    if counts.numel() != num_classes * num_classes:  # bincount grows only for ids >= num_classes
        raise ValueError(f"label or prediction holds a class id >= num_classes ({num_classes}) "
                         f"other than {IGNORE_INDEX}")
    return counts.view(num_classes, num_classes)


def segmentation_metrics(confusion, class_names):
    """aAcc, mAcc, mIoU (percent) and per-class IoU/Acc from a K x K confusion matrix.

        IoU_c = TP_c / (TP_c + FP_c + FN_c)     Acc_c = TP_c / (TP_c + FN_c)
        aAcc  = sum_c TP_c / (all labelled pixels)

    As in mmseg, a class's IoU is undefined (None) when the class appears in neither labels nor
    predictions, its Acc when it is absent from the labels; the means skip undefined classes.
    """
    confusion = confusion.double().cpu()
    true_positive = confusion.diag()
    labelled = confusion.sum(1)
    union = labelled + confusion.sum(0) - true_positive
    iou = true_positive / union  # 0 / 0 = NaN marks the undefined classes
    acc = true_positive / labelled

    def percent(x):
        x = float(x)
        return None if math.isnan(x) else 100.0 * x

    return {
        "aAcc": percent(true_positive.sum() / labelled.sum()),
        "mAcc": percent(acc.nanmean()),
        "mIoU": percent(iou.nanmean()),
        "per_class": {name: {"IoU": percent(i), "Acc": percent(a)} for name, i, a in zip(class_names, iou, acc)},
    }


def format_metrics(metrics):
    """The per-class table and the summary line, as printed by eval.py."""
    def cell(x):
        return "     -" if x is None else f"{x:6.2f}"

    width = max(len("class"), *(len(name) for name in metrics["per_class"]))
    lines = [f"{'class':<{width}}     IoU    Acc"]
    lines += [f"{name:<{width}}  {cell(m['IoU'])} {cell(m['Acc'])}" for name, m in metrics["per_class"].items()]
    lines.append(metrics_line(metrics))
    return "\n".join(lines)


def metrics_line(metrics):
    """'aAcc 91.20 mAcc 70.31 mIoU 61.05' ('-' for an undefined value)."""
    return " ".join(f"{key} {'-' if metrics[key] is None else format(metrics[key], '.2f')}"
                    for key in ("aAcc", "mAcc", "mIoU"))


# -----------------------------------------------------------------------------
# prediction on whole images


def upsample(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def window_starts(size, window, stride):
    """Start offsets of windows of length `window` every `stride` pixels, the last one flush with the end."""
    if size <= window:
        return [0]
    return list(range(0, size - window, stride)) + [size - window]


def sliding_logits(model, image, window):
    """Logits at the image's size, averaged over overlapping windows (stride 2/3 of the window, as
    mmseg's slide mode uses for Cityscapes). Images smaller than the window are run whole."""
    height, width = image.shape[-2:]
    window_h, window_w = window
    stride_h, stride_w = math.ceil(window_h * 2 / 3), math.ceil(window_w * 2 / 3)
    total, count = None, torch.zeros(1, 1, height, width, device=image.device)
    for top in window_starts(height, window_h, stride_h):
        for left in window_starts(width, window_w, stride_w):
            crop = image[..., top:top + window_h, left:left + window_w]
            logits = upsample(model(crop)["out"].float(), crop.shape[-2:])
            if total is None:
                total = torch.zeros(1, logits.shape[1], height, width, device=image.device)
            total[..., top:top + window_h, left:left + window_w] += logits
            count[..., top:top + window_h, left:left + window_w] += 1
    return total / count


@torch.no_grad()
def predict(model, image, scales=(1.0,), flip=False, window=None):
    """Class probabilities (1 x K x H x W) for one normalised image (1 x 3 x H x W).

    For every scale (and its horizontal mirror with flip=True) the image is resized, run whole or
    by sliding window, its logits resized back to H x W and softmaxed; the probabilities are
    averaged over all passes (mmseg's aug test).
    """
    size = image.shape[-2:]
    total = 0.0
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(
            image, scale_factor=scale, mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if mirrored else scaled
            logits = sliding_logits(model, x, window) if window else upsample(model(x)["out"].float(), x.shape[-2:])
            if mirrored:
                logits = logits.flip(-1)
            total = total + upsample(logits, size).softmax(1)
    return total / (len(scales) * (2 if flip else 1))


def evaluate(model, dataset, device, amp="off", scales=(1.0,), flip=False, window=None, workers=0, on_image=None):
    """Confusion matrix of `model` over `dataset` (whole images, one at a time), summed over ranks.

    Rank r predicts images r, r + world, r + 2 world, ...: every image exactly once, with no
    padding duplicates (DistributedSampler would repeat images to even out the shards).
    on_image(index, image, label, prediction), if given, sees every image this rank predicts.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = range(rank, len(dataset), world)
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # leaves the global RNG, and so training, as it was
    channels_last = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    was_training, benchmark = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False  # whole images differ in size: autotuning every new shape costs more
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    try:
        for index, (image, label) in zip(indices, loader):
            image = image.to(device, non_blocking=True, memory_format=channels_last)
            label = label.to(device, non_blocking=True)
            with autocast(device, amp):
                prediction = predict(model, image, scales, flip, window).argmax(1)
            confusion += confusion_matrix(prediction, label, dataset.num_classes)
            if on_image is not None:
                on_image(index, image, label, prediction)
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = benchmark
    return all_reduce(confusion)


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "iteration", "args", "rng", "best_miou", "num_classes",
                   "dataset", "model_name", "model_options")


def save_checkpoint(checkpoint, path):
    """torch.save that never leaves a half-written file at `path`.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is then
    renamed over `path` (os.replace is atomic on POSIX and Windows). If anything fails the old
    file is untouched and the temporary one is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path):
    """Read a checkpoint written by train.py onto the CPU.

    FileNotFoundError naming the path if it does not exist; ValueError naming the file if it is
    not a torch file or lacks any of CHECKPOINT_KEYS. Loaded with weights_only=True: a checkpoint
    is data (tensors, numbers, strings), never code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a train.py checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def load_state(model, state, path, what="the model"):
    """model.load_state_dict(state), with a one-line ValueError naming the file and the first
    missing, unexpected and mis-shaped keys when the weights do not fit."""
    expected = model.state_dict()
    problems = {
        "missing": [key for key in expected if key not in state],
        "unexpected": [key for key in state if key not in expected],
        "mis-shaped": [f"{key} {tuple(value.shape)} (model {tuple(expected[key].shape)})"
                       for key, value in state.items() if key in expected and value.shape != expected[key].shape],
    }
    if any(problems.values()):
        listing = "; ".join(f"{len(keys)} {kind} keys: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                            for kind, keys in problems.items() if keys)
        raise ValueError(f"the weights in {path} do not fit {what}: {listing}")
    model.load_state_dict(state)


def model_from_checkpoint(path, name=None):
    """(model, checkpoint): the net a checkpoint describes, with its weights, on the CPU.

    The architecture comes from the checkpoint (model_name, num_classes, model_options); `name`
    overrides the architecture name, and ValueError says so if the weights do not fit it.
    """
    checkpoint = load_checkpoint(path)
    name = name or checkpoint["model_name"]
    model = build_model(name, checkpoint["num_classes"], **checkpoint["model_options"])
    load_state(model, checkpoint["model"], path,
               f"{name} with {checkpoint['num_classes']} classes and options {checkpoint['model_options']}")
    return model, checkpoint


def dataset_from_checkpoint(checkpoint, split, name=None, data_root=None):
    """The evaluation data (train=False) of a train.py checkpoint: its dataset, data root and
    synthetic options, on `split`. `name` and `data_root` override the run's; another dataset
    than the run's takes none of the run's settings."""
    trained = checkpoint["args"]
    name = name or checkpoint["dataset"]
    if name != checkpoint["dataset"]:
        return build_dataset(name, data_root, split, train=False)
    options = synthetic_options(name, trained.get("synthetic_length"), trained.get("synthetic_size"))
    return build_dataset(name, data_root or trained.get("data_root"), split, train=False, **options)


# -----------------------------------------------------------------------------


def run_cli(main):
    """Run main(); a ValueError, FileNotFoundError or FloatingPointError (bad input, missing file,
    non-finite loss) becomes one line "error: ..." on stderr and exit status 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
