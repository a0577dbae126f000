"""
What train.py and eval.py share: the torchrun process group, the segmentation metrics (one
confusion matrix, summed over all ranks), whole-image prediction (multi-scale, flip, sliding
window), checkpoint files (atomic save, load checked against the SHA-256 stored in them) and
building a model, and its evaluation data, from a checkpoint.
"""

import glob
import hashlib
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
from models import build_model, listing, load_torch_file, load_weights, require_file

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
# checkpoints

# Every key of a checkpoint, as train.checkpoint_state writes them: the run's net, data and
# settings, its optimiser and RNG states, and its progress (FRESH_PROGRESS's keys).
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "iteration", "args", "rng", "best_miou", "num_classes",
                   "dataset", "model_name", "model_options", "best_iteration", "unlabelled_batches", "val_pending")
# a run's progress when it starts: iteration 0, no validation yet, nothing pending
FRESH_PROGRESS = {"iteration": 0, "best_miou": None, "best_iteration": None, "unlabelled_batches": 0,
                  "val_pending": False}
# progress that train.py began to record later: a checkpoint without it had none of it (load_checkpoint)
ADDED_KEYS = ("best_iteration", "unlabelled_batches", "val_pending")
TEMPORARY = ".{name}.tmp{pid}"  # atomic_write's temporary file next to OUT/name


def atomic_write(path, write):
    """write(f) into a binary file that appears at `path` whole or not at all.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is then
    renamed over `path` (os.replace is atomic on POSIX and Windows). If anything fails the old
    file is untouched and the temporary one is removed; one left by a kill -9 is removed by
    remove_temporaries.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, TEMPORARY.format(name=os.path.basename(path), pid=os.getpid()))
    try:
        with open(tmp, "wb") as f:
            write(f)
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


def remove_temporaries(folder):
    """Remove the temporary files that atomic_write left in `folder` when its process was killed
    (call it only while no other process writes there: train.py holds OUT's lock)."""
    for path in glob.glob(os.path.join(glob.escape(folder), TEMPORARY.format(name="*", pid="*"))):
        os.remove(path)


def payload_sha256(value, digest=None):
    """SHA-256 (hex) of a checkpoint's contents: every tensor's dtype, shape and bytes, and every
    other value's type and repr, in order. Computed from the objects, not the file, so the same
    checkpoint loaded back gives the same digest."""
    top = digest is None
    digest = hashlib.sha256() if top else digest
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {data.dtype} {tuple(value.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            payload_sha256(key, digest)
            payload_sha256(item, digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"sequence {len(value)};".encode())
        for item in value:
            payload_sha256(item, digest)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())
    return digest.hexdigest() if top else None


def file_sha256(path, what="checkpoint"):
    """SHA-256 of the file's bytes, hex; FileNotFoundError "{what} not found: {path}" if it is missing."""
    require_file(path, what)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(checkpoint, path):
    """torch.save of `checkpoint` plus its payload_sha256 under "sha256", written atomically."""
    payload = {**checkpoint, "sha256": payload_sha256(checkpoint)}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path):
    """Read a checkpoint written by train.py onto the CPU; returns it without its "sha256".

    FileNotFoundError naming the path if it does not exist; ValueError naming the file if it is
    not a torch file, lacks any of CHECKPOINT_KEYS but ADDED_KEYS (filled in from FRESH_PROGRESS), or
    its contents do not match the SHA-256 stored in it (damaged bytes: torch.load itself checks
    none). Checkpoints written before the SHA-256 was stored load unchecked.
    """
    path = os.fspath(path)
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a train.py checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    stored = checkpoint.pop("sha256", None)
    if stored is not None and payload_sha256(checkpoint) != stored:
        raise ValueError(f"{path} is damaged: its contents do not match the SHA-256 stored in it; "
                         "use another checkpoint (e.g. best.pt or a copy)")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint and key not in ADDED_KEYS]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint: it lacks {', '.join(missing)}")
    for key in ADDED_KEYS:  # a checkpoint of an earlier train.py
        checkpoint.setdefault(key, FRESH_PROGRESS[key])
    return checkpoint


def non_finite_tensors(state):
    """Names of the floating-point tensors of a state dict that hold NaN or inf. One fused check
    (the max-abs of every tensor at once, one host sync); the tensors are named only when it fails."""
    floats = [t for t in state.values() if t.is_floating_point() and t.numel()]
    if not floats or torch.stack(torch._foreach_norm(floats, ord=math.inf)).isfinite().all():
        return []
    return [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def load_state(model, state, path, what="the model"):
    """model.load_state_dict(state), with a one-line ValueError naming the file and the tensors
    that hold NaN or inf (a diverged run's weights must not be resumed, distilled from or scored),
    or, when the weights do not fit, the missing, unexpected and mis-shaped keys (models.load_weights)."""
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"{path} holds NaN or inf in {len(bad)} tensors ({listing(bad, 3)}); "
                         "use an earlier checkpoint")
    load_weights(model, state, f"the weights in {path} do not fit {what}")


def model_from_checkpoint(path):
    """(model, checkpoint): the net a checkpoint describes (model_name, num_classes,
    model_options), with its weights, on the CPU."""
    checkpoint = load_checkpoint(path)
    name = checkpoint["model_name"]
    model = build_model(name, checkpoint["num_classes"], **checkpoint["model_options"])
    load_state(model, checkpoint["model"], path,
               f"{name} with {checkpoint['num_classes']} classes and options {checkpoint['model_options']}")
    return model, checkpoint


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


# -----------------------------------------------------------------------------


class Interrupted(Exception):
    """Training stopped cleanly on a signal (last.pt saved); run_cli exits with 128 + the signal's
    number, the shell's code for a process ended by that signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(error):
    """The message of `error`. An exception raised in a DataLoader worker comes back as the
    worker's whole traceback ("Caught ValueError in DataLoader worker process 0. Original
    Traceback ..."); its last line holds the original message."""
    message = str(error)
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ":") else last
    return message


def run_cli(main):
    """Run main(); a ValueError, FileNotFoundError or FloatingPointError (bad input, missing file,
    non-finite loss) becomes one line "error: ..." on stderr and exit status 2, also when a
    DataLoader worker raised it; Interrupted becomes its one-line message and 128 + the signal."""
    try:
        main()
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
