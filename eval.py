"""
Evaluate a train.py checkpoint: per-class IoU and Acc, aAcc, mAcc and mIoU on whole images.

    python eval.py --ckpt runs/voc_deeplabv3_resnet18_fckd/best.pt
    python eval.py --ckpt best.pt --flip --scales 0.5 0.75 1.0 1.25 1.5 1.75
    python eval.py --ckpt best.pt --window 512 1024          # sliding window, for large images
    torchrun --nproc_per_node=8 eval.py --ckpt best.pt        # each rank a share of the images
    python eval.py --ckpt student.pt --teacher-ckpt teacher.pt --save-dir pictures
    python eval.py --ckpt best.pt --export student.pt2 --export-size 512 512   # deploy: no evaluation

The model, dataset and data root come from the checkpoint; --dataset/--data-root/--split
override them, and --frames scores the frames a list names only. A checkpoint scored on another
dataset (CamVid <-> IDD-Lite) is scored over the classes the two share (data.CLASS_CORRESPONDENCE:
a finer model's class probabilities summed within each shared class, a finer label map mapped),
on frames resized to the width of the frames it trained on:

    python eval.py --ckpt runs/camvid/best.pt --dataset idd_lite --data-root data/idd20k_lite
 --save-dir writes, for the first --save-max images, image | label | prediction
side by side, and with --teacher-ckpt the teacher's normalised pixel entropy and FCKD's hard
condensation matrix (white = pixels FCKD distils, black = pixels it drops) as grey pictures.

--export writes the checkpoint's net as a torch.export program, in eval mode on the CPU, and
exits without evaluating. It takes a float32 batch N x 3 x H x W, normalised as data.py
normalises images, and returns the N x K x H x W logits (the net's "out", upsampled bilinearly
as eval.py predicts), a plain tensor: batch size dynamic, input size fixed at export. It loads
without this project's files:

    program = torch.export.load("student.pt2")
    logits = program.module()(images)
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import save_image

from data import (DATASET_NAMES, DATASETS, IGNORE_INDEX, MEAN, STD, SYNTHETIC_SIZE, Frames, SharedLabels,
                  listed_indices, shared_classes)
from fckd import DEFAULT_KEEP, DEFAULT_THRESHOLD, condensation_matrix, pixel_entropy
from run import atomic_write, model_from_checkpoint, run_cli
from utils import (autocast, check_num_classes, dataset_from_checkpoint, evaluate, format_metrics, is_main,
                   memory_format, resolve_amp, segmentation_metrics, setup_distributed, teardown_distributed, upsample,
                   writable_file, writable_folder)

IGNORE_COLOUR = (255, 255, 255)  # white: several palettes use black for a real class
SCALES = (0.25, 4.0)  # beyond these an image is a few logits wide, or 16 times the pixels of the original
MIN_EXPORT_SIZE = 32  # pixels a side, as train.py's MIN_CROP: the smallest input the nets are trained on
MAX_EXPORT_SIZE = 4096  # pixels a side: tracing a batch of 2 larger than this asks for tens of GB
EXPORT_BATCH = 2  # the example batch torch.export traces: a batch of 1 would fix the batch size at 1
# the flags of an evaluation, which --export (export only) would silently ignore
EVALUATION_FLAGS = ("dataset", "data_root", "split", "image_scale", "classes", "frames", "flip", "scales", "window", "amp", "workers",
                    "json", "save_dir", "save_max", "teacher_ckpt", "fckd_threshold")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt or last.pt)")
    p.add_argument("--dataset", choices=DATASET_NAMES, help="default: the checkpoint's")
    p.add_argument("--data-root", help="default: the checkpoint's, when the dataset is the checkpoint's")
    p.add_argument("--split", default="val", help="val (default), or test for camvid")
    p.add_argument("--image-scale", type=float, help="resize the images by this factor in (0, 1] (default: the "
                   "checkpoint's; on another dataset, the factor that gives its frames the width of the ones the "
                   "model trained on); the scores are always against the full-resolution labels")
    p.add_argument("--classes", choices=DATASET_NAMES, metavar="DATASET",
                   help="score over the classes of this dataset, through data.CLASS_CORRESPONDENCE (default: the scored "
                        "dataset's own; on another dataset than the checkpoint's, the coarser set's)")
    p.add_argument("--frames", metavar="FILE", help="score only the frames of the split this file lists (one a line, "
                   "named as --labelled-list names them)")
    p.add_argument("--flip", action="store_true", help="also predict the mirrored image and average")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help=f"image scales to average over, each in [{SCALES[0]}, {SCALES[1]}] (default: 1.0)")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"),
                   help="sliding-window size, at least the model's output stride (default: whole image)")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), help="autocast dtype (default: bf16 on CUDA, off on CPU)")
    p.add_argument("--workers", type=int, help="data loading processes per rank (default: the training run's)")
    p.add_argument("--json", help="write aAcc, mAcc, mIoU (percent) and per_class to this file")
    p.add_argument("--save-dir", help="write colour-coded predictions (and teacher pictures) here")
    p.add_argument("--save-max", type=int, default=20, help="pictures of the first N images (default: %(default)s)")
    p.add_argument("--teacher-ckpt", help="with --save-dir: also picture this teacher's entropy and condensation")
    p.add_argument("--fckd-threshold", type=float, help="entropy threshold of the pictured hard condensation matrix "
                   f"(default: the student's --fckd-threshold if it was trained with one, else {DEFAULT_THRESHOLD}); "
                   "the matrix is the student's own kind (its --fckd-condense, --fckd-keep)")
    p.add_argument("--export", metavar="PATH",
                   help="write the net as a torch.export program (.pt2) to this new file and exit without evaluating; "
                   "it maps a normalised float32 batch N x 3 x H x W to its N x K x H x W logits: batch size dynamic, "
                   "input size fixed at export (--export-size). An existing file is never overwritten")
    p.add_argument("--export-size", type=int, nargs=2, metavar=("H", "W"),
                   help=f"with --export: the input size, each side at least {MIN_EXPORT_SIZE} (default: the "
                   "training crop size of the checkpoint's run; for the synthetic set its image size)")
    args = p.parse_args(argv)
    check_flags(p, args)
    return args


def check_flags(p, args):
    """argparse's usage error (exit 2) for an empty path, a number out of range, and a flag that
    this evaluation would not use."""
    for flag in ("ckpt", "data_root", "frames", "json", "save_dir", "teacher_ckpt", "export"):
        if getattr(args, flag) == "":
            p.error(f"--{flag.replace('_', '-')} is empty: give a path, or leave the flag out")
    if not all(SCALES[0] <= s <= SCALES[1] for s in args.scales):  # NaN fails too
        p.error(f"--scales must each be in [{SCALES[0]}, {SCALES[1]}], got {' '.join(map(str, args.scales))}")
    if args.image_scale is not None and not 0 < args.image_scale <= 1:  # NaN fails too
        p.error(f"--image-scale must be in (0, 1], got {args.image_scale}")
    if args.window and min(args.window) < 1:
        p.error(f"--window must be positive, got {args.window}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.teacher_ckpt and not args.save_dir:
        p.error("--teacher-ckpt is only used for the pictures: pass --save-dir too")
    if args.fckd_threshold is not None and not args.teacher_ckpt:
        p.error("--fckd-threshold is only used for the teacher's pictures: pass --teacher-ckpt and --save-dir too")
    if args.export_size and not args.export:
        p.error("--export-size is only used with --export: pass --export PATH too")
    if args.export_size and not MIN_EXPORT_SIZE <= min(args.export_size) <= max(args.export_size) <= MAX_EXPORT_SIZE:
        p.error(f"--export-size must be two ints from {MIN_EXPORT_SIZE} to {MAX_EXPORT_SIZE}, got "
                f"{' '.join(map(str, args.export_size))}")
    if args.export:
        ignored = [f"--{key.replace('_', '-')}" for key in EVALUATION_FLAGS if getattr(args, key) != p.get_default(key)]
        if ignored:
            p.error(f"--export writes the program and exits without evaluating: drop {' '.join(ignored)}")


def colourise(label, palette):
    """H x W class ids -> 3 x H x W colours in [0, 1] (save_image's range), IGNORE_COLOUR for 255."""
    lut = torch.zeros(256, 3)
    lut[:len(palette)] = torch.tensor(palette, dtype=torch.float32) / 255
    lut[IGNORE_INDEX] = torch.tensor(IGNORE_COLOUR, dtype=torch.float32) / 255
    return lut[label.cpu()].permute(2, 0, 1)


def to_rgb(image):
    """Normalised 3 x H x W image -> 3 x H x W in [0, 1], undoing data.py's MEAN/STD."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (image.float().cpu() * std + mean).clamp(0, 1)


def to_grey(values):
    """1 x 1 x H x W in [0, 1] -> H x W uint8, for a one-channel PNG (save_image would write three)."""
    return (values[0, 0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()


def main(argv=None):
    args = parse_args(argv)
    _, _, device = setup_distributed()
    try:
        if args.export:
            if is_main():  # one program, one writer (under torchrun the other ranks have nothing to do)
                export_checkpoint(args)
        else:
            evaluate_checkpoint(args, device)
    finally:
        teardown_distributed()


def evaluate_checkpoint(args, device):
    """Score --ckpt on --split and print the table (rank 0), with --json and --save-dir's pictures."""
    # where the results go is checked before anything is loaded or evaluated
    if args.json and is_main():
        writable_file(args.json, "--json")
    if args.save_dir:
        writable_folder(args.save_dir, "--save-dir")
    model, checkpoint = model_from_checkpoint(args.ckpt)
    stride = checkpoint["model_options"].get("output_stride", 8)
    if args.window and min(args.window) < stride:  # each window would give a single logit, for minutes
        raise ValueError(f"--window {args.window[0]} {args.window[1]} is smaller than the output stride {stride} "
                         f"of {args.ckpt}: pass a window of at least {stride} x {stride}, or none (whole images)")
    dataset_name = args.dataset or checkpoint["dataset"]
    model, dataset, over = scored_data(args, model, checkpoint, dataset_name)
    model.to(device, memory_format=memory_format(device))
    amp = resolve_amp(args.amp, device)
    workers = args.workers if args.workers is not None else checkpoint["args"].get("workers", 0)
    save_pictures = picture_writer(args, checkpoint, dataset, dataset_name, device, amp) if args.save_dir else None
    window = tuple(args.window) if args.window else None
    try:
        confusion = evaluate(model, dataset, device, amp, tuple(args.scales), args.flip, window, workers,
                             on_image=save_pictures, progress=True)
    except FloatingPointError as e:
        raise FloatingPointError(f"{args.ckpt} cannot be scored: {e} of the {dataset_name} {args.split} split") from e
    metrics = segmentation_metrics(confusion, dataset.class_names)
    if is_main():
        print(f"{args.ckpt} on {dataset_name} {args.split} ({len(dataset)} images; scales {args.scales}"
              f"{', flip' if args.flip else ''}{f', window {window}' if window else ''}{over})")
        print(format_metrics(metrics))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"checkpoint": args.ckpt, "dataset": dataset_name, "trained_on": checkpoint["dataset"],
                           "split": args.split, "frames": args.frames, **metrics}, f, indent=1)


def scored_data(args, model, checkpoint, dataset_name):
    """(model, dataset, what the scores are over) as they are scored: --dataset's --split (--frames of
    it). On a dataset other
    than the checkpoint's, or with --classes, both are mapped to the classes scored
    (data.shared_classes); on another dataset the frames are resized to the width the model trained
    at, unless --image-scale says otherwise."""
    trained_on, image_scale = checkpoint["dataset"], args.image_scale
    mapped = dataset_name != trained_on or args.classes not in (None, dataset_name)
    if mapped:
        groups, lut, classes = shared_classes(trained_on, dataset_name, args.classes)
        if args.teacher_ckpt:
            raise ValueError("--teacher-ckpt pictures a teacher over its own classes; drop it to score "
                             f"{args.ckpt} over {classes}'s")
    if dataset_name != trained_on and image_scale is None:
        width = DATASETS[trained_on].frame_width * (checkpoint["args"].get("image_scale") or 1.0)
        image_scale = width / DATASETS[dataset_name].frame_width
        if is_main():
            print(f"{dataset_name} frames resized by {image_scale:.4g} to {width:.0f} pixels wide, the width of "
                  f"the {trained_on} frames {args.ckpt} trained on")
    dataset = dataset_from_checkpoint(checkpoint, args.split, dataset_name, args.data_root, image_scale)
    if args.frames:
        dataset = Frames(dataset, listed_indices(dataset, args.frames, "--frames", args.split))
    if not mapped:
        check_num_classes(checkpoint, args.ckpt, dataset_name, dataset.num_classes)
        return model, dataset, ""
    if lut is not None:
        dataset = SharedLabels(dataset, lut, classes)
    model = model if groups is None else SharedClassLogits(model, groups)
    return model, dataset, f", over the classes of {classes} ({trained_on} model)"


class SharedClassLogits(torch.nn.Module):
    """A model of a finer class set, scored over a coarser one: the logit of shared class k is
    log sum_{c in groups[k]} softmax(z)_c, so that its softmax is the summed probability of the
    model's classes in that group."""

    def __init__(self, model, groups):
        super().__init__()
        self.model, self.groups = model, groups

    def forward(self, images):
        log_p = self.model(images)["out"].float().log_softmax(1)
        return {"out": torch.stack([log_p[:, group].logsumexp(1) for group in self.groups], 1)}


def picture_writer(args, checkpoint, dataset, dataset_name, device, amp):
    """evaluate()'s on_image for --save-dir: for the first --save-max images, image | label |
    prediction side by side, and with --teacher-ckpt the teacher's pixel entropy and condensation
    matrix: the student's (its --fckd-condense and --fckd-keep; hard for a student trained
    without FCKD), at --fckd-threshold, else the student's, else fckd.py's default."""
    teacher = None
    if args.teacher_ckpt:
        teacher, teacher_checkpoint = model_from_checkpoint(args.teacher_ckpt)
        check_num_classes(teacher_checkpoint, f"teacher checkpoint {args.teacher_ckpt}", dataset_name,
                          dataset.num_classes)
        teacher.eval().to(device, memory_format=memory_format(device))
    trained = checkpoint["args"]
    mode = trained.get("fckd_condense", "hard") if trained.get("kd") == "fckd" else "hard"
    if args.fckd_threshold is not None and mode != "hard":
        raise ValueError(f"--fckd-threshold sets a hard condensation's threshold; {args.ckpt} was trained with "
                         f"--fckd-condense {mode}, whose matrix is pictured: drop --fckd-threshold")
    threshold = args.fckd_threshold
    if threshold is None:
        threshold = trained.get("fckd_threshold", DEFAULT_THRESHOLD)
    keep_share = trained.get("fckd_keep", DEFAULT_KEEP)

    def save_pictures(index, image, label, prediction):
        if index >= args.save_max:
            return
        stem = os.path.join(args.save_dir, f"{index:05d}")
        size = label.shape[-2:]  # the image may have been scaled down (--image-scale), the label never is
        panels = [to_rgb(upsample(image.float(), size)[0]), colourise(label[0], dataset.palette),
                  colourise(prediction[0], dataset.palette)]
        save_image(panels, stem + ".png", nrow=3, padding=0)  # side by side
        if teacher is not None:
            with torch.no_grad(), autocast(device, amp):
                logits = teacher(image)["out"].float()
            entropy = upsample(pixel_entropy(logits), size)
            matrix = condensation_matrix(logits, mode, threshold, keep_share)
            keep = F.interpolate(matrix, size=size, mode="nearest")
            Image.fromarray(to_grey(entropy)).save(stem + "_entropy.png")
            Image.fromarray(to_grey(keep)).save(stem + "_condensation.png")

    return save_pictures


# -----------------------------------------------------------------------------
# --export: a deployable net


class LogitsAtInputSize(torch.nn.Module):
    """The net as deployed: N x 3 x H x W normalised images -> N x K x H x W float32 logits, the
    net's "out" upsampled as predict() does for one scale, and a plain tensor (no dict)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return upsample(self.model(images)["out"].float(), images.shape[-2:])


def new_file(path, flag):
    """ValueError naming `flag` if `path` exists (nothing overwrites a user's file unasked) or cannot be written."""
    if os.path.lexists(path):
        raise ValueError(f"{flag} {path} exists: remove it or pass another path (nothing is overwritten)")
    writable_file(path, flag)


def export_size(checkpoint, path):
    """--export-size's default: the training crop of the checkpoint's run, or the synthetic set's image size."""
    trained = checkpoint["args"]
    if checkpoint["dataset"] == "synthetic":
        side = trained.get("synthetic_size") or SYNTHETIC_SIZE
        return side, side
    crop = trained.get("crop_size")
    if not crop:
        raise ValueError(f"{path} stores no training crop size: pass --export-size H W")
    return (crop[0], crop[-1])  # H or H W


def export_checkpoint(args):
    """Write --ckpt's net (LogitsAtInputSize, eval mode, CPU) as a torch.export program at --export:
    the batch dimension dynamic, the input size --export-size or export_size's default."""
    new_file(args.export, "--export")  # before the checkpoint is loaded and the net traced
    model, checkpoint = model_from_checkpoint(args.ckpt)
    height, width = args.export_size or export_size(checkpoint, args.ckpt)
    net = LogitsAtInputSize(model).eval()
    example = torch.zeros(EXPORT_BATCH, 3, height, width)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    new_file(args.export, "--export")  # again: the tracing took a while, and atomic_write replaces any file
    atomic_write(args.export, lambda f: torch.export.save(program, f))
    print(f"wrote {args.export}: {checkpoint['model_name']} of {args.ckpt} as a torch.export program, "
          f"float32 N x 3 x {height} x {width} -> N x {checkpoint['num_classes']} x {height} x {width} logits "
          "(batch size N dynamic, input size fixed)")


if __name__ == "__main__":
    run_cli(main)
