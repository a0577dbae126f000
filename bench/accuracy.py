"""Accuracy of the FCKD student against the baseline, KD and CWD students, over seeds.

    python bench/accuracy.py --jobs 2                 # synthetic set, 3 seeds: 33 minutes on a 2-core CPU
    python bench/accuracy.py --table ablation --jobs 2  # FCKD's parts, 3 seeds: 30 runs of about 5 minutes
    python bench/accuracy.py --table screen --jobs 2    # revision 2's candidates and their ablation rows
    python bench/accuracy.py --setting camvid         # CamVid in data/camvid: R101 teacher, R18 students (GPU)
    python bench/accuracy.py --setting camvid-cpu --table finalists-rev2 --jobs 2 -- --data-root ../shared/camvid
                                                      # CamVid at half scale, 2-core CPU: 132 min (docs/results.md)
    python bench/accuracy.py --setting camvid-cpu-patient --table pilot --jobs 2 -- --data-root ../shared/camvid
    python bench/accuracy.py --setting camvid-cpu-fewlabels --table pilot --jobs 2 -- --data-root ../shared/camvid
                                                      # the instrument pilot's settings S1 and S2 (docs/results.md)
    python bench/accuracy.py --setting idd-lite-cpu-fewlabels8 --table pilot --jobs 2 -- --data-root data/idd20k_lite
                                                      # the IDD-Lite pilot's settings I1-I3 (docs/results.md)
    python bench/accuracy.py --table ablation --rows baseline "fckd soft" --jobs 2   # a part of a table
    python bench/accuracy.py -- --amp off             # everything after -- goes to every train.py run

Trains the teacher once (seed 0), and every student with --seed s, each with train.py at the
setting's budget (--jobs N: N runs at a time, the CPU threads split between them; students
without a teacher train beside it), and
evaluates the weights of the last iteration with eval.py on the val split (no checkpoint is
picked on the val split). Prints a table of mIoU and mAcc, mean +- sample std over the seeds with
the per-seed values, and writes it to bench/results/accuracy_SETTING[_TABLE].json.

Resumable: run NAME_sSEED lives in runs/accuracy/SETTING/NAME_sSEED; one with a result.json is not
run again (if train.py's resume check finds it was trained with this run's settings), and an
interrupted one continues from its last.pt (train.py --resume auto).
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from bench.common import describe_run, save_results  # noqa: E402
from run import check_resumed_settings, input_fingerprints  # noqa: E402

# The synthetic setting is the quick start's (train.py's synthetic defaults). The CamVid one trains
# from scratch: no ImageNet weights exist on our machines.
SETTINGS = {
    "synthetic": {
        "common": ["--dataset", "synthetic"],
        "teacher": ["--model", "deeplabv3_resnet18", "--width", "0.5"],
        "student": ["--model", "deeplabv3_resnet18", "--width", "0.125"],
    },
    "camvid": {
        "common": ["--dataset", "camvid", "--iters", "2000", "--batch-size", "16", "--crop-size", "360",
                   "--lr", "0.05", "--val-every", "2000"],
        "teacher": ["--model", "deeplabv3_resnet101"],
        "student": ["--model", "deeplabv3_resnet18"],
    },
    # Sized (README, "CamVid on a CPU") for a 2-core machine, two runs at a time, one thread each:
    # half-scale frames, a wider and 3x longer-trained teacher than the students.
    "camvid-cpu": {
        "common": ["--dataset", "camvid", "--image-scale", "0.5", "--crop-size", "128", "160", "--batch-size", "8",
                   "--lr", "0.1", "--workers", "0", "--save-every", "200", "--val-every", "100000"],
        "teacher": ["--model", "deeplabv3_resnet18", "--width", "0.5", "--iters", "1800"],
        "student": ["--model", "deeplabv3_resnet18", "--width", "0.25", "--iters", "600"],
    },
    # The instrument pilot (README, "The instrument pilot"), two settings beside camvid-cpu (S0).
    # S1, patient: whole quarter-scale frames, students and teacher trained 3x longer than S0's.
    "camvid-cpu-patient": {
        "common": ["--dataset", "camvid", "--image-scale", "0.25", "--crop-size", "96", "128", "--batch-size", "8",
                   "--lr", "0.1", "--workers", "0", "--save-every", "200", "--val-every", "100000"],
        "teacher": ["--model", "deeplabv3_resnet18", "--width", "0.5", "--iters", "5400"],
        "student": ["--model", "deeplabv3_resnet18", "--width", "0.25", "--iters", "1800"],
    },
}
# IDD-Lite (docs/results.md, "IDD-Lite: the pilot"): half-scale frames (160 x 113, crops of 112 x 160
# hold nearly a whole frame), a teacher 6x longer-trained than the students on every label; the
# students see the labels of 1 frame in 8 (or 16) only, and the distilled ones as many unlabelled
# frames a batch again, which feed the distillation loss alone.
SETTINGS["idd-lite-cpu"] = {
    "common": ["--dataset", "idd_lite", "--image-scale", "0.5", "--crop-size", "112", "160", "--batch-size", "8",
               "--lr", "0.1", "--workers", "0", "--save-every", "200", "--val-every", "100000"],
    "teacher": ["--model", "deeplabv3_resnet18", "--width", "0.5", "--iters", "10800"],
    "student": ["--model", "deeplabv3_resnet18", "--width", "0.125", "--iters", "1800"],
}
# The IDD-Lite pilot's settings I1-I3: idd-lite-cpu's teacher run; every score also on the two val halves
IDD_LITE_HALVES = ("bench/idd_lite_val_half_a.txt", "bench/idd_lite_val_half_b.txt")
IDD_LITE_RULE = dict(teacher_room=3.0, max_baseline_std=1.0, min_half_gain=1.0)  # beside the CamVid pilot's
SETTINGS["idd-lite-cpu"]["halves"] = IDD_LITE_HALVES
for share in (8, 16):
    SETTINGS[f"idd-lite-cpu-fewlabels{share}"] = {
        **SETTINGS["idd-lite-cpu"], "teacher_setting": "idd-lite-cpu", "pilot_rule": IDD_LITE_RULE,
        "student": [*SETTINGS["idd-lite-cpu"]["student"], "--labelled-list", f"bench/idd_lite_train_1in{share}.txt"]}
SETTINGS["idd-lite-cpu-patient"] = {
    **SETTINGS["idd-lite-cpu"], "teacher_setting": "idd-lite-cpu", "pilot_rule": IDD_LITE_RULE,
    "student": ["--model", "deeplabv3_resnet18", "--width", "0.125", "--iters", "5400"]}
# S2, few labels: S0's teacher (the same run) and schedule; the students get the labels of every
# 8th line of CamVid's train.txt only, and distil on every frame.
SETTINGS["camvid-cpu-fewlabels"] = {
    **SETTINGS["camvid-cpu"], "teacher_setting": "camvid-cpu",
    "student": [*SETTINGS["camvid-cpu"]["student"], "--labelled-list", "bench/camvid_train_1in8.txt"]}
METHODS = {"baseline": [], "kd": ["--kd", "kd"], "cwd": ["--kd", "cwd"], "fckd": ["--kd", "fckd"]}
ABLATION = {  # FCKD with one part changed; "fckd" is FCKDLoss's defaults (hard 0.7, mask, no enhancement)
    "baseline": [],
    "fckd": ["--kd", "fckd"],
    "fckd hard 0.3": ["--kd", "fckd", "--fckd-threshold", "0.3"],
    "fckd hard 0.5": ["--kd", "fckd", "--fckd-threshold", "0.5"],
    "fckd soft": ["--kd", "fckd", "--fckd-condense", "soft"],
    "fckd no condensation (= KD + CWD)": ["--kd", "fckd", "--fckd-condense", "none"],
    "fckd gamma 0.25": ["--kd", "fckd", "--fckd-gamma", "0.25"],
    "fckd spatial only": ["--kd", "fckd", "--lambda-channel", "0"],
    "fckd channel only": ["--kd", "fckd", "--lambda-spatial", "0"],
}


# Revision 2's screen (README, "Revision 2: the candidates and the rule"): the FCKD readings, as FCKDLoss keyword
# arguments, and the rule were written down before the runs. bench/fckd_targets.py measures what
# each reading does to the teacher's targets.
READINGS = {
    "C2 mask, cosine T 0.1, threshold 0.7, gamma 1":
        dict(apply="mask", similarity="cosine", temperature=0.1, threshold=0.7, gamma=1.0),
    "C3 mask, cosine T 0.1, threshold 0.7, gamma 0.5":
        dict(apply="mask", similarity="cosine", temperature=0.1, threshold=0.7, gamma=0.5),
    "C4 mask, cosine T 0.1, threshold 0.7, gamma 0.25":
        dict(apply="mask", similarity="cosine", temperature=0.1, threshold=0.7, gamma=0.25),
    "C5 mask, cosine T 0.05, threshold 0.7, gamma 0.5":
        dict(apply="mask", similarity="cosine", temperature=0.05, threshold=0.7, gamma=0.5),
    "C6 mask, cosine T 0.1, threshold 0.5, gamma 0.5":
        dict(apply="mask", similarity="cosine", temperature=0.1, threshold=0.5, gamma=0.5),
    "C1 revision 1: multiply, dot, threshold 0.7, gamma 1":
        dict(apply="multiply", similarity="dot", threshold=0.7, gamma=1.0),
    "ablation: mask, threshold 0.7, no enhancement": dict(apply="mask", threshold=0.7, gamma=0.0),
    "ablation: multiply, cosine T 0.1, threshold 0.7, gamma 1":
        dict(apply="multiply", similarity="cosine", temperature=0.1, threshold=0.7, gamma=1.0),
    "ablation: mask, dot, threshold 0.7, gamma 1": dict(apply="mask", similarity="dot", threshold=0.7, gamma=1.0),
}


def fckd_flags(reading):
    """train.py flags for one reading, every setting it uses explicit so that a row does not move with
    the defaults (and none it does not use: train.py refuses those)."""
    flags = ["--kd", "fckd", "--fckd-apply", reading["apply"], "--fckd-gamma", str(reading["gamma"])]
    condense = reading.get("condense", "hard")
    if condense != "hard":
        flags += ["--fckd-condense", condense]
    flags += ["--fckd-keep", str(reading["keep"])] if condense == "quantile" else ["--fckd-threshold",
                                                                                     str(reading["threshold"])]
    if reading["gamma"] > 0:
        flags += ["--fckd-similarity", reading["similarity"]]
        flags += ["--fckd-temperature", str(reading["temperature"])] if "temperature" in reading else []
    return flags


SCREEN = {  # the candidates, then the references that the rule and the target need, then the ablation
    **{name: fckd_flags(reading) for name, reading in READINGS.items() if not name.startswith("ablation")},
    "baseline": [],
    "cwd": ["--kd", "cwd"],
    "control: KD + CWD (no condensation, no enhancement)": ["--kd", "fckd", "--fckd-condense", "none",
                                                           "--fckd-gamma", "0"],
    **{name: fckd_flags(reading) for name, reading in READINGS.items() if name.startswith("ablation")},
}
# Revision 2's CamVid table (camvid-cpu): the references, revision 1, the two best candidates of the
# screen, and the mask without enhancement (does the enhancement help where the logit maps are larger than 8 x 8?).
FINALISTS_REV2 = {
    "baseline": [],
    **{name: SCREEN[name] for name in ("C3 mask, cosine T 0.1, threshold 0.7, gamma 0.5",
                                       "C4 mask, cosine T 0.1, threshold 0.7, gamma 0.25",
                                       "C1 revision 1: multiply, dot, threshold 0.7, gamma 1",
                                       "cwd")},
    "kd": ["--kd", "kd"],
    **{name: SCREEN[name] for name in ("control: KD + CWD (no condensation, no enhancement)",
                                       "ablation: mask, threshold 0.7, no enhancement")},
}
# The instrument pilot: can a setting tell the established methods from no distillation at all?
PILOT = {name: METHODS[name] for name in ("baseline", "kd", "cwd")}
# Revision 3's finalists, on the setting the pilot chose: the references, the default (C3), its
# parts, and C3 with the quantile condensation that keeps a fixed share of the pixels.
C3 = "C3 mask, cosine T 0.1, threshold 0.7, gamma 0.5"
CONTROL = "control: KD + CWD (no condensation, no enhancement)"
QUANTILE_READINGS = {
    "Q8 C3 with quantile condensation, keep 0.8": dict(READINGS[C3], condense="quantile", keep=0.8),
    "Q6 C3 with quantile condensation, keep 0.6": dict(READINGS[C3], condense="quantile", keep=0.6),
    "Q8 without enhancement": dict(apply="mask", condense="quantile", keep=0.8, gamma=0.0),
}
FINALISTS = {  # the rows the default is chosen from first, the KD + CWD control last
    **PILOT,
    **{name: SCREEN[name] for name in (C3, "ablation: mask, threshold 0.7, no enhancement")},
    **{name: fckd_flags(reading) for name, reading in QUANTILE_READINGS.items()},
    CONTROL: SCREEN[CONTROL],
}
# Revision 4's finalists (docs/results.md, "IDD-Lite: the pilot"): on the setting IDD-Lite's pilot chooses, and
# the channel-only row on camvid-cpu-patient (the others have CamVid rows in FINALISTS already)
FINALISTS_REV4 = {
    **PILOT,
    "control: KD + CWD (no condensation, no enhancement)": SCREEN[CONTROL],
    "FCKD default: hard 0.7, mask, no enhancement": fckd_flags(dict(apply="mask", threshold=0.7, gamma=0.0)),
    C3: SCREEN[C3],
    "channel-only FCKD: hard 0.7, mask, no enhancement, lambda_spatial 0 (CWD on the kept pixels)":
        [*fckd_flags(dict(apply="mask", threshold=0.7, gamma=0.0)), "--lambda-spatial", "0"],
    "Q8 without enhancement": FINALISTS["Q8 without enhancement"],
}
TABLES = {"methods": METHODS, "ablation": ABLATION, "screen": SCREEN, "finalists-rev2": FINALISTS_REV2,
          "pilot": PILOT, "finalists": FINALISTS, "finalists-rev4": FINALISTS_REV4}


def run_dir(out, name, seed):
    return Path(out) / f"{re.sub('[^a-z0-9.]+', '-', name.lower()).strip('-')}_s{seed}"


def run(name, seed, train_args, out, threads, halves=()):
    """Train (or finish training) and evaluate one run; returns its result dict (from result.json).
    halves: lists of val frames that the run is scored on too, one by one (halves_mIoU)."""
    directory = run_dir(out, name, seed)
    result_path = directory / "result.json"
    train_cmd = [sys.executable, "train.py", *train_args, "--seed", str(seed), "--out", str(directory),
                 "--resume", "auto"]
    command = " ".join(["python", *train_cmd[1:]])
    settings = train.parse_args(train_cmd[2:])
    settings.__dict__.update(input_fingerprints(settings))
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))

    def evaluate(frames, json_path, log):
        cmd = [sys.executable, "eval.py", "--ckpt", str(directory / "last.pt"), "--json", str(json_path),
               *(["--frames", str(frames)] if frames else [])]
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        if subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
            raise RuntimeError(f"run {directory.name} failed: {' '.join(cmd)}; see {directory / 'output.log'}")
        return json.loads(Path(json_path).read_text())

    def score_halves(log):
        return [evaluate(frames, directory / f"eval_half{i}.json", log)["mIoU"] for i, frames in enumerate(halves)]

    if result_path.exists():
        result = json.loads(result_path.read_text())
        # a finished run stands in for this one only if it was trained with the same settings, checked as
        # train.py checks a resume (a setting edited since would otherwise put old numbers in the new table)
        try:
            check_resumed_settings(result["train_args"], settings, result_path, train.build_parser())
        except ValueError as e:
            raise RuntimeError(f"{e}\n(move {directory} away or pass another --runs)") from None
        if halves and len(result.get("halves_mIoU", ())) != len(halves):  # a run scored before the halves were
            with open(directory / "output.log", "a") as log:
                result["halves_mIoU"] = score_halves(log)
            result_path.write_text(json.dumps(result, indent=1) + "\n")
        return result
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(directory / "output.log", "a") as log:
        log.write(f"$ {' '.join(train_cmd)}\n")
        log.flush()
        if subprocess.run(train_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
            raise RuntimeError(f"run {directory.name} failed: {' '.join(train_cmd)}; see {directory / 'output.log'}")
        metrics = evaluate(None, directory / "eval.json", log)
        minutes = (time.perf_counter() - start) / 60
        halves_miou = {"halves_mIoU": score_halves(log)} if halves else {}
    keep = [r["keep_ratio"] for r in map(json.loads, (directory / "log.jsonl").read_text().splitlines())
            if "keep_ratio" in r]
    result = {"mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "per_class": metrics["per_class"],
              "keep_ratio_last": keep[-1] if keep else None, "minutes": minutes,
              "train_command": command, "train_args": vars(settings), **halves_miou}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{directory.name}: mIoU {result['mIoU']:.2f} mAcc {result['mAcc']:.2f} "
          f"({result['minutes']:.1f} min)", flush=True)
    return result


def summarise(name, results, baseline_miou=None):
    """One table row: mean and sample std over seeds (std 0 for one seed), per-seed values."""
    row = {"name": name, "seeds": sorted(results)}
    for key in ("mIoU", "mAcc"):
        values = [results[s][key] for s in row["seeds"]]
        row[key] = values
        row[f"{key}_mean"] = statistics.fmean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["delta_mIoU"] = None if baseline_miou is None else row["mIoU_mean"] - baseline_miou
    keep = [results[s]["keep_ratio_last"] for s in row["seeds"] if results[s]["keep_ratio_last"] is not None]
    row["keep_ratio_last"] = statistics.fmean(keep) if keep else None
    if all("halves_mIoU" in results[s] for s in row["seeds"]):  # mean over seeds on each half of val
        row["halves_mIoU_mean"] = [statistics.fmean(h) for h in zip(*(results[s]["halves_mIoU"] for s in row["seeds"]))]
    row["per_class_IoU_mean"] = {}
    for c in results[row["seeds"][0]]["per_class"]:
        values = [results[s]["per_class"][c]["IoU"] for s in row["seeds"]]
        defined = [v for v in values if v is not None]
        row["per_class_IoU_mean"][c] = statistics.fmean(defined) if defined else None
    return row


def pilot_verdict(rows, min_gain=2.0, teacher_room=None, max_baseline_std=None, min_half_gain=None):
    """The pilot's rule (docs/results.md): the better of KD and CWD by mean mIoU must be at least
    min_gain over the baseline's mean, each of its seeds above the baseline's mean; IDD-Lite's rule
    adds (each when given) the teacher (rows[0]) at least teacher_room above that method, the
    baseline's seed std at most max_baseline_std, and the method's gain at least min_half_gain on
    each half of val (rows' halves_mIoU_mean). Returns {"method", "gain", "pooled_std",
    "gain_per_std", "every_seed_above", "teacher_room", "baseline_std", "half_gains", "passes"}."""
    by_name = {row["name"]: row for row in rows}
    baseline = by_name["baseline"]
    best = max((by_name["kd"], by_name["cwd"]), key=lambda row: row["mIoU_mean"])
    gain = best["mIoU_mean"] - baseline["mIoU_mean"]
    pooled_std = math.sqrt((baseline["mIoU_std"] ** 2 + best["mIoU_std"] ** 2) / 2)
    every_seed_above = all(value > baseline["mIoU_mean"] for value in best["mIoU"])
    room = rows[0]["mIoU_mean"] - best["mIoU_mean"]
    half_gains = ([b - a for a, b in zip(baseline["halves_mIoU_mean"], best["halves_mIoU_mean"])]
                  if "halves_mIoU_mean" in baseline and "halves_mIoU_mean" in best else None)
    checks = [gain >= min_gain, every_seed_above]
    if teacher_room is not None:
        checks.append(room >= teacher_room)
    if max_baseline_std is not None:
        checks.append(baseline["mIoU_std"] <= max_baseline_std)
    if min_half_gain is not None:
        checks.append(half_gains is not None and all(g >= min_half_gain for g in half_gains))
    return {"method": best["name"], "gain": gain, "pooled_std": pooled_std,
            "gain_per_std": gain / pooled_std if pooled_std > 0 else math.inf,
            "every_seed_above": every_seed_above, "teacher_room": room, "baseline_std": baseline["mIoU_std"],
            "half_gains": half_gains, "passes": all(checks)}


def format_table(rows):
    lines = ["| run | mIoU (mean +- std) | mAcc (mean +- std) | mIoU vs baseline | mIoU per seed |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        delta = "" if r["delta_mIoU"] is None else f"{r['delta_mIoU']:+.2f}"
        seeds = ", ".join(f"{v:.2f}" for v in r["mIoU"])
        lines.append(f"| {r['name']} | {r['mIoU_mean']:.2f} +- {r['mIoU_std']:.2f} | "
                     f"{r['mAcc_mean']:.2f} +- {r['mAcc_std']:.2f} | {delta} | {seeds} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=SETTINGS, default="synthetic", help="default: %(default)s")
    parser.add_argument("--table", choices=TABLES, default="methods",
                        help="methods: baseline, KD, CWD, FCKD; ablation: FCKD's parts; screen: revision 2's "
                             "candidates; finalists-rev2: revision 2's CamVid rows; pilot: baseline, KD, CWD; "
                             "finalists: revision 3's rows; finalists-rev4: revision 4's (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", metavar="NAME",
                        help="only these rows of the table (default: all); the teacher is always trained")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default: %(default)s)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "accuracy"), help="default: runs/accuracy")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="default: bench/results")
    args = parser.parse_args(own)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    variants = TABLES[args.table]
    if args.rows:
        unknown = [name for name in args.rows if name not in variants]
        if unknown:
            parser.error(f"--rows: {', '.join(map(repr, unknown))} not in --table {args.table}, whose rows are "
                         f"{', '.join(map(repr, variants))}")
        variants = {name: flags for name, flags in variants.items() if name in args.rows}
    setting = SETTINGS[args.setting]
    out = Path(args.runs) / args.setting
    teacher_out = Path(args.runs) / setting.get("teacher_setting", args.setting)  # S2 reuses S0's teacher
    # split the CPU threads between parallel runs instead of letting each take them all
    threads = None
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)

    teacher_args = [*setting["common"], *setting["teacher"], *extra]
    teacher_ckpt = str(run_dir(teacher_out, "teacher", 0) / "last.pt")
    jobs = [(name, seed, [*setting["common"], *setting["student"], *extra,
                          *(["--teacher-ckpt", teacher_ckpt, *flags] if flags else [])])
            for name, flags in variants.items() for seed in args.seeds]
    halves = setting.get("halves", ())
    with ThreadPoolExecutor(args.jobs) as pool:
        teacher_run = pool.submit(run, "teacher", 0, teacher_args, teacher_out, threads, halves)
        # the students without a teacher train while it does, the others once it is done
        needs_teacher = ["--teacher-ckpt" in train_args for _, _, train_args in jobs]
        futures = {i: pool.submit(run, *job, out, threads, halves) for i, job in enumerate(jobs)
                   if not needs_teacher[i]}
        teacher = teacher_run.result()
        futures.update({i: pool.submit(run, *job, out, threads, halves) for i, job in enumerate(jobs)
                        if needs_teacher[i]})
        results = [futures[i].result() for i in range(len(jobs))]

    by_name = {}
    for (name, seed, _), result in zip(jobs, results):
        by_name.setdefault(name, {})[seed] = result
    baseline = summarise("baseline", by_name["baseline"]) if "baseline" in by_name else None
    rows = [summarise(f"teacher ({' '.join(setting['teacher'])})", {0: teacher})]
    rows += [summarise(name, res, baseline and baseline["mIoU_mean"])
             for name, res in sorted(by_name.items(), key=lambda item: item[0] != "baseline")]  # baseline first
    table = format_table(rows)
    print(table)
    verdict = None
    if args.table == "pilot" and set(PILOT) <= set(by_name):
        verdict = pilot_verdict(rows, **setting.get("pilot_rule", {}))
        halves_said = "" if verdict["half_gains"] is None else \
            f", gain on each val half {' '.join(f'{g:+.2f}' for g in verdict['half_gains'])}"
        print(f"pilot rule: {verdict['method']} {verdict['gain']:+.2f} mIoU over the baseline (pooled std "
              f"{verdict['pooled_std']:.2f}, gain/std {verdict['gain_per_std']:.2f}), every seed above the baseline's "
              f"mean: {verdict['every_seed_above']}, teacher {verdict['teacher_room']:+.2f} above it, baseline std "
              f"{verdict['baseline_std']:.2f}{halves_said}; {'passes' if verdict['passes'] else 'does not pass'}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = {**describe_run("accuracy.py", argv, device), "setting": args.setting, "seeds": args.seeds,
              "threads_per_run": threads or torch.get_num_threads(),
              "teacher_command": teacher["train_command"], "table": table,
              **({"pilot_verdict": verdict} if verdict else {})}
    suffix = "" if args.table == "methods" else f"_{args.table}"
    save_results(args.out, f"accuracy_{args.setting}{suffix}.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
