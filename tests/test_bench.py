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
