"""The benchmark scripts run end to end on a tiny CPU configuration, so they cannot rot."""

import json
from unittest import mock
import math

import pytest
import torch

from bench import loss_speed
from data import build_dataset


def test_loss_speed_runs_and_writes_json(tmp_path):
    rows = loss_speed.main(["--batch", "2", "--classes", "5", "--size", "6", "10", "--iters", "2",
                            "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert [row["loss"] for row in rows] == list(loss_speed.losses())
    assert all(row["ms"] > 0 for row in rows)
    saved = json.loads((tmp_path / "loss_speed_cpu_float32.json").read_text())
    assert saved["shape"] == [2, 5, 6, 10] and saved["rows"] == rows
    assert saved["device"].startswith("CPU")


def test_results_name_the_cpu_model():
    # the same run on another CPU model can round differently, so a results file says which one made it
    from bench import common

    cpuinfo = "processor\t: 0\nmodel name\t: Example CPU 9000\n"
    with mock.patch("builtins.open", mock.mock_open(read_data=cpuinfo)):
        assert common.cpu_model() == "Example CPU 9000"
    with mock.patch("builtins.open", side_effect=OSError):
        assert common.cpu_model()  # no /proc/cpuinfo: the platform's name, never empty
    assert common.describe_run("x.py", [], torch.device("cpu"))["device"].startswith(f"CPU ({common.cpu_model()}, ")


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


def test_accuracy_runs_every_method_and_resumes(tmp_path, capsys):
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
    # --rows: a part of the table, from the same runs
    assert accuracy.main(["--rows", "kd", "baseline", *argv]) == rows[:3]
    assert [row["name"] for row in json.loads((tmp_path / "accuracy_synthetic.json").read_text())["rows"]] == names[:3]
    with pytest.raises(SystemExit):
        accuracy.main(["--rows", "kd", "fckd gamma 9", *argv])
    assert "'fckd gamma 9' not in --table methods" in capsys.readouterr().err
    # a finished run made with other settings (a setting edited since) is refused, not reused, by the check
    # train.py makes on a resume
    with pytest.raises(RuntimeError, match=r"teacher_s0/result.json: this run's settings differ from the ones it "
                                           r"was trained with \(--lr: 0.1 in the checkpoint, 0.02 now\)"):
        accuracy.main([*argv, "--lr", "0.02"])


def test_screen_rows_train_exactly_the_readings_they_name():
    import inspect

    import train
    from bench import accuracy
    from fckd import FCKDLoss
    from losses import LOSSES, loss_settings, unused_flags

    defaults = {name: p.default for name, p in inspect.signature(FCKDLoss).parameters.items()
                if name != "downsample"}  # train.py's logits are at the backbone's stride
    keyword = LOSSES["fckd"].keywords
    for name, reading in accuracy.READINGS.items():
        args = train.parse_args([*accuracy.SCREEN[name], "--teacher-ckpt", "t.pt"])
        settings = loss_settings("fckd", vars(args))
        unused = {keyword[dest] for dest in unused_flags("fckd", vars(args))}
        # every setting the reading uses is what it names; the others (gamma 0: no similarity) stay at the defaults
        assert {k: v for k, v in settings.items() if k not in unused} == \
            {k: v for k, v in {**defaults, **reading}.items() if k not in unused}, name
        # every choice the screen compares is explicit in the flags, so the rows do not move with the defaults
        flags = " ".join(accuracy.SCREEN[name])
        explicit = ("apply", "gamma", "threshold") + (("similarity",) if reading["gamma"] > 0 else ())
        assert all(f"--fckd-{key} " in flags for key in explicit), name


def resolved(flags):
    """What a bench row trains: --kd and the loss flags it uses (train.py's resolved settings)."""
    import train
    from losses import FLAGS, unused_flags

    args = vars(train.parse_args([*flags, *(["--teacher-ckpt", "t.pt"] if flags else [])]))
    return {"kd": args["kd"], **{dest: args[dest] for dest in set(FLAGS) - unused_flags(args["kd"], args)}}


def test_no_two_rows_of_a_table_train_the_same_and_each_name_says_what_it_runs():
    from bench import accuracy

    for table_name, table in accuracy.TABLES.items():
        settings = {name: resolved(flags) for name, flags in table.items()}
        for name, setting in settings.items():
            twins = [other for other in settings if other != name and settings[other] == setting]
            assert not twins, f"{table_name}: {name!r} trains what {twins} train"
            lower = name.lower()
            if "no enhancement" in lower or "= kd + cwd" in lower:
                assert setting.get("fckd_gamma", 0.0) == 0.0, name
            if "no condensation" in lower or "kd + cwd" in lower:
                assert setting["fckd_condense"] == "none", name
            if "revision 1" in lower:
                assert (setting["fckd_apply"], setting["fckd_similarity"], setting["fckd_gamma"]) == \
                    ("multiply", "dot", 1.0), name


def test_loss_speed_rows_time_what_they_name():
    from bench import loss_speed

    rows = loss_speed.losses()
    readings = {name: fn.__defaults__[0] for name, fn in rows.items() if name.startswith("fckd")}
    described = {name: (loss.apply, loss.similarity, loss.gamma) for name, loss in readings.items()}
    assert len(set(described.values())) == len(described)  # no two rows time the same loss
    for name, (apply, similarity, gamma) in described.items():
        assert ("no enhancement" in name) == (gamma == 0), name
        if "revision 1" in name:
            assert (apply, similarity, gamma) == ("multiply", "dot", 1.0)


def test_every_setting_and_table_row_is_a_valid_train_command():
    import train
    from bench import accuracy
    from losses import loss_settings

    for setting in accuracy.SETTINGS.values():
        for role in ("teacher", "student"):
            train.parse_args([*setting["common"], *setting[role]])
    for table in ("finalists-rev2", "pilot", "finalists", "finalists-rev4"):
        for name, flags in accuracy.TABLES[table].items():
            args = train.parse_args([*accuracy.SETTINGS["camvid-cpu"]["common"], *flags,
                                     *(["--teacher-ckpt", "t.pt"] if flags else [])])
            assert args.image_scale == 0.5 and (args.kd is None) == (name == "baseline"), name
    c3 = accuracy.READINGS["C3 mask, cosine T 0.1, threshold 0.7, gamma 0.5"]
    assert accuracy.FINALISTS["C3 mask, cosine T 0.1, threshold 0.7, gamma 0.5"] == accuracy.fckd_flags(c3)
    # revision 3's quantile rows are C3 with the quantile condensation, or its mask without enhancement
    def settings(flags):
        return loss_settings("fckd", vars(train.parse_args([*flags, "--teacher-ckpt", "t.pt"])))

    for keep in (0.8, 0.6):
        name = f"Q{int(keep * 10)} C3 with quantile condensation, keep {keep}"
        assert settings(accuracy.FINALISTS[name]) == {**settings(accuracy.fckd_flags(c3)), "condense": "quantile",
                                                      "keep": keep}, name
    plain = settings(accuracy.FINALISTS["Q8 without enhancement"])
    assert (plain["condense"], plain["keep"], plain["apply"], plain["gamma"]) == ("quantile", 0.8, "mask", 0.0)
    # S2 is S0 with the labelled list on the students only, and S0's very teacher run
    s0, s2 = accuracy.SETTINGS["camvid-cpu"], accuracy.SETTINGS["camvid-cpu-fewlabels"]
    assert s2["teacher"] == s0["teacher"] and s2["common"] == s0["common"] and s2["teacher_setting"] == "camvid-cpu"
    assert s2["student"] == [*s0["student"], "--labelled-list", "bench/camvid_train_1in8.txt"]
    # IDD-Lite's I1-I3 share idd-lite-cpu's teacher run; I1 and I2 differ from it in the labelled list only
    idd = accuracy.SETTINGS["idd-lite-cpu"]
    for share in (8, 16):
        few = accuracy.SETTINGS[f"idd-lite-cpu-fewlabels{share}"]
        assert few["teacher"] == idd["teacher"] and few["common"] == idd["common"]
        assert few["teacher_setting"] == "idd-lite-cpu" and few["halves"] == accuracy.IDD_LITE_HALVES
        assert few["student"] == [*idd["student"], "--labelled-list", f"bench/idd_lite_train_1in{share}.txt"]
    assert accuracy.SETTINGS["idd-lite-cpu-patient"]["teacher_setting"] == "idd-lite-cpu"


def test_data_speed_runs_and_writes_json(tmp_path):
    from bench import data_speed

    rows = data_speed.main(["--batch", "2", "--batches", "2", "--workers", "0", "1", "--out", str(tmp_path)])
    assert [row["workers"] for row in rows] == [0, 1]
    assert all(row["images_per_s"] > 0 for row in rows)
    assert json.loads((tmp_path / "data_speed_synthetic.json").read_text())["rows"] == rows


def test_fckd_target_statistics_on_a_worked_example():
    from bench.fckd_targets import target_statistics

    # pixel a: confident class 0; pixel b: uncertain (Hn = 1), so threshold 0.5 drops it
    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    label = torch.tensor([[[0, 1]]])
    revision_1 = dict(apply="multiply", similarity="dot", threshold=0.5, gamma=1.0)
    sums, counts = target_statistics(logits, label, revision_1, tau_channel=4.0)
    mean = {name: sums[name] / counts[name] for name in sums}
    assert mean["keep"] == 0.5
    # class 0 (present) over the pixels (10/4, 0): the dropped pixel b holds 1 / (1 + e^2.5) of it;
    # class 1 (absent) is 0 at both pixels, so half of it lies on b
    assert math.isclose(mean["dropped_mass_present"], 1 / (1 + math.exp(2.5)), rel_tol=1e-5)
    assert math.isclose(mean["dropped_mass_absent"], 0.5, rel_tol=1e-6)
    # a attends to itself only (score 100 / sqrt 2 against 0), and b's class (arg-max 0) is a's
    assert math.isclose(mean["spatial_support"], 1.0, rel_tol=1e-5) and mean["spatial_top_weight"] > 0.9999
    assert mean["spatial_same_class_weight"] > 0.9999
    # channel 0 attends to itself; channel 1 (all zeros once condensed) spreads evenly
    assert math.isclose(mean["channel_self_weight"], 0.75, rel_tol=1e-5)
    assert math.isclose(mean["channel_support"], 1.5, rel_tol=1e-5)
    assert mean["argmax_changed_spatial"] == 0 and mean["accuracy_t"] == 100 and counts["accuracy_t"] == 1
    assert mean["spatial_self_weight"] > 0.9999


def test_fckd_target_statistics_of_the_mask_and_cosine_reading():
    from bench.fckd_targets import target_statistics

    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # as above: b is dropped at 0.5
    label = torch.tensor([[[0, 1]]])
    reading = dict(apply="mask", similarity="cosine", temperature=0.1, threshold=0.5, gamma=1.0)
    sums, counts = target_statistics(logits, label, reading, tau_channel=4.0)
    mean = {name: sums[name] / counts[name] for name in sums}
    # under mask a dropped pixel is absent from every softmax over pixels: no target mass on it,
    # and a attends to itself alone
    assert mean["dropped_mass_present"] == 0 and mean["dropped_mass_absent"] == 0
    assert mean["spatial_self_weight"] == 1 and mean["spatial_support"] == 1
    # channel maps probed on the kept pixel only: (10) and (0); cosine scores 1/0.1 and 0, so
    # channel 0 keeps 1 / (1 + e^-10) on itself and the empty channel 1 spreads evenly
    self_weight = 1 / (1 + math.exp(-10))
    assert math.isclose(mean["channel_self_weight"], (self_weight + 0.5) / 2, rel_tol=1e-5)
    assert mean["argmax_changed_spatial"] == 0 and mean["accuracy_t_sp"] == 100


def test_fckd_targets_runs_and_keeps_everything_at_threshold_1(tmp_path):
    import train
    from bench import fckd_targets
    from run import model_from_checkpoint
    from utils import evaluate, segmentation_metrics

    train.main(["--synthetic-length", "3", "--synthetic-size", "32", "--width", "0.125", "--batch-size", "2",
                "--iters", "2", "--out", str(tmp_path / "teacher")])
    ckpt = str(tmp_path / "teacher" / "last.pt")
    readings = {"all pixels": dict(apply="multiply", similarity="dot", threshold=1.0, gamma=1.0),
                "mask": dict(apply="mask", similarity="cosine", temperature=0.1, threshold=0.5, gamma=0.5)}
    with mock.patch.dict(fckd_targets.READINGS, readings, clear=True):
        rows = fckd_targets.main(["--teacher-ckpt", ckpt, "--out", str(tmp_path)])
    assert [row["reading"] for row in rows] == ["all pixels", "mask"]
    assert rows[0]["keep"] == 1.0 and rows[0]["dropped_mass_present"] == rows[0]["dropped_mass_absent"] == 0.0
    for row in rows:
        shares = [k for k in fckd_targets.COLUMNS if "support" not in k and "accuracy" not in k]
        assert all(0 <= row[k] <= 1 for k in shares if row[k] is not None)
        assert 1 <= row["spatial_support"] <= 16 and 1 <= row["channel_support"] <= 8  # 4 x 4 logits, 8 classes
    # keeping every pixel, the accuracy of the teacher's own targets is its pixel accuracy as eval.py counts it
    teacher, _ = model_from_checkpoint(ckpt)
    dataset = build_dataset("synthetic", None, "val", False, length=3, image_size=32)
    metrics = segmentation_metrics(evaluate(teacher, dataset, torch.device("cpu")), dataset.class_names)
    assert math.isclose(rows[0]["accuracy_t"], metrics["aAcc"], abs_tol=1e-3)
    assert json.loads((tmp_path / "fckd_targets_synthetic.json").read_text())["rows"] == rows


def test_premise_statistics_on_a_worked_example():
    from bench.fckd_targets import premise_statistics

    # pixel a: confident and right; pixel b: uncertain (Hn = 1) and wrong; pixel c: fairly sure and wrong
    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 3)
    label = torch.tensor([[[0, 1, 0]]])
    for condense, value, kept in (("hard", 0.5, "ac"), ("hard", 1.0, "abc"), ("quantile", 0.33, "a"),
                                  ("quantile", 0.6, "ac"), ("quantile", 1.0, "abc")):
        sums, counts = premise_statistics(logits, label, condense, value)
        mean = {k: sums[k] / counts[k] if counts[k] else None for k in counts}
        assert mean["keep"] == pytest.approx(len(kept) / 3) and mean["labelled_kept"] == pytest.approx(len(kept) / 3)
        right = {"a": 100.0, "b": 0.0, "c": 0.0}
        assert mean["accuracy_kept"] == pytest.approx(sum(right[p] for p in kept) / len(kept))
        dropped = [p for p in "abc" if p not in kept]
        assert mean["accuracy_dropped"] == (pytest.approx(sum(right[p] for p in dropped) / len(dropped)) if dropped
                                            else None)


def test_fckd_targets_premise_runs_and_writes_json(tmp_path):
    import train
    from bench import fckd_targets

    train.main(["--synthetic-length", "3", "--synthetic-size", "32", "--width", "0.125", "--batch-size", "2",
                "--iters", "2", "--out", str(tmp_path / "teacher")])
    rows = fckd_targets.main(["--teacher-ckpt", str(tmp_path / "teacher" / "last.pt"), "--premise",
                              "--out", str(tmp_path)])
    assert [row["reading"] for row in rows] == [f"{c} {v}" for c, v in fckd_targets.PREMISE]
    assert rows[0]["keep"] == 1.0 and rows[0]["accuracy_dropped"] is None  # quantile 1 keeps every pixel
    keeps = [row["keep"] for row in rows[:5]]
    assert keeps == sorted(keeps, reverse=True)  # quantile 1 ... 0.4 keeps less and less
    assert json.loads((tmp_path / "fckd_premise_synthetic.json").read_text())["rows"] == rows


def test_pilot_verdict_applies_the_rule_written_before_the_runs():
    from bench import accuracy

    def row(name, seeds):
        results = {s: {"mIoU": m, "mAcc": m, "per_class": {}, "keep_ratio_last": None} for s, m in enumerate(seeds)}
        return accuracy.summarise(name, results)

    baseline = row("baseline", [30.0, 32.0, 34.0])  # mean 32, std 2
    passing = accuracy.pilot_verdict([baseline, row("kd", [34.0, 35.0, 36.0]), row("cwd", [30.0, 31.0, 32.0])])
    assert passing["method"] == "kd" and passing["gain"] == 3.0 and passing["passes"]
    assert passing["pooled_std"] == pytest.approx(math.sqrt((4 + 1) / 2))
    # +2.0 on the mean but one seed at or below the baseline's mean: fails
    one_seed_low = accuracy.pilot_verdict([baseline, row("kd", [32.0, 36.0, 34.0]), row("cwd", [20.0, 20.0, 20.0])])
    assert one_seed_low["gain"] == 2.0 and not one_seed_low["every_seed_above"] and not one_seed_low["passes"]
    # exactly +2.0 with every seed above passes, judged on the better of KD and CWD; +1.2 fails
    small = accuracy.pilot_verdict([baseline, row("kd", [33.0, 33.5, 34.0]), row("cwd", [33.5, 34.0, 34.5])])
    assert small["method"] == "cwd" and small["gain"] == 2.0 and small["passes"]
    assert not accuracy.pilot_verdict([baseline, row("kd", [33.0, 33.5, 34.0]), row("cwd", [33.0, 33.2, 33.4])])["passes"]


def test_the_idd_lite_pilot_rule_adds_room_a_steady_baseline_and_both_val_halves():
    from bench import accuracy

    def row(name, seeds, halves):
        results = {s: {"mIoU": m, "mAcc": m, "per_class": {}, "keep_ratio_last": None, "halves_mIoU": h}
                   for s, (m, h) in enumerate(zip(seeds, halves))}
        return accuracy.summarise(name, results)

    rule = accuracy.IDD_LITE_RULE
    baseline = row("baseline", [31.5, 32.0, 32.5], [[31, 33]] * 3)  # std 0.5
    cwd = row("cwd", [34.0, 35.0, 36.0], [[34, 36], [35, 35], [36, 34]])  # +3.0; halves +4.0, +2.0
    kd = row("kd", [30.0, 30.0, 30.0], [[30, 30]] * 3)
    teacher = row("teacher", [38.5], [[38, 39]])
    verdict = accuracy.pilot_verdict([teacher, baseline, kd, cwd], **rule)
    assert verdict["method"] == "cwd" and verdict["passes"]
    assert verdict["teacher_room"] == 3.5 and verdict["half_gains"] == [4.0, 2.0] and verdict["baseline_std"] == 0.5
    # the teacher only 2.5 above the method: no room
    assert not accuracy.pilot_verdict([row("teacher", [37.5], [[37, 38]]), baseline, kd, cwd], **rule)["passes"]
    # a baseline whose seeds spread by more than 1.0
    noisy = row("baseline", [30.0, 32.0, 34.0], [[31, 33]] * 3)
    assert not accuracy.pilot_verdict([teacher, noisy, kd, cwd], **rule)["passes"]
    # a gain that lives in one half of val: +5.5 and +0.5
    lopsided = row("cwd", [34.0, 35.0, 36.0], [[36.5, 33.5]] * 3)
    verdict = accuracy.pilot_verdict([teacher, baseline, kd, lopsided], **rule)
    assert verdict["half_gains"] == [5.5, 0.5] and not verdict["passes"]
    # the CamVid pilot's rule alone ignores all three
    assert accuracy.pilot_verdict([row("teacher", [33.0], [[33, 33]]), noisy, kd, lopsided])["passes"]


def test_accuracy_scores_every_run_on_the_settings_val_halves_too(tmp_path, monkeypatch):
    from bench import accuracy

    halves = (tmp_path / "a.txt", tmp_path / "b.txt")
    halves[0].write_text("0\n1\n")
    halves[1].write_text("2\n3\n")
    monkeypatch.setitem(accuracy.SETTINGS, "synthetic", {**accuracy.SETTINGS["synthetic"], "halves": halves})
    tiny = ["--iters", "2", "--batch-size", "2", "--synthetic-length", "4", "--synthetic-size", "32", "--width", "0.125"]
    argv = ["--rows", "baseline", "--seeds", "0", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path), "--", *tiny]
    rows = accuracy.main(argv)
    run = tmp_path / "runs" / "synthetic" / "baseline_s0"
    result = json.loads((run / "result.json").read_text())
    assert len(result["halves_mIoU"]) == 2 and rows[1]["halves_mIoU_mean"] == result["halves_mIoU"]
    assert json.loads((run / "eval_half1.json").read_text())["frames"] == str(halves[1])
    # a run finished before its setting had halves is scored on them, not trained again
    del result["halves_mIoU"]
    (run / "result.json").write_text(json.dumps(result))
    (run / "log.jsonl").unlink()
    assert accuracy.main(argv)[1]["halves_mIoU_mean"] == rows[1]["halves_mIoU_mean"]


def test_cross_domain_scores_finished_runs_in_and_out_of_domain_over_the_shared_classes(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import train
    from bench import accuracy, cross_domain
    from data import IDD_LITE_CLASSES

    rng = np.random.default_rng(50)
    for split in ("train", "val"):  # one CamVid frame and one IDD-Lite frame per split
        for path, array in ((tmp_path / "camvid" / split / "f.png", rng.integers(0, 255, (24, 32, 3))),
                            (tmp_path / "camvid" / f"{split}annot" / "f.png", rng.integers(0, 12, (24, 32))),
                            (tmp_path / "idd" / "leftImg8bit" / split / "0" / "000001_image.jpg",
                             rng.integers(0, 255, (24, 32, 3))),
                            (tmp_path / "idd" / "gtFine" / split / "0" / "000001_label.png", rng.integers(0, 7, (24, 32)))):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(path)
    common = ["--dataset", "camvid", "--image-scale", "0.5", "--crop-size", "32", "--batch-size", "1", "--workers", "0",
              "--width", "0.0625", "--iters", "1"]
    monkeypatch.setitem(accuracy.SETTINGS, "tiny-camvid", {"common": common, "teacher": [], "student": []})
    runs = tmp_path / "runs"
    for name, seed in (("teacher", 0), ("baseline", 0), ("baseline", 1)):
        folder = accuracy.run_dir(runs / "tiny-camvid", name, seed)
        train.main(common + ["--data-root", str(tmp_path / "camvid"), "--seed", str(seed), "--out", str(folder)])
        (folder / "result.json").write_text("{}")
    argv = ["--settings", "tiny-camvid", "--table", "pilot", "--runs", str(runs), "--out", str(tmp_path),
            "--data-root", f"camvid={tmp_path / 'camvid'}", f"idd_lite={tmp_path / 'idd'}"]
    rows = cross_domain.main(argv)
    assert [(r["name"], len(r["in_domain"])) for r in rows] == [("teacher", 1), ("baseline", 2)]
    baseline = accuracy.run_dir(runs / "tiny-camvid", "baseline", 1)
    inside = json.loads((baseline / "cross_in.json").read_text())
    outside = json.loads((baseline / "cross_out.json").read_text())
    assert list(inside["per_class"]) == list(outside["per_class"]) == list(IDD_LITE_CLASSES)
    assert (inside["dataset"], outside["dataset"]) == ("camvid", "idd_lite")
    assert rows[1]["in_domain"][1] == inside["mIoU"] and rows[1]["other_domain"][1] == outside["mIoU"]
    assert rows[1]["drop"] == pytest.approx(rows[1]["in_domain_mean"] - rows[1]["other_domain_mean"])
    # kept beside each run: without the checkpoints the table is the same
    for folder in runs.glob("tiny-camvid/*"):
        (folder / "last.pt").unlink()
    assert cross_domain.main(argv) == rows
    assert json.loads((tmp_path / "cross_domain.json").read_text())["rows"] == rows
