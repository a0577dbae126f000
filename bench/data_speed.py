"""Speed of the training data pipeline: DataLoader images/s for a number of workers.

    python bench/data_speed.py --dataset camvid --data-root data/camvid --crop 360
    python bench/data_speed.py --dataset synthetic --workers 0 1

Loads --batches batches of --batch training items (decode, random scale 0.5-2.0, pad, crop,
flip, normalise, as train.py does) after one warm-up batch, and reports images/s in total and per
worker (workers 0: loading in the main process). Prints a table and writes JSON to bench/results/.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import describe_run, save_results  # noqa: E402
from data import DATASET_NAMES, build_dataset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="synthetic")
    parser.add_argument("--data-root")
    parser.add_argument("--crop", type=int, help="training crop side (default: the whole synthetic image)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rows = []
    for workers in args.workers:
        # a fresh dataset each time: the synthetic set keeps the scenes it has drawn, and this times
        # the first epoch, where each one is drawn
        dataset = build_dataset(args.dataset, args.data_root, "train", train=True, crop_size=args.crop)
        sampler = RandomSampler(dataset, num_samples=(args.batches + 1) * args.batch)
        loader = DataLoader(dataset, args.batch, sampler=sampler, num_workers=workers)
        batches = iter(loader)
        next(batches)  # starts the workers
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
        del batches
        images_per_s = args.batches * args.batch / seconds
        rows.append({"workers": workers, "images_per_s": images_per_s,
                     "images_per_s_per_worker": images_per_s / max(workers, 1)})
    print(f"{args.dataset} training items, batch {args.batch}, crop {args.crop or 'whole image'}")
    print("| workers | images/s | images/s per worker |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['workers']} | {row['images_per_s']:.1f} | {row['images_per_s_per_worker']:.1f} |")
    header = {**describe_run("data_speed.py", argv, torch.device("cpu")), "dataset": args.dataset,
              "crop": args.crop, "batch": args.batch}
    save_results(args.out, f"data_speed_{args.dataset}.json", header, rows)
    return rows


if __name__ == "__main__":
    main()
