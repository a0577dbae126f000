"""Forward + backward time and peak extra memory of the distillation losses alone.

    python bench/loss_speed.py                      # B=8, C=19, 64x128 (a 512x1024 crop at stride 8)
    python bench/loss_speed.py --dtype bfloat16     # logits as they arrive from bf16 autocast

Peak memory is what the loss allocates on top of its inputs, read from the CUDA allocator; on a
CPU it is not measured. Prints a table and writes JSON to bench/results/.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fckd  # noqa: E402
from bench.common import describe_run, save_results  # noqa: E402


def losses():
    """The losses timed: FCKD under readings with and without enhancement, then KD and CWD."""
    readings = {
        "fckd revision 1: multiply, dot, gamma 1": dict(apply="multiply", similarity="dot", gamma=1.0),
        "fckd multiply, no enhancement (gamma 0)": dict(apply="multiply", gamma=0.0),
        "fckd mask, dot, gamma 1": dict(apply="mask", similarity="dot", gamma=1.0),
        "fckd mask, cosine, gamma 1": dict(apply="mask", similarity="cosine", gamma=1.0),
        "fckd default: mask, no enhancement (gamma 0)": dict(apply="mask", gamma=0.0),
    }
    timed = {}
    for name, options in readings.items():
        fckd_loss = fckd.FCKDLoss(**options)
        timed[name] = lambda s, t, fckd_loss=fckd_loss: fckd_loss(s, t)["loss"]
    return {**timed, "kd": fckd.spatial_kd, "cwd": fckd.channel_kd}


def measure(loss_fn, student, teacher, iters, warmup):
    """Mean seconds of one forward + backward, and the peak bytes allocated above the inputs."""
    cuda = student.device.type == "cuda"
    for _ in range(warmup):
        loss_fn(student, teacher).backward()
    if cuda:
        torch.cuda.synchronize()
        student.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(iters):
        student.grad = None
        loss_fn(student, teacher).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return seconds, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.classes, *args.size)
    teacher = torch.randn(shape, device=device, dtype=dtype) * 3
    student = (torch.randn(shape, device=device, dtype=dtype) * 3).requires_grad_()

    rows = []
    for name, loss_fn in losses().items():
        seconds, peak = measure(loss_fn, student, teacher, args.iters, args.warmup)
        rows.append({"loss": name, "ms": seconds * 1e3, "peak_extra_MiB": None if peak is None else peak / 2**20})

    header = {**describe_run("loss_speed.py", argv, device), "shape": list(shape), "dtype": args.dtype}
    print(f"{header['device']}, torch {header['torch']}, logits {shape} {args.dtype}")
    print(f"{'loss':<46}{'fwd+bwd ms':>12}{'peak extra MiB':>16}")
    for row in rows:
        peak = "n/a" if row["peak_extra_MiB"] is None else f"{row['peak_extra_MiB']:.1f}"
        print(f"{row['loss']:<46}{row['ms']:>12.2f}{peak:>16}")
    save_results(args.out, f"loss_speed_{device.type}_{args.dtype}.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
