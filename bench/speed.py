"""Speed of the distillation training step, as train.py runs it.

    python bench/speed.py                      # batch 8, 512x1024, 19 classes, R101 teacher, R18 student
    python bench/speed.py --compile            # torch.compile the student, the teacher and the loss
    python bench/speed.py --device cpu --batch 2 --crop 64 64 --width 0.25 --iters 3

For each mode (student alone; student + teacher forward with no distillation loss; each loss of
losses.LOSSES: FCKD, KD, CWD) and precision (fp32, bf16 autocast) it times whole training steps (forward, backward,
SGD update) after a warm-up, with CUDA synchronisation, and reports images/s, the FLOPs of one
step counted by torch.utils.flop_counter.FlopCounterMode (per image, in TFLOP), the achieved
TFLOP/s, and the peak memory allocated on CUDA. Prints a table and writes JSON to bench/results/.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import describe_run, save_results  # noqa: E402
from losses import DEFAULT_FLAGS, LOSSES, distillation  # noqa: E402
from models import build_model  # noqa: E402
from train import make_optimizer, train_losses  # noqa: E402
from utils import autocast, use_fast_cuda_kernels  # noqa: E402

# the student alone, with the teacher's forward and no loss on it, and each distillation loss at train.py's defaults
MODES = ("student", "student+teacher", *LOSSES)


def make_step(mode, student, teacher, optimizer, device, amp, compile_loss):
    """One training step of train.py's objective for `mode`; returns the loss tensor (no sync)."""
    if mode in LOSSES:
        distill = distillation(mode, DEFAULT_FLAGS)
        if compile_loss:
            distill = torch.compile(distill)
    else:
        distill = lambda s, t: {}  # noqa: E731  student+teacher: the teacher's forward, no loss on it
    use_teacher = teacher if mode != "student" else None

    def step(images, labels):
        with autocast(device, amp):
            losses = train_losses(student, images, labels, use_teacher, distill)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return losses["loss"]

    return step


def measure(step, images, labels, iters, warmup):
    """(seconds per step, FLOPs of one step, peak bytes on CUDA or None)."""
    cuda = images.device.type == "cuda"
    for _ in range(warmup):
        step(images, labels)
    counter = FlopCounterMode(display=False)
    with counter:
        step(images, labels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step(images, labels)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    return seconds, counter.get_total_flops(), torch.cuda.max_memory_allocated() if cuda else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--student", default="deeplabv3_resnet18")
    parser.add_argument("--teacher", default="deeplabv3_resnet101")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of both nets")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the nets and the loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    if cuda:  # as train.py runs its steps: cuDNN autotuning, TF32 matmuls
        use_fast_cuda_kernels()
    torch.manual_seed(0)
    student = build_model(args.student, args.classes, width=args.width).to(device, memory_format=memory_format)
    teacher = build_model(args.teacher, args.classes, width=args.width, aux=False)
    teacher = teacher.requires_grad_(False).eval().to(device, memory_format=memory_format)
    student_run, teacher_run = (torch.compile(student), torch.compile(teacher)) if args.compile else (student, teacher)
    optimizer = make_optimizer(student, 1e-4, 1e-4, device)
    images = torch.randn(args.batch, 3, *args.crop, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.classes, (args.batch, *args.crop), device=device)

    rows = []
    for amp in ("off" if p == "fp32" else p for p in args.precisions):
        for mode in args.modes:
            step = make_step(mode, student_run, teacher_run, optimizer, device, amp, args.compile)
            seconds, flops, peak = measure(step, images, labels, args.iters, args.warmup)
            rows.append({"mode": mode, "precision": "fp32" if amp == "off" else amp,
                         "images_per_s": args.batch / seconds, "tflop_per_image": flops / args.batch / 1e12,
                         "tflop_per_s": flops / seconds / 1e12,
                         "peak_memory_GiB": None if peak is None else peak / 2**30})

    header = {**describe_run("speed.py", argv, device), "batch": args.batch, "crop": list(args.crop), "classes": args.classes,
              "student": args.student, "teacher": args.teacher, "width": args.width, "compile": args.compile}
    print(f"{header['device']}, torch {header['torch']}: {args.teacher} -> {args.student} (width {args.width}), "
          f"batch {args.batch}, {args.crop[0]}x{args.crop[1]}, {args.classes} classes, compile {args.compile}")
    print(f"{'mode':<17}{'precision':>10}{'img/s':>10}{'TFLOP/img':>11}{'TFLOP/s':>10}{'peak GiB':>10}")
    for row in rows:
        peak = "n/a" if row["peak_memory_GiB"] is None else f"{row['peak_memory_GiB']:.2f}"
        print(f"{row['mode']:<17}{row['precision']:>10}{row['images_per_s']:>10.2f}{row['tflop_per_image']:>11.4f}"
              f"{row['tflop_per_s']:>10.2f}{peak:>10}")
    save_results(args.out, f"speed_{device.type}{'_compile' if args.compile else ''}.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
