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
