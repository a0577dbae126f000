"""What FCKD's condensation and soft enhancement do to a trained teacher's targets, on a val split.

    python bench/fckd_targets.py --teacher-ckpt runs/accuracy/synthetic/teacher_s0/last.pt
    python bench/fckd_targets.py --teacher-ckpt T.pt --readings "C1 revision 1: multiply, dot, threshold 0.7, gamma 1"
    python bench/fckd_targets.py --teacher-ckpt runs/accuracy/camvid-cpu/teacher_s0/last.pt --premise

--premise: the premise of condensation, before any training with it. For each condensation
(quantile keep 1, 0.9, 0.8, 0.6, 0.4; hard threshold 0.7, 0.5, 0.3, 0.2), the share of pixels kept
and the teacher's pixel accuracy on the labelled pixels it keeps and on those it drops: if
low-entropy pixels are not clearly more accurate, dropping the others has nothing to give.
Writes bench/results/fckd_premise_DATASET.json.

One row per FCKD reading (bench/accuracy.py's READINGS: apply, similarity, temperature, hard
threshold, gamma). For each, it runs the teacher on every val image and reports, with M the
condensation matrix, X the teacher logits the reading enhances (M t under multiply, t under
mask), w the pixel weights (1 under multiply, M under mask) and t_sp, t_ch the enhanced targets
(fckd.soft_enhance):
- keep: mean(M), the share of pixels distilled.
- dropped mass: the share of a class's channel target softmax_N(X_c / tau_c + log w) that lies
  on the dropped pixels, for the classes the teacher predicts somewhere in the image ("present")
  and for the others ("absent"). Under mask it is 0 by construction.
- spatial attention (readings with the enhancement only), over the kept pixels i: the row softmax_j(score(x_i, x_j) + log w_j);
  exp(entropy) of it (how many pixels a pixel effectively averages), its weight on pixel i
  itself, its largest weight, and its weight on pixels of the teacher's own arg-max class.
- channel attention (likewise): exp(entropy) of each channel's row softmax_d(score(X_c w, X_d w)) (how many
  channels it effectively averages), its weight on itself, and the share of channels whose
  largest weight is on another.
- arg-max changed: the share of kept pixels whose arg-max class t_sp (and t_ch) moves away from t's.
- accuracy (%) and top probability of the targets t and t_sp against the labels (logits upsampled to
  the label size as in training), over the kept pixels.

The attention matrices are formed explicitly here, one image at a time (N x N floats, 29 MB for a
360x480 CamVid frame at stride 8). Prints a table and writes bench/results/fckd_targets_DATASET.json.
"""

import argparse
import functools
import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.accuracy import READINGS  # noqa: E402
from bench.common import describe_run, save_results  # noqa: E402
from data import IGNORE_INDEX  # noqa: E402
from fckd import DEFAULT_SIMILARITY, DEFAULT_TEMPERATURE, condensation_matrix, soft_enhance  # noqa: E402
from run import model_from_checkpoint  # noqa: E402
from utils import dataset_from_checkpoint, upsample  # noqa: E402

PREMISE = [("quantile", keep) for keep in (1.0, 0.9, 0.8, 0.6, 0.4)] + \
          [("hard", threshold) for threshold in (0.7, 0.5, 0.3, 0.2)]
PREMISE_COLUMNS = ("keep", "labelled_kept", "accuracy_kept", "accuracy_dropped")
COLUMNS = ("keep", "dropped_mass_present", "dropped_mass_absent", "spatial_support", "spatial_self_weight",
           "spatial_top_weight", "spatial_same_class_weight", "channel_support", "channel_self_weight",
           "channel_attends_elsewhere", "argmax_changed_spatial", "argmax_changed_channel", "accuracy_t",
           "accuracy_t_sp", "top_prob_t", "top_prob_t_sp")


def attention_weights(vectors, similarity, temperature, log_weights=None):
    """Row-softmax of the scores between the rows of `vectors` (n x L), + log w on the columns: n x n."""
    if similarity == "cosine":
        unit = F.normalize(vectors, dim=1, eps=1e-12)
        scores = unit @ unit.T / temperature
    else:
        scores = vectors @ vectors.T / math.sqrt(vectors.shape[1])
    return torch.softmax(scores if log_weights is None else scores + log_weights, dim=1)


def accumulate(sums, counts, name, values):
    """Add a tensor's sum and element count to the Counters under `name` (their ratio: its mean)."""
    sums[name] += values.sum().item()
    counts[name] += values.numel()


def target_statistics(logits, label, reading, tau_channel):
    """Sums and counts (Counters) of every column for one image's teacher logits (1 x C x H x W),
    label (1 x h x w) and reading (FCKDLoss keyword arguments, as in bench/accuracy.py's READINGS)."""
    classes = logits.shape[1]
    similarity = reading.get("similarity", DEFAULT_SIMILARITY)  # gamma 0 (no enhancement): t_sp = t_ch = X
    temperature, gamma = reading.get("temperature", DEFAULT_TEMPERATURE), reading["gamma"]
    keep = condensation_matrix(logits, "hard", reading["threshold"])
    masked = reading["apply"] == "mask"
    x, weights = (logits, keep) if masked else (keep * logits, None)
    options = dict(gamma=gamma, similarity=similarity, temperature=temperature, weights=weights)
    spatial, channel = soft_enhance(x, "spatial", **options), soft_enhance(x, "channel", **options)
    kept = keep.flatten().bool()
    log_w = torch.zeros_like(keep.flatten()) if not masked else torch.where(kept, 0.0, -math.inf)
    argmax = logits.argmax(1).flatten()
    sums, counts = Counter(), Counter()
    add = functools.partial(accumulate, sums, counts)
    add("keep", keep)
    present = torch.zeros(classes, dtype=torch.bool, device=logits.device)
    present[argmax.unique()] = True
    maps = x.flatten(2)[0]  # C x N
    if kept.any() or not masked:  # under mask an image with no pixel kept has no channel target at all
        mass = (torch.softmax(maps / tau_channel + log_w, dim=1) * (~kept)).sum(1)
        add("dropped_mass_present", mass[present])
        add("dropped_mass_absent", mass[~present])

    enhanced = reading.get("enhance", True)  # without the enhancement there is no attention to describe
    if enhanced and kept.any():
        attention = attention_weights(maps.T, similarity, temperature, log_w)[kept]  # kept pixels x N
        add("spatial_support", torch.special.entr(attention).sum(1).exp())
        add("spatial_self_weight", attention[:, kept].diagonal())
        add("spatial_top_weight", attention.max(1).values)
        add("spatial_same_class_weight", (attention * (argmax[kept, None] == argmax[None, :])).sum(1))
    if enhanced:
        probes = maps * keep.flatten() if masked else maps
        attention = attention_weights(probes, similarity, temperature)  # C x C
        add("channel_support", torch.special.entr(attention).sum(1).exp())
        add("channel_self_weight", attention.diagonal())
        add("channel_attends_elsewhere",
            (attention.argmax(1) != torch.arange(classes, device=logits.device)).float())
    add("argmax_changed_spatial", (spatial.argmax(1).flatten() != argmax)[kept].float())
    add("argmax_changed_channel", (channel.argmax(1).flatten() != argmax)[kept].float())

    size = label.shape[-2:]
    valid = (label[0] != IGNORE_INDEX) & (upsample(keep, size)[0, 0] > 0.5)
    for name, target in (("t", logits), ("t_sp", spatial)):  # on kept pixels X = t under both readings
        probabilities = torch.softmax(upsample(target, size)[0], dim=0)
        top, predicted = probabilities.max(0)
        add(f"accuracy_{name}", (predicted == label[0])[valid].float() * 100)
        add(f"top_prob_{name}", top[valid])
    return sums, counts


def premise_statistics(logits, label, condense, value):
    """Sums and counts (Counters) of PREMISE_COLUMNS for one image: M = condensation_matrix(logits,
    condense, threshold or keep = value) at the logits' size; the labelled pixels kept or dropped
    are those where M, upsampled to the label size, is above or below 1/2."""
    option = {"keep": value} if condense == "quantile" else {"threshold": value}
    keep = condensation_matrix(logits, condense, **option)
    size = label.shape[-2:]
    kept = upsample(keep, size)[0, 0] > 0.5
    labelled = label[0] != IGNORE_INDEX
    correct = (upsample(logits, size)[0].argmax(0) == label[0]).float() * 100
    sums, counts = Counter(), Counter()
    for name, values in (("keep", keep), ("labelled_kept", kept[labelled].float()),
                         ("accuracy_kept", correct[labelled & kept]), ("accuracy_dropped", correct[labelled & ~kept])):
        accumulate(sums, counts, name, values)
    return sums, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-ckpt", required=True, help="a teacher checkpoint written by train.py")
    parser.add_argument("--readings", nargs="+", choices=READINGS, default=list(READINGS), metavar="NAME",
                        help="rows of bench/accuracy.py's READINGS (default: all)")
    parser.add_argument("--tau-channel", type=float, default=4.0, help="default: %(default)s")
    parser.add_argument("--max-images", type=int, help="only the first N val images")
    parser.add_argument("--premise", action="store_true",
                        help="the condensations' keep ratio and teacher accuracy on kept vs dropped pixels instead")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, checkpoint = model_from_checkpoint(args.teacher_ckpt)
    teacher.eval().to(device)
    dataset = dataset_from_checkpoint(checkpoint, "val")
    images = range(min(len(dataset), args.max_images or len(dataset)))

    # per row: what it is (in the JSON) and the function of (logits, label) that measures it
    if args.premise:
        described = {f"{c} {v}": dict(condense=c, value=v) for c, v in PREMISE}
        statistics = {name: functools.partial(premise_statistics, **d) for name, d in described.items()}
        columns = PREMISE_COLUMNS
    else:
        described = {name: READINGS[name] for name in args.readings}
        statistics = {name: functools.partial(target_statistics, reading=reading, tau_channel=args.tau_channel)
                      for name, reading in described.items()}
        columns = COLUMNS
    names = list(described)
    totals = {name: (Counter(), Counter()) for name in names}
    with torch.no_grad():
        for index in images:
            image, label = dataset[index]
            logits = teacher(image[None].to(device))["out"].float()
            for name in names:
                sums, counts = statistics[name](logits, label[None].to(device))
                totals[name][0].update(sums)
                totals[name][1].update(counts)
    rows = [{"reading": name, **described[name],
             **{column: sums[column] / counts[column] if counts[column] else None for column in columns}}
            for name, (sums, counts) in totals.items()]

    print(f"{args.teacher_ckpt} on {checkpoint['dataset']} val ({len(images)} images)")
    print("| " + " | ".join(("reading", *columns)) + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for row in rows:
        print("| " + " | ".join([row["reading"], *("-" if row[k] is None else f"{row[k]:.3f}" for k in columns)])
              + " |")
    header = {**describe_run("fckd_targets.py", argv, device), "teacher_ckpt": args.teacher_ckpt,
              "dataset": checkpoint["dataset"], "images": len(images)}
    kind = "premise" if args.premise else "targets"
    save_results(args.out, f"fckd_{kind}_{checkpoint['dataset']}.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
