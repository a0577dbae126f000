import fcntl
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

import train
from data import DATASETS, SYNTHETIC_CLASSES, build_dataset
from fckd import FCKDLoss
from losses import loss_settings
from models import build_model
from run import (CHECKPOINT_KEYS, Interrupted, ResumableSampler, SeededSamples, file_sha256, load_checkpoint,
                 run_cli, save_checkpoint, training_batches)
from utils import dataset_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = len(SYNTHETIC_CLASSES)


pytestmark = pytest.mark.usefixtures("one_thread")


# 16 synthetic 32 x 32 images per split, 8-channel nets, 4 batches of 4 per epoch
TINY = ["--synthetic-length", "16", "--synthetic-size", "32", "--width", "0.125", "--batch-size", "4",
        "--workers", "0", "--log-every", "1"]


def run(out, *flags):
    train.main(TINY + ["--out", str(out)] + [str(f) for f in flags])
    return load_checkpoint(os.path.join(out, "last.pt"))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_state(a, b, exact=True):
    assert a.keys() == b.keys()
    for key in a:
        if exact or not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A ResNet-50 teacher (a different architecture from the student), 2 iterations."""
    out = tmp_path_factory.mktemp("teacher")
    run(out, "--model", "deeplabv3_resnet50", "--iters", 2)
    return os.path.join(out, "last.pt")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The student without distillation, 2 iterations: what each --kd run starts from."""
    out = tmp_path_factory.mktemp("baseline")
    return run(out, "--iters", 2)


# -----------------------------------------------------------------------------
# the three jobs


def test_training_writes_checkpoints_log_and_a_final_json_summary(tmp_path, capsys):
    ckpt = run(tmp_path, "--iters", 3, "--val-every", 2)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert set(ckpt) == set(CHECKPOINT_KEYS)  # train.checkpoint_state writes every key, and no other
    assert ckpt["iteration"] == 3 and ckpt["num_classes"] == NUM_CLASSES and ckpt["dataset"] == "synthetic"
    assert ckpt["model_name"] == "deeplabv3_resnet18"
    assert ckpt["model_options"] == {"width": 0.125, "output_stride": 8, "head_channels": None}
    assert ckpt["args"]["iters"] == 3 and json.dumps(ckpt["args"])  # plain, JSON-able args

    log = read_log(tmp_path)
    steps = [r for r in log if "loss" in r]
    vals = [r for r in log if "val" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    assert [r["lr"] for r in steps] == pytest.approx([DATASETS["synthetic"].defaults["lr"] * (1 - i / 3) ** 0.9 for i in range(3)])
    for r in steps:
        assert r["loss"] == pytest.approx(r["ce"] + r["aux"], rel=1e-5)
    assert [r["iter"] for r in vals] == [2, 3]
    best = max(vals, key=lambda r: r["val"]["mIoU"])
    assert summary["best_mIoU"] == best["val"]["mIoU"] and summary["best_iteration"] == best["iter"]
    assert summary["last_mIoU"] == vals[-1]["val"]["mIoU"] and summary["iterations"] == 3
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == best["iter"]


@pytest.mark.parametrize("kd", ["fckd", "kd", "cwd"])
def test_distilled_student_trains_with_a_frozen_teacher_from_its_checkpoint(tmp_path, kd, teacher_ckpt, baseline):
    teacher_before = load_checkpoint(teacher_ckpt)["model"]
    # a 2-iteration teacher is unsure everywhere: threshold 1 keeps every pixel, so the FCKD term is not 0
    ckpt = run(tmp_path, "--iters", 2, "--teacher-ckpt", teacher_ckpt, "--kd", kd,
               *(["--fckd-threshold", 1.0] if kd == "fckd" else []))

    steps = [r for r in read_log(tmp_path) if "loss" in r]
    for r in steps:
        assert r["kd"] > 0 and r["loss"] == pytest.approx(r["ce"] + r["aux"] + r["kd"], rel=1e-5)
        assert r.get("keep_ratio") == (1.0 if kd == "fckd" else None)
    # the first step starts from the baseline's weights, so a different result is the kd term's doing
    assert any(not torch.equal(v, baseline["model"][k]) for k, v in ckpt["model"].items() if v.is_floating_point())
    assert_same_state(load_checkpoint(teacher_ckpt)["model"], teacher_before)


def test_bf16_autocast_runs_on_cpu(tmp_path, teacher_ckpt):
    ckpt = run(tmp_path, "--iters", 1, "--teacher-ckpt", teacher_ckpt, "--amp", "bf16", "--fckd-threshold", 1.0)
    assert ckpt["args"]["amp"] == "bf16"
    assert all(torch.isfinite(torch.tensor(v)) for k, v in read_log(tmp_path)[0].items() if k != "iter")
    assert ckpt["model"]["classifier.weight"].dtype == torch.float32  # autocast leaves the weights in fp32


def test_fckd_flags_default_to_fckdloss_defaults():
    args = train.parse_args(["--teacher-ckpt", "t.pt"])
    assert args.kd == "fckd"
    defaults = {name: p.default for name, p in inspect.signature(FCKDLoss).parameters.items()}
    # train.py's nets give logits at the backbone's stride, not upsampled: no downsampling
    assert defaults.pop("downsample") == 1
    assert defaults == {"condense": args.fckd_condense, "threshold": args.fckd_threshold, "keep": args.fckd_keep,
                        "apply": args.fckd_apply, "similarity": args.fckd_similarity,
                        "temperature": args.fckd_temperature, "gamma": args.fckd_gamma,
                        "tau_spatial": args.tau_spatial, "tau_channel": args.tau_channel,
                        "lambda_spatial": args.lambda_spatial, "lambda_channel": args.lambda_channel}
    assert loss_settings("fckd", vars(args)) == defaults


def test_fckd_flags_map_one_to_one_to_fckdloss():
    args = train.parse_args(["--teacher-ckpt", "t.pt", "--fckd-threshold", "0.4", "--fckd-apply", "multiply",
                             "--fckd-similarity", "dot", "--fckd-temperature", "0.05", "--fckd-gamma", "0.5",
                             "--tau-spatial", "2", "--tau-channel", "3", "--lambda-spatial", "0.5",
                             "--lambda-channel", "2"])
    assert loss_settings("fckd", vars(args)) == {
        "condense": "hard", "threshold": 0.4, "keep": 0.8, "apply": "multiply", "similarity": "dot",
        "temperature": 0.05, "gamma": 0.5, "tau_spatial": 2.0, "tau_channel": 3.0, "lambda_spatial": 0.5,
        "lambda_channel": 2.0}
    args = train.parse_args(["--teacher-ckpt", "t.pt", "--fckd-condense", "quantile", "--fckd-keep", "0.6"])
    assert loss_settings("fckd", vars(args))["keep"] == 0.6


@pytest.mark.parametrize("flags, named", [
    ([], "--fckd-gamma --tau-spatial do nothing in a run without a teacher"),
    (["--teacher-ckpt", "t.pt", "--kd", "kd"], "--fckd-gamma --tau-spatial"),
    (["--teacher-ckpt", "t.pt", "--kd", "cwd"], "--fckd-gamma --tau-spatial do nothing in a run with --kd cwd"),
])
def test_loss_flags_a_run_does_not_use_are_refused_by_name(capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags + ["--fckd-gamma", "2", "--tau-spatial", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    if "--kd kd" in " ".join(flags):  # KD uses --tau-spatial
        assert "--fckd-gamma does nothing in a run with --kd kd" in err
    else:
        assert named in err


@pytest.mark.parametrize("flags, named", [
    (["--fckd-condense", "quantile", "--fckd-threshold", "0.5"], "--fckd-threshold does nothing"),
    (["--fckd-keep", "0.6"], "--fckd-keep does nothing"),
    (["--fckd-temperature", "0.2"], "--fckd-temperature does nothing"),  # gamma 0: no enhancement
    (["--fckd-similarity", "dot"], "--fckd-similarity does nothing"),
])
def test_fckd_flags_its_own_setting_leaves_unused_are_refused(capsys, flags, named):
    with pytest.raises(SystemExit):
        train.parse_args(["--teacher-ckpt", "t.pt"] + flags)
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--data-root", "x"], "--data-root does nothing in this run (the synthetic set is generated)"),
    (["--dataset", "camvid", "--synthetic-size", "32"], "--synthetic-size does nothing in this run"),
    (["--image-scale", "0.5"], "--image-scale does nothing in this run"),
    (["--teacher-ckpt", ""], "--teacher-ckpt is empty: give a path, or leave the flag out"),
    (["--labelled-list", ""], "--labelled-list is empty"),
    (["--resume", ""], "--resume is empty"),
    (["--out", ""], "--out is empty"),
])
def test_empty_paths_and_flags_that_do_nothing_are_refused_by_name(capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_revision_2_fckd_trains(tmp_path, teacher_ckpt):
    run(tmp_path, "--iters", 2, "--teacher-ckpt", teacher_ckpt, "--fckd-apply", "mask", "--fckd-similarity", "cosine",
        "--fckd-temperature", "0.1", "--fckd-gamma", "0.5", "--fckd-threshold", 1.0, "--log-every", 1)
    for r in read_log(tmp_path):
        if "kd" in r:
            assert r["kd"] > 0 and r["keep_ratio"] == 1.0
            assert r["loss"] == pytest.approx(r["ce"] + r["aux"] + r["kd"], rel=1e-5)


def test_per_dataset_defaults():
    synthetic = train.parse_args([])
    assert (synthetic.model, synthetic.width) == ("deeplabv3_resnet18", 0.125)
    assert synthetic.out == os.path.join("runs", "synthetic_deeplabv3_resnet18_s0")
    voc = train.parse_args(["--dataset", "voc", "--lr", "0.01"])
    assert (voc.iters, voc.batch_size, voc.lr, voc.crop_size, voc.width) == (40000, 16, 0.01, [512, 512], 1.0)
    assert train.parse_args(["--dataset", "cityscapes"]).crop_size == [512, 1024]
    assert train.parse_args(["--dataset", "camvid"]).crop_size == [360, 360]


# -----------------------------------------------------------------------------
# resume


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path, monkeypatch):
    flags = ["--iters", 7, "--val-every", 3, "--save-every", 5]  # last.pt at 3, 5, 6, 7; validation at 3, 6, 7
    uninterrupted = run(tmp_path / "a", *flags)

    real_losses, calls = train.train_losses, []

    def crash_in_step_6(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # weights are at step 5, last.pt too, mid-epoch (4 steps per epoch)
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(train, "train_losses", crash_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *flags)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 5
    monkeypatch.setattr(train, "train_losses", real_losses)

    # resume with a data worker process: augmentation is seeded per sample, so it does not matter
    resumed = run(tmp_path / "b", *flags, "--resume", "auto", "--workers", 1)
    assert resumed["iteration"] == 7
    assert_same_state(resumed["model"], uninterrupted["model"])
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert resumed["best_miou"] == uninterrupted["best_miou"]
    assert [r["lr"] for r in read_log(tmp_path / "b") if "lr" in r][-2:] == \
        [r["lr"] for r in read_log(tmp_path / "a") if "lr" in r][-2:]


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory, teacher_ckpt):
    """A baseline and an FCKD run of 2 of 4 iterations each (last.pt at 2), to resume with other flags."""
    root = tmp_path_factory.mktemp("stopped")
    flags = ["--iters", 4, "--save-every", 2]
    real_losses = train.train_losses

    def stop_after_two(*args, **kwargs):  # KeyboardInterrupt in step 3: last.pt holds iteration 2
        stop_after_two.calls += 1
        if stop_after_two.calls == 3:
            raise KeyboardInterrupt
        return real_losses(*args, **kwargs)

    for name, extra in (("baseline", []), ("fckd", ["--teacher-ckpt", teacher_ckpt])):
        stop_after_two.calls = 0
        train.train_losses = stop_after_two
        try:
            with pytest.raises(KeyboardInterrupt):
                run(root / name, *flags, *extra)
        finally:
            train.train_losses = real_losses
    return root, [str(f) for f in flags]


def resume_error(capsys, out, flags):
    return cli_error(capsys, TINY + ["--out", str(out), "--resume", "auto"] + flags)


@pytest.mark.parametrize("changed, named", [
    # data
    (["--synthetic-length", "8"], ["--synthetic-length: 16 in the checkpoint, 8 now"]),
    (["--synthetic-size", "48"], ["--synthetic-size: 32 in the checkpoint, 48 now"]),
    # schedule and optimiser: each differing flag is named, with both values
    (["--iters", "3", "--lr", "0.01"],
     ["--iters: 4 in the checkpoint, 3 now", "--lr: 0.1 in the checkpoint, 0.01 now"]),
    (["--batch-size", "2"], ["--batch-size: 4 in the checkpoint, 2 now"]),
    (["--seed", "1"], ["--seed: 0 in the checkpoint, 1 now"]),
    (["--crop-size", "32"], ["--crop-size: None in the checkpoint, [32, 32] now"]),
    (["--weight-decay", "0"], ["--weight-decay: 0.0001 in the checkpoint, 0.0 now"]),
    (["--amp", "bf16"], ["--amp: None in the checkpoint, 'bf16' now"]),
    # model
    (["--output-stride", "16"], ["--output-stride: 8 in the checkpoint, 16 now"]),
])
def test_resume_refuses_changed_settings_naming_each_flag(stopped_runs, capsys, changed, named):
    root, flags = stopped_runs
    err = resume_error(capsys, root / "baseline", flags + changed)
    assert err.startswith(f"error: cannot resume from {root / 'baseline' / 'last.pt'}: this run's settings differ")
    for text in named:
        assert text in err
    assert err.count(" in the checkpoint, ") == len(named)  # nothing else is named
    assert "start a new run (another --out, or --overwrite to replace this one)" in err
    assert load_checkpoint(root / "baseline" / "last.pt")["iteration"] == 2  # untouched


def test_resume_refuses_to_turn_a_baseline_into_a_distilled_run(stopped_runs, capsys, teacher_ckpt):
    root, flags = stopped_runs
    for kd in ("kd", "fckd"):
        err = resume_error(capsys, root / "baseline", flags + ["--teacher-ckpt", teacher_ckpt, "--kd", kd])
        assert f"--kd: None in the checkpoint, '{kd}' now" in err
        assert f"--teacher-ckpt: None in the checkpoint, '{teacher_ckpt}' now" in err
        assert "the teacher checkpoint's content (SHA-256): None in the checkpoint" in err


@pytest.mark.parametrize("changed, named", [
    (["--fckd-gamma", "1.0"], "--fckd-gamma: 0.0 in the checkpoint, 1.0 now"),
    (["--fckd-condense", "quantile"], "--fckd-condense: 'hard' in the checkpoint, 'quantile' now"),
    (["--fckd-threshold", "0.5"], "--fckd-threshold: 0.7 in the checkpoint, 0.5 now"),
    (["--tau-channel", "2"], "--tau-channel: 4.0 in the checkpoint, 2.0 now"),
    (["--kd", "cwd"], "--kd: 'fckd' in the checkpoint, 'cwd' now"),
])
def test_resume_refuses_changed_distillation_settings(stopped_runs, capsys, teacher_ckpt, changed, named):
    root, flags = stopped_runs
    err = resume_error(capsys, root / "fckd", flags + ["--teacher-ckpt", teacher_ckpt] + changed)
    assert named in err and err.count(" in the checkpoint, ") == 1


def test_resume_refuses_a_teacher_file_that_changed_on_disk(stopped_runs, capsys, teacher_ckpt, tmp_path):
    root, flags = stopped_runs
    changed = tmp_path / "teacher.pt"  # the same path, other bytes: a copy of the run and its teacher, re-saved
    checkpoint = load_checkpoint(teacher_ckpt)
    checkpoint["best_miou"] = 99.0
    save_checkpoint(checkpoint, changed)
    run_copy = tmp_path / "fckd"
    run_copy.mkdir()
    student = load_checkpoint(root / "fckd" / "last.pt")
    assert student["args"]["teacher_sha256"] == file_sha256(teacher_ckpt)
    student["args"]["teacher_ckpt"] = str(changed)  # as if the run had been started with this path
    save_checkpoint(student, run_copy / "last.pt")
    err = resume_error(capsys, run_copy, flags + ["--teacher-ckpt", str(changed)])
    assert (f"the teacher checkpoint's content (SHA-256): '{file_sha256(teacher_ckpt)}' in the checkpoint, "
            f"'{file_sha256(changed)}' now") in err
    assert err.count(" in the checkpoint, ") == 1


def test_resume_accepts_settings_that_do_not_change_the_result(stopped_runs, tmp_path, teacher_ckpt):
    root, flags = stopped_runs
    for name, extra in (("baseline", []), ("fckd", ["--teacher-ckpt", teacher_ckpt])):
        out = tmp_path / name
        out.mkdir()
        save_checkpoint(load_checkpoint(root / name / "last.pt"), out / "last.pt")
        resumed = run(out, *flags, *extra, "--resume", "auto", "--workers", 1, "--log-every", 3, "--val-every", 4,
                      "--save-every", 1)
        assert resumed["iteration"] == 4


def test_resume_ignores_loss_flags_the_run_does_not_use(stopped_runs, tmp_path):
    """A baseline is not trained with FCKD's flags: a changed FCKD default must not orphan it."""
    root, flags = stopped_runs
    out = tmp_path / "baseline"
    out.mkdir()
    checkpoint = load_checkpoint(root / "baseline" / "last.pt")
    checkpoint["args"].update(fckd_gamma=2.0, tau_spatial=3.0)  # the defaults when it was trained
    save_checkpoint(checkpoint, out / "last.pt")
    assert run(out, *flags, "--resume", "auto")["iteration"] == 4


def test_a_checkpoint_trained_without_enhancement_resumes_as_gamma_0(stopped_runs, tmp_path, teacher_ckpt):
    """Spec revision 4 retired --no-fckd-enhance: such a run was trained with today's --fckd-gamma 0."""
    root, flags = stopped_runs
    out = tmp_path / "fckd"
    out.mkdir()
    checkpoint = load_checkpoint(root / "fckd" / "last.pt")
    checkpoint["args"].update(fckd_enhance=False, fckd_gamma=0.5)
    save_checkpoint(checkpoint, out / "last.pt")
    assert run(out, *flags, "--teacher-ckpt", teacher_ckpt, "--resume", "auto")["iteration"] == 4


def test_resume_of_a_checkpoint_without_a_newer_setting_takes_its_default(stopped_runs, tmp_path):
    """A checkpoint written before a flag existed was trained with that flag's default."""
    root, flags = stopped_runs
    out = tmp_path / "older"
    out.mkdir()
    checkpoint = load_checkpoint(root / "baseline" / "last.pt")
    for key in ("labelled_list", "fckd_keep", "teacher_sha256"):
        del checkpoint["args"][key]
    save_checkpoint(checkpoint, out / "last.pt")
    assert run(out, *flags, "--resume", "auto")["iteration"] == 4


# -----------------------------------------------------------------------------
# --labelled-list


def test_labelled_list_adds_unlabelled_frames_for_distillation_and_keeps_the_label_visits(tmp_path, teacher_ckpt):
    listing = tmp_path / "labelled.txt"
    listing.write_text("0\n3\n5\n9\n")  # 4 frames of 16: one labelled batch of 4 per epoch
    common = TINY + ["--labelled-list", str(listing)]
    distilled = train.parse_args(common + ["--out", str(tmp_path / "d"), "--teacher-ckpt", teacher_ckpt,
                                           "--unlabelled-batch-size", "2"])
    train_set, _, streams = train.training_data(distilled, 0, 1, False)
    (labelled, _, labelled_per_epoch), (unlabelled, _, unlabelled_per_epoch) = streams
    assert len(train_set) == 16 and (labelled_per_epoch, unlabelled_per_epoch) == (1, 6)  # 12 unlisted frames
    assert all((labelled.dataset[(0, i)][1] != 255).any() for i in range(4))
    assert all((unlabelled.dataset[(0, i)][1] == 255).all() for i in range(12))
    images, labels = next(training_batches(streams, 0))
    assert images.shape[0] == 6 and (labels[:4] != 255).any() and (labels[4:] == 255).all()
    baseline = train.parse_args(common + ["--out", str(tmp_path / "b")])
    _, _, streams = train.training_data(baseline, 0, 1, False)
    assert len(streams) == 1 and streams[0][2] == 1  # only the listed frames, at the same batch size
    assert train.parse_args(common + ["--out", str(tmp_path / "d"), "--teacher-ckpt", teacher_ckpt]
                            ).unlabelled_batch_size == 4  # default: as many as the labelled ones

    ckpt = run(tmp_path / "run", "--iters", 4, "--teacher-ckpt", teacher_ckpt, "--labelled-list", listing)
    assert ckpt["args"]["labelled_list"] == str(listing) and ckpt["iteration"] == 4
    assert ckpt["unlabelled_batches"] == 0  # every batch holds its 4 labelled frames


def test_unlabelled_batch_size_without_a_labelled_list_and_a_teacher_is_refused(tmp_path, capsys, teacher_ckpt):
    err = cli_error(capsys, TINY + ["--out", str(tmp_path / "b"), "--unlabelled-batch-size", "4",
                                    "--teacher-ckpt", teacher_ckpt])
    assert "--unlabelled-batch-size does nothing in this run (it adds frames without labels to a run" in err


def test_a_labelled_list_with_fewer_frames_than_a_batch_is_refused(tmp_path, capsys):
    listing = tmp_path / "labelled.txt"
    listing.write_text("3\n5\n")
    err = cli_error(capsys, TINY + ["--out", str(tmp_path / "b"), "--labelled-list", str(listing)])
    assert err == f"error: the synthetic labelled list {listing} has 2 images, fewer than the global batch size 4"


def test_seeded_samples_repeat_per_epoch_and_leave_the_global_rng_alone():
    data = SeededSamples(build_dataset("synthetic", None, "train", True, length=4, image_size=32), seed=0)
    state = torch.get_rng_state()
    first = data[(0, 3)][0]
    assert torch.equal(data[(0, 3)][0], first)  # the same sample in the same epoch: the same augmentation
    later = [data[(epoch, 3)][0] for epoch in range(1, 8)]  # the synthetic set's augmentation is a random flip
    assert any(torch.equal(x, first) for x in later) and any(torch.equal(x, first.flip(-1)) for x in later)
    assert torch.equal(torch.get_rng_state(), state)


def test_resumable_sampler_skips_the_consumed_part_of_an_epoch():
    dataset = list(range(11))
    full = list(ResumableSampler(dataset, 2, 1, seed=3))
    assert len(full) == 5 and all(epoch == 0 for epoch, _ in full)
    sampler = ResumableSampler(dataset, 2, 1, seed=3)
    sampler.start = 2
    assert list(sampler) == full[2:] and len(sampler) == 3
    sampler.set_epoch(1)
    sampler.start = 0
    assert [i for _, i in sampler] != [i for _, i in full]


# -----------------------------------------------------------------------------
# DDP


def test_ddp_on_two_cpu_processes_matches_one_process_accumulating_the_same_micro_batches(tmp_path):
    flags = TINY + ["--iters", "3", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["iterations"] == 3
    assert result.stdout.count("iteration 3: aAcc") == 1  # only rank 0 prints
    ddp = load_checkpoint(tmp_path / "last.pt")
    assert len(ddp["rng"]) == 2

    # the reference: one process, rank r's micro-batch and dropout RNG in turn, gradients averaged;
    # BatchNorm statistics are rank 0's (DDP broadcasts rank 0's buffers before every forward)
    args = train.parse_args(flags)
    world, per_rank = 2, args.batch_size // 2
    train_set = build_dataset("synthetic", None, "train", True, length=16, image_size=32)
    data = SeededSamples(train_set, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, NUM_CLASSES, width=args.width)
    rng = []
    for rank in range(world):
        torch.manual_seed(args.seed + rank)
        rng.append(torch.get_rng_state())
    samplers = [iter(ResumableSampler(train_set, world, rank, args.seed)) for rank in range(world)]
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    for iteration in range(args.iters):
        for group in optimizer.param_groups:
            group["lr"] = train.poly_lr(args.lr, iteration, args.iters)
        optimizer.zero_grad()
        for rank in range(world):
            images, labels = default_collate([data[next(samplers[rank])] for _ in range(per_rank)])
            torch.set_rng_state(rng[rank])
            (train.train_losses(model, images, labels)["loss"] / world).backward()
            rng[rank] = torch.get_rng_state()
            if rank == 0:
                rank0_buffers = {name: b.clone() for name, b in model.named_buffers()}
        for name, buffer in model.named_buffers():
            buffer.copy_(rank0_buffers[name])
        optimizer.step()
    reference = model.state_dict()
    torch.manual_seed(args.seed)
    initial = build_model(args.model, NUM_CLASSES, width=args.width).state_dict()
    assert not torch.equal(reference["classifier.weight"], initial["classifier.weight"])  # it did train
    assert_same_state(ddp["model"], reference, exact=False)


# -----------------------------------------------------------------------------
# clear errors


def cli_error(capsys, argv):
    """Run train.py's CLI in-process; return the last line it printed to stderr (after tqdm's
    progress bar), asserting exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train.main(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_teacher_with_the_wrong_class_count_is_refused(tmp_path, capsys):
    options = {"width": 0.125, "output_stride": 8, "head_channels": None}
    teacher = build_model("deeplabv3_resnet18", 4, **options)
    path = tmp_path / "voc_like_teacher.pt"
    save_checkpoint({"model": teacher.state_dict(), "optimizer": {}, "scaler": {}, "iteration": 1, "args": {},
                     "rng": [], "best_miou": None, "num_classes": 4, "dataset": "synthetic",
                     "model_name": "deeplabv3_resnet18", "model_options": options}, path)
    err = cli_error(capsys, TINY + ["--out", str(tmp_path / "s"), "--teacher-ckpt", str(path)])
    assert err.startswith("error: teacher checkpoint") and f"predicts 4 classes, the synthetic set has {NUM_CLASSES}" in err


def test_missing_checkpoints_are_named(tmp_path, capsys):
    missing = str(tmp_path / "nope.pt")
    assert cli_error(capsys, TINY + ["--out", str(tmp_path), "--teacher-ckpt", missing]) == \
        f"error: --teacher-ckpt not found: {missing}"
    assert cli_error(capsys, TINY + ["--out", str(tmp_path), "--resume", missing]) == \
        f"error: checkpoint not found: {missing}"


def test_kd_without_a_teacher_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--kd", "cwd"])
    assert exit_info.value.code == 2
    assert "--kd cwd needs a teacher: pass --teacher-ckpt PATH" in capsys.readouterr().err


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_losses, calls = train.train_losses, []

    def nan_from_step_4(*args, **kwargs):
        losses = real_losses(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train, "train_losses", nan_from_step_4)
    err = cli_error(capsys, TINY + ["--out", str(tmp_path), "--iters", "6", "--save-every", "2", "--log-every", "5"])
    last = str(tmp_path / "last.pt")
    assert err == (f"error: the loss is not finite at iteration 4; training stopped ({last} holds iteration 2, "
                   "the last good state)")
    ckpt = load_checkpoint(last)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# -----------------------------------------------------------------------------
# the nets from torchvision's zoo, end to end at tiny size

def assert_finite_losses(out, keys):
    steps = [r for r in read_log(out) if "loss" in r]
    assert steps and all(key in r for r in steps for key in keys)
    assert torch.isfinite(torch.tensor([r[key] for r in steps for key in keys])).all()


def test_wide_resnet50_2_teacher_trains(tmp_path):
    """The paper's wide teacher. torchvision's wide_resnet50_2 has no width multiplier, so it trains
    at width 1 (85 M parameters) on 4 images of 32 x 32, for one iteration."""
    ckpt = run(tmp_path, "--model", "deeplabv3_wide_resnet50_2", "--width", 1, "--synthetic-length", 4,
               "--batch-size", 2, "--iters", 1)
    assert ckpt["iteration"] == 1 and ckpt["model_name"] == "deeplabv3_wide_resnet50_2"
    assert ckpt["model_options"]["width"] == 1.0
    assert_finite_losses(tmp_path, ("loss", "ce", "aux"))


def test_mobilenet_v2_student_distils_from_an_r18_teacher_with_fckd(tmp_path):
    """CIRKD's other student (MobileNetV2, width 1/8) under FCKD from a tiny ResNet-18 teacher."""
    teacher = run(tmp_path / "teacher", "--model", "deeplabv3_resnet18", "--iters", 1)
    assert teacher["model_name"] == "deeplabv3_resnet18" and teacher["model_options"]["width"] == 0.125
    ckpt = run(tmp_path / "student", "--model", "deeplabv3_mobilenet_v2", "--teacher-ckpt",
               tmp_path / "teacher" / "last.pt", "--kd", "fckd", "--iters", 2)
    assert ckpt["iteration"] == 2 and ckpt["model_name"] == "deeplabv3_mobilenet_v2"
    assert ckpt["args"]["kd"] == "fckd"
    assert_finite_losses(tmp_path / "student", ("loss", "ce", "aux", "kd", "keep_ratio"))


# -----------------------------------------------------------------------------
# no run lost, no silent wrong answer (issue 15): each test failed before its fix


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    run(tmp_path, "--iters", 1)
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt", "log.jsonl")}
    err = cli_error(capsys, TINY + ["--out", str(tmp_path), "--iters", "1"])
    assert err == (f"error: {tmp_path} already holds a run (last.pt, best.pt, log.jsonl); continue it with "
                   "--resume auto, start it afresh with --overwrite, or choose another --out")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    # --overwrite starts afresh: the old run's files are gone before the new run writes its own
    (tmp_path / "best.pt").write_bytes(b"the old run's")
    ckpt = run(tmp_path, "--iters", 2, "--overwrite")
    assert ckpt["iteration"] == 2 and [r["iter"] for r in read_log(tmp_path) if "loss" in r] == [1, 2]
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 2


def run_files(out):
    """The bytes of every run file in `out`: what a refused command must leave exactly as it was."""
    return {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "log.jsonl") if (out / name).exists()}


def test_resume_into_a_folder_that_holds_another_run_is_refused(tmp_path, capsys):
    run(tmp_path / "A", "--iters", 2)
    run(tmp_path / "B", "--iters", 2)
    before = run_files(tmp_path / "A")
    err = cli_error(capsys, TINY + ["--iters", "2", "--resume", str(tmp_path / "B" / "last.pt"),
                                    "--out", str(tmp_path / "A")])
    assert err == (f"error: {tmp_path / 'A'} already holds a run (last.pt, best.pt, log.jsonl) that --resume "
                   f"{tmp_path / 'B' / 'last.pt'} is not: resume into the checkpoint's own folder (--out "
                   f"{tmp_path / 'B'}) or an empty one, or pass --overwrite instead to replace this run")
    assert run_files(tmp_path / "A") == before
    # into the checkpoint's own folder, or an empty one, it resumes
    for out in ("C", "B"):
        train.main(TINY + ["--iters", "2", "--resume", str(tmp_path / "B" / "last.pt"), "--out", str(tmp_path / out)])
        assert f"resuming from {tmp_path / 'B' / 'last.pt'} at iteration 2" in capsys.readouterr().out


def test_overwrite_checks_every_input_before_it_removes_the_old_run(tmp_path, capsys):
    run(tmp_path, "--iters", 2)
    before = run_files(tmp_path)
    for flag, value in (("--teacher-ckpt", tmp_path / "typo.pt"), ("--labelled-list", tmp_path / "typo.txt"),
                        ("--pretrained-backbone", tmp_path / "typo.pth")):
        err = cli_error(capsys, TINY + ["--iters", "2", "--overwrite", "--out", str(tmp_path), flag, str(value)])
        assert str(value) in err
        assert run_files(tmp_path) == before
    assert run(tmp_path, "--iters", 1, "--overwrite")["iteration"] == 1  # all inputs good: the old run goes


def test_resume_auto_without_last_pt_where_a_run_is_is_refused(tmp_path, capsys):
    run(tmp_path, "--iters", 2)
    (tmp_path / "last.pt").unlink()
    before = run_files(tmp_path)
    err = cli_error(capsys, TINY + ["--iters", "2", "--lr", "0.05", "--resume", "auto", "--out", str(tmp_path)])
    assert err == (f"error: {tmp_path} already holds a run (best.pt, log.jsonl) but no last.pt to continue it from; "
                   "start it afresh with --overwrite, or choose another --out")
    assert run_files(tmp_path) == before


def test_resume_compares_the_labelled_lists_content_not_its_path(tmp_path, capsys):
    listing = tmp_path / "labelled.txt"
    listing.write_text("0\n3\n5\n9\n")
    out = tmp_path / "run"
    run(out, "--iters", 2, "--labelled-list", listing)
    checkpoint = run_files(out)
    copy = tmp_path / "elsewhere" / "list.txt"  # the same frames under another path: the same run
    copy.parent.mkdir()
    copy.write_text(listing.read_text())
    assert run(out, "--iters", 2, "--labelled-list", copy, "--resume", "auto")["iteration"] == 2
    for name, data in checkpoint.items():
        (out / name).write_bytes(data)
    listing.write_text("0\n3\n5\n10\n")  # edited in place: another run
    err = cli_error(capsys, TINY + ["--iters", "2", "--labelled-list", str(listing), "--resume", "auto",
                                    "--out", str(out)])
    assert "the labelled list's content (SHA-256): " in err and err.count(" in the checkpoint, ") == 1


def write_camvid(root, frames):
    """A tiny CamVid tree: `frames` 32 x 40 train frames and one val frame, labels 0..11."""
    rng = np.random.default_rng(len(frames))
    for split, names in (("train", frames), ("val", ["v0"])):
        for name in names:
            for folder, array in ((split, rng.integers(0, 255, (32, 40, 3))), (split + "annot", rng.integers(0, 12, (32, 40)))):
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array.astype(np.uint8)).save(root / folder / f"{name}.png")


def test_resume_refuses_frames_added_to_the_data_split_and_takes_the_same_files_elsewhere(tmp_path, capsys):
    camvid = ["--dataset", "camvid", "--crop-size", "32", "--width", "0.0625", "--batch-size", "2", "--workers", "0"]
    write_camvid(tmp_path / "data", ["a", "b"])
    out = tmp_path / "run"
    train.main(camvid + ["--data-root", str(tmp_path / "data"), "--iters", "2", "--out", str(out)])
    saved = run_files(out)
    import shutil
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    train.main(camvid + ["--data-root", str(tmp_path / "moved"), "--iters", "2", "--resume", "auto", "--out", str(out)])
    assert "resuming from" in capsys.readouterr().out
    for name, data in saved.items():
        (out / name).write_bytes(data)
    write_camvid(tmp_path / "data", ["a", "b", "c"])  # a frame added under the same root
    err = cli_error(capsys, camvid + ["--data-root", str(tmp_path / "data"), "--iters", "2", "--resume", "auto",
                                      "--out", str(out)])
    assert "the data split's files (names and sizes): " in err and err.count(" in the checkpoint, ") == 1
    assert run_files(out) == saved


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                   crash_in_step):
    import run as run_module
    real_fsync = os.fsync
    restore = crash_in_step(3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--iters", 4, "--save-every", 2)
    restore()
    before = run_files(tmp_path)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module.os, "fsync", full_disk)
    err = cli_error(capsys, TINY + ["--iters", "4", "--save-every", "2", "--resume", "auto", "--out", str(tmp_path)])
    monkeypatch.setattr(run_module.os, "fsync", real_fsync)
    assert err.startswith(f"error: cannot write {tmp_path}") and err.endswith(" (No space left on device); the file "
                                                                              "there is as it was")
    assert (tmp_path / "last.pt").read_bytes() == before["last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]  # no temporary file left


def test_a_folder_with_other_files_is_not_a_run(tmp_path):
    (tmp_path / "output.log").write_text("what bench/accuracy.py writes before train.py starts\n")
    assert run(tmp_path, "--iters", 1)["iteration"] == 1


def test_default_out_differs_per_seed():
    assert train.parse_args(["--seed", "1"]).out != train.parse_args(["--seed", "2"]).out
    assert train.parse_args(["--teacher-ckpt", "t.pt", "--seed", "3"]).out == os.path.join(
        "runs", "synthetic_deeplabv3_resnet18_fckd_s3")


def test_a_second_run_on_a_locked_folder_fails_at_once(tmp_path, capsys):
    with open(tmp_path / ".lock", "a+") as lock:  # as the run holding the folder does
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("12345\n")
        lock.flush()
        err = cli_error(capsys, TINY + ["--out", str(tmp_path), "--iters", "1", "--resume", "auto"])
    assert err == (f"error: {tmp_path} is in use by another train.py run (pid 12345); wait for it to end or "
                   "choose another --out")
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing trained, nothing written


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = cli_error(capsys, TINY + ["--out", str(tmp_path / "file"), "--iters", "1"])
    assert err == f"error: --out {tmp_path / 'file'} is a file, not a folder"
    err = cli_error(capsys, TINY + ["--out", str(tmp_path / "file" / "run"), "--iters", "1"])
    assert err == f"error: --out {tmp_path / 'file' / 'run'} is not a writable folder (Not a directory)"


def test_a_non_finite_buffer_stops_the_run_before_it_is_saved(tmp_path, capsys, monkeypatch):
    """The loss can stay finite while a BatchNorm statistic is inf (--lr 1e3): last.pt must not take it."""
    real_losses, calls = train.train_losses, []

    def inf_statistic_in_step_3(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            dict(model.named_buffers())["backbone.bn1.running_var"].fill_(math.inf)
        return real_losses(model, *args, **kwargs)

    monkeypatch.setattr(train, "train_losses", inf_statistic_in_step_3)
    err = cli_error(capsys, TINY + ["--out", str(tmp_path), "--iters", "4", "--save-every", "2"])
    assert err == (f"error: iteration 4 left NaN or inf in 1 tensors of the model (backbone.bn1.running_var); "
                   f"training stopped ({tmp_path / 'last.pt'} holds iteration 2, the last good state)")
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_cross_entropy_of_a_batch_without_labels_is_zero_with_zero_gradient():
    logits = torch.randn(2, 8, 5, 6, requires_grad=True)
    loss = train.labelled_cross_entropy(logits, torch.full((2, 5, 6), 255))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
    # with labelled pixels: bit for bit F.cross_entropy's mean, value and gradient
    labels = torch.randint(0, 8, (2, 5, 6))
    labels[0, :2] = 255
    ours, = torch.autograd.grad(train.labelled_cross_entropy(logits, labels), logits)
    theirs, = torch.autograd.grad(F.cross_entropy(logits, labels, ignore_index=255), logits)
    assert torch.equal(train.labelled_cross_entropy(logits, labels), F.cross_entropy(logits, labels, ignore_index=255))
    assert torch.equal(ours, theirs)


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def make_camvid(root, void_stem=None, truncated=None):
    """A SegNet-layout CamVid: train 0001-0002, val 0003 (40 x 48, labels 0..11 with 11 = void).
    void_stem: that frame's label is all void; truncated: that frame's image is cut to half its bytes."""
    rng = np.random.default_rng(0)
    for split, stems in (("train", ("0001", "0002")), ("val", ("0003",))):
        for stem in stems:
            image = root / split / f"{stem}.png"
            save_png(image, rng.integers(0, 255, (40, 48, 3)))
            save_png(root / f"{split}annot" / f"{stem}.png",
                     np.full((40, 48), 11) if stem == void_stem else rng.integers(0, 12, (40, 48)))
            if stem == truncated:
                image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    return root


def camvid_flags(root, out):
    return ["--dataset", "camvid", "--data-root", str(root), "--crop-size", "32", "--width", "0.125",
            "--batch-size", "1", "--workers", "0", "--log-every", "1", "--out", str(out)]


def test_an_all_void_frame_adds_zero_cross_entropy_and_is_counted(tmp_path, capsys):
    root = make_camvid(tmp_path / "camvid", void_stem="0002")
    train.main(camvid_flags(root, tmp_path / "run") + ["--iters", "4"])  # 2 epochs of the 2 frames
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    steps = [r for r in read_log(tmp_path / "run") if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    void_steps = [r for r in steps if "unlabelled_batches" in r]
    assert len(void_steps) == 2 and all(r["unlabelled_batches"] == 1 and r["ce"] == r["aux"] == 0 for r in void_steps)
    assert all(r["ce"] > 0 for r in steps if r not in void_steps)
    assert summary["unlabelled_batches"] == 2
    assert load_checkpoint(tmp_path / "run" / "last.pt")["unlabelled_batches"] == 2


def test_the_image_scale_is_stored_in_the_checkpoint_and_evaluation_reuses_it(tmp_path):
    root = make_camvid(tmp_path / "camvid")  # 40 x 48 frames
    train.main(camvid_flags(root, tmp_path / "run") + ["--iters", "2", "--image-scale", "0.5"])
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["args"]["image_scale"] == 0.5
    image, label = dataset_from_checkpoint(checkpoint, "val")[0]
    assert image.shape == (3, 20, 24) and label.shape == (40, 48)
    image, label = dataset_from_checkpoint(checkpoint, "val", image_scale=1.0)[0]
    assert image.shape == (3, 40, 48) and label.shape == (40, 48)


@pytest.mark.parametrize("value", ["0", "1.5", "nan"])
def test_an_image_scale_outside_0_1_is_refused_naming_the_flag(capsys, value):
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "camvid", "--image-scale", value])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: --image-scale must be in (0, 1], got {float(value)}")
    with pytest.raises(SystemExit):
        train.parse_args(["--image-scale", "0.5"])  # synthetic
    assert "--image-scale does nothing in this run (the synthetic set has --synthetic-size)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0, got -1.0"),
    ("--tau-spatial", "0", "--tau-spatial must be a finite number > 0, got 0.0"),
    ("--tau-channel", "nan", "--tau-channel must be a finite number > 0, got nan"),
    ("--lambda-spatial", "-5", "--lambda-spatial must be a finite number >= 0, got -5.0"),
    ("--lambda-channel", "inf", "--lambda-channel must be a finite number >= 0, got inf"),
    ("--fckd-threshold", "1.5", "--fckd-threshold must be in [0, 1], got 1.5"),
    ("--fckd-threshold", "nan", "--fckd-threshold must be in [0, 1], got nan"),
    ("--fckd-gamma", "inf", "--fckd-gamma must be a finite number >= 0, got inf"),
    ("--fckd-temperature", "0", "--fckd-temperature must be a finite number > 0, got 0.0"),
    ("--width", "0.001", "--width must be in [0.0625, 4.0], got 0.001"),
    ("--workers", "-1", "--workers must be >= 0, got -1"),
])
def test_numbers_are_checked_naming_the_flag(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        # FCKD with enhancement uses every loss flag (a flag the run does not use is refused as such)
        train.parse_args(["--teacher-ckpt", "t.pt", "--kd", "fckd", "--fckd-gamma", "0.5", flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")  # after argparse's prog name


def test_crop_size_too_small_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--crop-size", "1"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: --crop-size must be at least 32 pixels a side, "
                                                             "got 1 1")


def test_a_truncated_val_image_stops_the_run_before_training(tmp_path, capsys, monkeypatch):
    root = make_camvid(tmp_path / "camvid", truncated="0003")
    steps = []
    monkeypatch.setattr(train, "train_losses", lambda *args, **kwargs: steps.append(1))
    err = cli_error(capsys, camvid_flags(root, tmp_path / "run") + ["--iters", "2"])
    assert err.startswith(f"error: cannot read image {root / 'val' / '0003.png'}: ")
    assert steps == []


def test_the_checkpoint_is_saved_before_validation_and_a_resume_validates_it(tmp_path, capsys, monkeypatch):
    flags = ["--iters", "2", "--val-every", "2"]
    real_evaluate = train.evaluate

    def unreadable(*args, **kwargs):
        raise ValueError("cannot read image val/0003.png: image file is truncated")

    monkeypatch.setattr(train, "evaluate", unreadable)
    assert cli_error(capsys, TINY + ["--out", str(tmp_path)] + flags).startswith("error: cannot read image")
    ckpt = load_checkpoint(tmp_path / "last.pt")  # the 2 steps are not lost
    assert ckpt["iteration"] == 2 and ckpt["val_pending"] and not (tmp_path / "best.pt").exists()
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    ckpt = run(tmp_path, *flags, "--resume", "auto")
    assert ckpt["iteration"] == 2 and not ckpt["val_pending"] and ckpt["best_iteration"] == 2
    assert [r["iter"] for r in read_log(tmp_path) if "val" in r] == [2]
    assert load_checkpoint(tmp_path / "best.pt")["best_miou"] == ckpt["best_miou"]


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path, monkeypatch):
    flags = ["--iters", "5", "--save-every", "2"]
    real_losses, calls = train.train_losses, []

    def killed_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # last.pt holds step 2, the log goes to step 3
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(train, "train_losses", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *flags)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 4, "lr": 0.0')  # a line cut short by kill -9
    monkeypatch.setattr(train, "train_losses", real_losses)
    run(tmp_path, *flags, "--resume", "auto")
    assert [r["iter"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5]


def test_sigterm_stops_after_the_step_and_the_resumed_run_matches(tmp_path, monkeypatch):
    """SIGTERM in step 3, a validation step: last.pt holds step 3 with its validation pending, which
    the resumed run does first; weights, best mIoU and log end as in an uninterrupted run."""
    flags = ["--iters", "6", "--val-every", "3", "--save-every", "5"]
    uninterrupted = run(tmp_path / "a", *flags)
    real_losses, calls = train.train_losses, []

    def sigterm_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(train, "train_losses", sigterm_in_step_3)
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "b", *flags)
    assert str(stopped.value) == (f"stopped by SIGTERM after iteration 3; {tmp_path / 'b' / 'last.pt'} holds it: "
                                  "continue with --resume auto") and stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3 and len(calls) == 3
    monkeypatch.setattr(train, "train_losses", real_losses)

    resumed = run(tmp_path / "b", *flags, "--resume", "auto")
    assert_same_state(resumed["model"], uninterrupted["model"])
    assert (resumed["best_miou"], resumed["best_iteration"]) == (uninterrupted["best_miou"],
                                                                uninterrupted["best_iteration"])

    def without_speed(out):
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in read_log(out)]

    assert without_speed(tmp_path / "b") == without_speed(tmp_path / "a")


SLOW_DATA_TRAIN = """
import sys, time
sys.path.insert(0, {root!r})
import train, run
get = run.SeededSamples.__getitem__
def slow(self, key):  # the trainer waits for its data worker most of the time, as on a data-bound node
    time.sleep(0.1)
    return get(self, key)
run.SeededSamples.__getitem__ = slow
run.run_cli(lambda: train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_saves_and_exits_with_one_line(tmp_path, signum):
    """As a Ctrl-C or a cluster's preemption sends it: to the trainer and its data worker, while the
    trainer (usually) waits for that worker's next batch."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.tmp999").write_bytes(b"left by a run killed while saving")
    script = tmp_path / "slow_data_train.py"
    script.write_text(SLOW_DATA_TRAIN.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(script), *TINY, "--iters", "100000", "--save-every", "1",
                                "--workers", "1", "--out", str(out)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    stopped = re.fullmatch(rf"stopped by {signal.Signals(signum).name} after iteration (\d+); "
                           rf"{re.escape(str(out / 'last.pt'))} holds it: continue with --resume auto", last_line)
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["iteration"] == int(stopped.group(1))
    assert sorted(os.listdir(out)) == [".lock", "last.pt", "log.jsonl"]  # no temporary left, old ones removed
    with open(out / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_a_data_worker_error_is_one_line_naming_the_file(tmp_path):
    """An unreadable training image met in a DataLoader worker: the usual one-line error, not the
    worker's traceback, and the process exits (no data worker keeps it alive)."""
    root = make_camvid(tmp_path / "camvid", truncated="0001")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "train.py", *camvid_flags(root, tmp_path / "run"), "--iters", "2",
                             "--workers", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: cannot read image {root / 'train' / '0001.png'}: ")


def test_resume_from_a_damaged_checkpoint_is_refused(tmp_path, capsys, damage):
    run(tmp_path, "--iters", 1)
    damage(tmp_path / "last.pt")
    err = cli_error(capsys, TINY + ["--out", str(tmp_path), "--iters", "2", "--resume", "auto"])
    assert err == (f"error: {tmp_path / 'last.pt'} is damaged: its contents do not match the SHA-256 stored in it; "
                   "use another checkpoint (e.g. best.pt or a copy)")



def test_a_run_whose_output_is_not_a_terminal_writes_log_lines_not_progress_bars(tmp_path):
    """CI, nohup, a cluster job: no bar redraws (carriage returns), one line per --log-every."""
    flags = [*TINY, "--log-every", "50", "--iters", "200", "--val-every", "100", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("\r") <= 10
    lines = [line for line in output.splitlines() if line.startswith("iteration ")]
    assert [line.split(":")[0] for line in lines if "/200:" in line] == [f"iteration {i}/200" for i in (50, 100, 150, 200)]
    assert sum("mIoU" in line for line in lines) == 2  # the validations at 100 and 200
