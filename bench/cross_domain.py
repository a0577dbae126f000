"""The cross-domain table: the finished runs of bench/accuracy.py's tables, scored in domain and on
the other domain's val split, over the classes the two share (CamVid <-> IDD-Lite: IDD-Lite's 7).

    python bench/cross_domain.py --settings camvid-cpu-patient idd-lite-cpu-fewlabels8 \
        --table finalists-rev4 --data-root camvid=../shared/camvid idd_lite=../shared/idd_lite

For every row of --table in each setting (and the setting's teacher) whose runs have finished
(result.json), every seed is scored with eval.py twice: in domain over the shared classes
(`--classes`; for an IDD-Lite model that is its own score) and on the other dataset's val split
(`--dataset`, frames resized to the width the model trained at). Prints mean +- sample std over
the seeds, every seed, and the drop from in domain, and writes bench/results/cross_domain.json.
Each score is kept beside its run (cross_in.json, cross_out.json): a second call scores nothing twice.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.accuracy import SETTINGS, TABLES, run_dir  # noqa: E402
from bench.common import describe_run, save_results  # noqa: E402
from data import CLASS_CORRESPONDENCE  # noqa: E402


def other_dataset(name):
    """The dataset a correspondence pairs `name` with, and the coarser of the two (whose classes are scored)."""
    for fine, coarse in CLASS_CORRESPONDENCE:
        if name in (fine, coarse):
            return (coarse if name == fine else fine), coarse
    raise ValueError(f"{name} has no class correspondence in data.CLASS_CORRESPONDENCE")


def score(directory, out_name, flags):
    """eval.py on directory/last.pt with `flags`, kept in directory/out_name; returns its mIoU."""
    path = directory / out_name
    if not path.exists():
        cmd = [sys.executable, "eval.py", "--ckpt", str(directory / "last.pt"), "--json", str(path), *flags]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(path.read_text())["mIoU"]


def finished_runs(setting_name, table, runs):
    """{row name: [run folders of its finished seeds]} for the teacher and every row of `table`."""
    setting = SETTINGS[setting_name]
    teacher = run_dir(Path(runs) / setting.get("teacher_setting", setting_name), "teacher", 0)
    found = {"teacher": [teacher] if (teacher / "result.json").exists() else []}
    for name in TABLES[table]:
        slug = run_dir("", name, 0).name[:-len("_s0")]
        found[name] = sorted(path.parent for path in (Path(runs) / setting_name).glob(f"{slug}_s*/result.json"))
    return {name: folders for name, folders in found.items() if folders}


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", required=True, choices=SETTINGS, metavar="SETTING")
    parser.add_argument("--table", choices=TABLES, default="finalists-rev4", help="default: %(default)s")
    parser.add_argument("--data-root", nargs="+", default=[], metavar="DATASET=ROOT",
                        help="each dataset's root (default: its record's)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "accuracy"), help="default: runs/accuracy")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="default: bench/results")
    args = parser.parse_args(argv)
    roots = dict(item.split("=", 1) for item in args.data_root)
    rows = []
    for setting_name in args.settings:
        dataset = SETTINGS[setting_name]["common"][SETTINGS[setting_name]["common"].index("--dataset") + 1]
        other, coarse = other_dataset(dataset)
        own_root = ["--data-root", roots[dataset]] if dataset in roots else []
        other_root = ["--data-root", roots[other]] if other in roots else []
        for name, folders in finished_runs(setting_name, args.table, args.runs).items():
            inside = [score(f, "cross_in.json", ["--classes", coarse, *own_root]) for f in folders]
            outside = [score(f, "cross_out.json", ["--dataset", other, *other_root]) for f in folders]
            (in_mean, in_std), (out_mean, out_std) = mean_std(inside), mean_std(outside)
            rows.append({"setting": setting_name, "trained_on": dataset, "scored_on": other, "classes": coarse,
                         "name": name, "seeds": [f.name for f in folders], "in_domain": inside, "other_domain": outside,
                         "in_domain_mean": in_mean, "in_domain_std": in_std, "other_domain_mean": out_mean,
                         "other_domain_std": out_std, "drop": in_mean - out_mean})
    lines = ["| trained on | run | in domain | other domain | drop | in domain per seed | other domain per seed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['trained_on']} | {r['name']} | {r['in_domain_mean']:.2f} +- {r['in_domain_std']:.2f} | "
                     f"{r['other_domain_mean']:.2f} +- {r['other_domain_std']:.2f} | {r['drop']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['in_domain'])} | "
                     f"{', '.join(f'{v:.2f}' for v in r['other_domain'])} |")
    table = "\n".join(lines)
    print(table)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = {**describe_run("cross_domain.py", argv, device), "table": table}
    save_results(args.out, "cross_domain.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
