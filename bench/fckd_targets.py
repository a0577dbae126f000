"""What FCKD's condensation and soft enhancement do to a trained teacher's targets, on a val split.

    python bench/fckd_targets.py --teacher-ckpt runs/accuracy/synthetic/teacher_s0/last.pt
    python bench/fckd_targets.py --teacher-ckpt T.pt --thresholds 0.5 0.7 1.0 --gamma 0.25

For each hard threshold (1.0 keeps every pixel) it runs the teacher on every val image and
reports, with M the condensation matrix, t~ = M t, and t_sp, t_ch the enhanced targets
(fckd.soft_enhance at --gamma):
- keep: mean(M), the share of pixels distilled.
- dropped mass: the share of a class's channel target softmax_N(t~_c / tau_c) that lies on the
  dropped pixels (where t~ = 0), for the classes the teacher predicts somewhere in the image
  ("present") and for the others ("absent").
- spatial attention, over the kept pixels i: exp(entropy) of the row softmax_j(<x_i, x_j> / sqrt C)
  (how many pixels a pixel effectively averages), its largest weight, and its weight on pixels of
  the teacher's own arg-max class.
- channel attention: exp(entropy) of each channel's row (how many channels it effectively
  averages), its weight on itself, and the share of channels whose largest weight is on another.
- arg-max changed: the share of kept pixels whose arg-max class t_sp (and t_ch) moves away from t's.
- accuracy (%) and top probability of the targets t and t_sp against the labels (logits upsampled to
  the label size as in training), over the kept pixels.

The attention matrices are formed explicitly here, one image at a time (N x N floats, 29 MB for a
360x480 CamVid frame at stride 8). Prints a table and writes bench/results/fckd_targets_DATASET_gammaG.json.
"""

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import describe_run, save_results  # noqa: E402
from data import IGNORE_INDEX  # noqa: E402
from fckd import condensation_matrix, soft_enhance  # noqa: E402
from utils import dataset_from_checkpoint, model_from_checkpoint, upsample  # noqa: E402

COLUMNS = ("keep", "dropped_mass_present", "dropped_mass_absent", "spatial_support", "spatial_top_weight",
           "spatial_same_class_weight", "channel_support", "channel_self_weight", "channel_attends_elsewhere",
           "argmax_changed_spatial", "argmax_changed_channel", "accuracy_t", "accuracy_t_sp", "top_prob_t",
           "top_prob_t_sp")


def target_statistics(logits, label, threshold, gamma, tau_channel):
    """Sums and counts (Counters) of every column for one image's teacher logits (1 x C x H x W) and
    label (1 x h x w)."""
    _, classes, height, width = logits.shape
    keep = condensation_matrix(logits, "hard", threshold)
    condensed = keep * logits
    spatial, channel = soft_enhance(condensed, "spatial", gamma), soft_enhance(condensed, "channel", gamma)
    kept = keep.flatten().bool()
    argmax = logits.argmax(1).flatten()
    sums, counts = Counter(), Counter()

    def add(name, values):
        sums[name] += values.sum().item()
        counts[name] += values.numel()

    add("keep", keep)
    present = torch.zeros(classes, dtype=torch.bool, device=logits.device)
    present[argmax.unique()] = True
    maps = condensed.flatten(2)[0]  # C x N
    mass = (torch.softmax(maps / tau_channel, dim=1) * (~kept)).sum(1)
    add("dropped_mass_present", mass[present])
    add("dropped_mass_absent", mass[~present])

    attention = torch.softmax(maps.T @ maps / math.sqrt(classes), dim=1)[kept]  # kept pixels x N
    add("spatial_support", torch.special.entr(attention).sum(1).exp())
    add("spatial_top_weight", attention.max(1).values)
    add("spatial_same_class_weight", (attention * (argmax[kept, None] == argmax[None, :])).sum(1))
    attention = torch.softmax(maps @ maps.T / math.sqrt(height * width), dim=1)  # C x C
    add("channel_support", torch.special.entr(attention).sum(1).exp())
    add("channel_self_weight", attention.diagonal())
    add("channel_attends_elsewhere", (attention.argmax(1) != torch.arange(classes, device=logits.device)).float())
    add("argmax_changed_spatial", (spatial.argmax(1).flatten() != argmax)[kept].float())
    add("argmax_changed_channel", (channel.argmax(1).flatten() != argmax)[kept].float())

    size = label.shape[-2:]
    valid = (label[0] != IGNORE_INDEX) & (upsample(keep, size)[0, 0] > 0.5)
    for name, target in (("t", logits), ("t_sp", spatial)):  # on kept pixels t~ = t
        probabilities = torch.softmax(upsample(target, size)[0], dim=0)
        top, predicted = probabilities.max(0)
        add(f"accuracy_{name}", (predicted == label[0])[valid].float() * 100)
        add(f"top_prob_{name}", top[valid])
    return sums, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-ckpt", required=True, help="a teacher checkpoint written by train.py")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--gamma", type=float, default=1.0, help="soft enhancement weight (default: %(default)s)")
    parser.add_argument("--tau-channel", type=float, default=4.0, help="default: %(default)s")
    parser.add_argument("--max-images", type=int, help="only the first N val images")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, checkpoint = model_from_checkpoint(args.teacher_ckpt)
    teacher.eval().to(device)
    dataset = dataset_from_checkpoint(checkpoint, "val")
    images = range(min(len(dataset), args.max_images or len(dataset)))

    totals = {threshold: (Counter(), Counter()) for threshold in args.thresholds}
    with torch.no_grad():
        for index in images:
            image, label = dataset[index]
            logits = teacher(image[None].to(device))["out"].float()
            for threshold in args.thresholds:
                sums, counts = target_statistics(logits, label[None].to(device), threshold, args.gamma,
                                                 args.tau_channel)
                totals[threshold][0].update(sums)
                totals[threshold][1].update(counts)
    rows = [{"threshold": threshold, **{name: sums[name] / counts[name] if counts[name] else None for name in COLUMNS}}
            for threshold, (sums, counts) in totals.items()]

    print(f"{args.teacher_ckpt} on {checkpoint['dataset']} val ({len(images)} images), gamma {args.gamma}")
    print("| " + " | ".join(("threshold", *COLUMNS)) + " |")
    print("|" + " --- |" * (len(COLUMNS) + 1))
    for row in rows:
        print("| " + " | ".join(["-" if row[k] is None else f"{row[k]:.3f}" for k in ("threshold", *COLUMNS)]) + " |")
    header = {**describe_run("fckd_targets.py", argv, device), "teacher_ckpt": args.teacher_ckpt,
              "dataset": checkpoint["dataset"], "images": len(images), "gamma": args.gamma}
    save_results(args.out, f"fckd_targets_{checkpoint['dataset']}_gamma{args.gamma:g}.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
