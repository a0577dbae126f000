"""The benchmark scripts run end to end on a tiny CPU configuration, so they cannot rot."""

import json

from bench import loss_speed


def test_loss_speed_runs_and_writes_json(tmp_path):
    rows = loss_speed.main(["--batch", "2", "--classes", "5", "--size", "6", "10", "--iters", "2",
                            "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert [row["loss"] for row in rows] == ["fckd", "fckd (no enhance)", "kd", "cwd"]
    assert all(row["ms"] > 0 for row in rows)
    saved = json.loads((tmp_path / "loss_speed_cpu_float32.json").read_text())
    assert saved["shape"] == [2, 5, 6, 10] and saved["rows"] == rows
    assert saved["device"].startswith("CPU")


def test_speed_runs_every_mode_and_writes_json(tmp_path):
    from bench import speed

    rows = speed.main(["--device", "cpu", "--batch", "2", "--crop", "32", "32", "--classes", "4", "--width", "0.125",
                       "--teacher", "deeplabv3_resnet50", "--precisions", "fp32", "--iters", "1", "--warmup", "1",
                       "--out", str(tmp_path)])
    assert [row["mode"] for row in rows] == list(speed.MODES)
    flops = {row["mode"]: row["tflop_per_image"] for row in rows}
    assert flops["student+teacher"] > flops["student"] > 0  # the teacher's forward is counted
    assert all(row["images_per_s"] > 0 and row["peak_memory_GiB"] is None for row in rows)
    saved = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert saved["rows"] == rows and saved["device"].startswith("CPU")


def test_accuracy_summary_statistics():
    from bench import accuracy

    per_class = {"a": {"IoU": 10.0}, "b": {"IoU": None}}
    results = {s: {"mIoU": m, "mAcc": m + 1, "per_class": per_class, "keep_ratio_last": None}
               for s, m in ((0, 40.0), (1, 44.0), (2, 42.0))}
    row = accuracy.summarise("kd", results, baseline_miou=41.0)
    assert row["mIoU_mean"] == 42.0 and row["mIoU_std"] == 2.0  # sample std of 40, 44, 42
    assert row["mAcc"] == [41.0, 45.0, 43.0] and row["delta_mIoU"] == 1.0
    assert row["per_class_IoU_mean"] == {"a": 10.0, "b": None}
    assert "| kd | 42.00 +- 2.00 | 43.00 +- 2.00 | +1.00 | 40.00, 44.00, 42.00 |" in accuracy.format_table([row])


def test_accuracy_runs_every_method_and_resumes(tmp_path):
    from bench import accuracy

    tiny = ["--iters", "2", "--batch-size", "2", "--synthetic-length", "4", "--synthetic-size", "32",
            "--width", "0.125"]
    argv = ["--seeds", "0", "1", "--jobs", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path), "--", *tiny]
    rows = accuracy.main(argv)
    names = ["teacher (--model deeplabv3_resnet18 --width 0.5)", "baseline", "kd", "cwd", "fckd"]
    assert [row["name"] for row in rows] == names
    assert all(row["seeds"] == [0, 1] for row in rows[1:]) and rows[0]["seeds"] == [0]
    assert rows[1]["delta_mIoU"] == 0 and rows[-1]["keep_ratio_last"] is not None
    saved = json.loads((tmp_path / "accuracy_synthetic.json").read_text())
    assert saved["rows"] == rows and "| fckd |" in saved["table"]
    fckd = json.loads((tmp_path / "runs" / "synthetic" / "fckd_s1" / "result.json").read_text())
    assert "--kd fckd" in fckd["train_command"] and "--seed 1" in fckd["train_command"]
    # finished runs are not run again: with their results removed from disk, the table cannot change
    (tmp_path / "runs" / "synthetic" / "kd_s0" / "last.pt").unlink()
    assert accuracy.main(argv) == rows


def test_data_speed_runs_and_writes_json(tmp_path):
    from bench import data_speed

    rows = data_speed.main(["--batch", "2", "--batches", "2", "--workers", "0", "1", "--out", str(tmp_path)])
    assert [row["workers"] for row in rows] == [0, 1]
    assert all(row["images_per_s"] > 0 for row in rows)
    assert json.loads((tmp_path / "data_speed_synthetic.json").read_text())["rows"] == rows
