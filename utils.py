"""
What train.py and eval.py share: the torchrun process group, the segmentation metrics (one
confusion matrix, summed over all ranks), whole-image prediction (multi-scale, flip, sliding
window) and a checkpoint's evaluation data. Checkpoint files themselves are run.py's.
"""

import math
import os
import signal
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data import DATASETS, IGNORE_INDEX, build_dataset, synthetic_options

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


def progress_bar(iterable=None, enabled=True, **options):
    """tqdm's bar on rank 0 when its stream (stderr) is a terminal; none elsewhere (CI, nohup, a
    log file), where each redraw would be a line of the log. tqdm.write still prints either way."""
    shown = enabled and is_main() and sys.stderr.isatty()
    return tqdm(iterable, disable=not shown, dynamic_ncols=True, **options)


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """In-place all-reduce across ranks (a no-op in a single process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def resolve_amp(amp, device):
    """--amp default: bf16 on CUDA, off elsewhere (on a CPU bf16 autocast is slower than fp32; README)."""
    if amp is None:
        return "bf16" if device.type == "cuda" else "off"
    return amp


def memory_format(device):
    """channels_last on CUDA, where cuDNN's convolutions are fastest in it; the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def use_fast_cuda_kernels():
    """cuDNN autotuning (every crop has the same size, so the search pays off) and TF32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device, amp):
    """The autocast context for --amp {bf16, fp16, off}."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def exit_worker(signum, frame):
    sys.exit(0)


def quiet_on_stop_signals(worker_id):
    """DataLoader worker_init_fn for the signals a stop sends to every process of a run (a Ctrl-C
    reaches the whole process group, a scheduler may SIGTERM every process). SIGINT is left to the
    main process, which stops after the current step. SIGTERM ends the worker with status 0: a
    worker killed by a signal makes torch raise in the main process at once, mid-step or mid-save,
    while one that exits cleanly does not; and multiprocessing's terminate at exit (SIGTERM) must
    still end it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_worker)


# -----------------------------------------------------------------------------
# output folders and files, checked before any work is spent


def writable_folder(path, flag):
    """Create folder `path` if needed and check that a file can be written in it; ValueError naming
    `flag` (e.g. "--out") otherwise. (A real write: os.access says yes to root on a read-only mount.)"""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"{flag} {path} is not a writable folder ({e.strerror or e})") from e


def writable_file(path, flag):
    """ValueError naming `flag` unless `path` can be written: not a folder, in a writable folder that exists."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder, not a file")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path} cannot be written: {folder} "
                         f"{'is a file' if os.path.exists(folder) else 'does not exist'}")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror or e})") from e


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
def predict(model, image, scales=(1.0,), flip=False, window=None, size=None):
    """Class probabilities (1 x K x size) for one normalised image (1 x 3 x H x W); size: that of
    the labels scored against (default H x W; larger when the set's images were scaled down).

    For every scale (and its horizontal mirror with flip=True) the image is resized, run whole or
    by sliding window, its logits resized to `size` and softmaxed; the probabilities are
    averaged over all passes (mmseg's aug test).
    """
    size = image.shape[-2:] if size is None else size
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


def evaluate(model, dataset, device, amp="off", scales=(1.0,), flip=False, window=None, workers=0, on_image=None,
             progress=False):
    """Confusion matrix of `model` over `dataset` (whole images, one at a time), summed over ranks.

    Rank r predicts images r, r + world, r + 2 world, ...: every image exactly once, with no
    padding duplicates (DistributedSampler would repeat images to even out the shards).
    on_image(index, image, label, prediction), if given, sees every image this rank predicts.
    progress: a progress bar on rank 0 (eval.py; train.py's validation runs under its own bar).
    FloatingPointError naming the image if the model's logits there are NaN or inf: such weights
    would otherwise get a score (argmax of NaN is a class like any other).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = range(rank, len(dataset), world)
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=quiet_on_stop_signals,
                        generator=torch.Generator())  # leaves the global RNG, and so training, as it was
    was_training, benchmark = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False  # whole images differ in size: autotuning every new shape costs more
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    try:
        progress = progress_bar(zip(indices, loader), progress, total=len(indices), desc="evaluating", leave=False)
        for index, (image, label) in progress:
            image = image.to(device, non_blocking=True, memory_format=memory_format(device))
            label = label.to(device, non_blocking=True)
            with autocast(device, amp):
                probabilities = predict(model, image, scales, flip, window, label.shape[-2:])
            # one host sync per image, as confusion_matrix makes anyway
            if not torch.isfinite(probabilities).all():
                raise FloatingPointError(f"the logits are NaN or inf on image {index} of {len(dataset)}")
            prediction = probabilities.argmax(1)
            confusion += confusion_matrix(prediction, label, dataset.num_classes)
            if on_image is not None:
                on_image(index, image, label, prediction)
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = benchmark
    return all_reduce(confusion)


# -----------------------------------------------------------------------------
# a checkpoint's data (run.py reads and writes the files)


def check_num_classes(checkpoint, what, dataset_name, num_classes):
    """ValueError "{what} predicts K classes, the {dataset_name} set has N" unless the net of
    `checkpoint` predicts the set's num_classes; what names the checkpoint ("teacher checkpoint PATH")."""
    if checkpoint["num_classes"] != num_classes:
        raise ValueError(f"{what} predicts {checkpoint['num_classes']} classes, the {dataset_name} set has "
                         f"{num_classes}")


def dataset_from_checkpoint(checkpoint, split, name=None, data_root=None, image_scale=None):
    """The evaluation data (train=False) of a train.py checkpoint: its dataset, data root, image
    scale and synthetic options, on `split`. `name`, `data_root` and `image_scale` override the
    run's; another dataset than the run's takes none of the run's settings."""
    trained = checkpoint["args"]
    name = name or checkpoint["dataset"]
    if name != checkpoint["dataset"]:
        data_root = data_root or DATASETS[name].defaults["data_root"]
        return build_dataset(name, data_root, split, train=False, image_scale=image_scale or 1.0)
    options = synthetic_options(name, trained.get("synthetic_length"), trained.get("synthetic_size"))
    image_scale = image_scale or trained.get("image_scale") or 1.0
    return build_dataset(name, data_root or trained.get("data_root"), split, train=False, image_scale=image_scale,
                         **options)
