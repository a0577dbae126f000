import json
import os

import pytest
import torch

import losses
import train
from fckd import FCKDLoss, channel_kd, spatial_kd
from run import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--synthetic-length", "16", "--synthetic-size", "32", "--width", "0.125", "--batch-size", "4",
        "--workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main(TINY + ["--iters", "2", "--out", str(out)])
    return str(out / "last.pt")


def test_each_entry_builds_its_loss_from_its_own_flags():
    student, teacher = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    flags = dict(losses.DEFAULT_FLAGS, tau_spatial=2.0, lambda_spatial=0.5, tau_channel=3.0, lambda_channel=2.0)
    assert torch.equal(losses.distillation("kd", flags)(student, teacher)["kd"], 0.5 * spatial_kd(student, teacher, 2.0))
    assert torch.equal(losses.distillation("cwd", flags)(student, teacher)["kd"], 2.0 * channel_kd(student, teacher, 3.0))
    fckd = losses.distillation("fckd", flags)(student, teacher)
    want = FCKDLoss(**losses.loss_settings("fckd", flags))(student, teacher)
    assert torch.equal(fckd["kd"], want["loss"]) and torch.equal(fckd["keep_ratio"], want["keep_ratio"])


def test_the_flags_an_entry_does_not_read_are_unused():
    flags = dict(losses.DEFAULT_FLAGS)
    assert losses.unused_flags(None, flags) == set(losses.FLAGS)
    assert losses.unused_flags("kd", flags) == set(losses.FLAGS) - {"tau_spatial", "lambda_spatial"}
    assert losses.unused_flags("cwd", flags) == set(losses.FLAGS) - {"tau_channel", "lambda_channel"}
    # FCKD at its defaults: hard condensation, no enhancement
    assert losses.unused_flags("fckd", flags) == {"fckd_keep", "fckd_similarity", "fckd_temperature"}
    enhanced_quantile = dict(flags, fckd_gamma=0.5, fckd_condense="quantile")
    assert losses.unused_flags("fckd", enhanced_quantile) == {"fckd_threshold"}


def test_an_unknown_loss_is_refused_by_name(capsys):
    with pytest.raises(ValueError, match="unknown distillation loss 'nope'; expected one of fckd, kd, cwd"):
        losses.distillation("nope", losses.DEFAULT_FLAGS)
    with pytest.raises(SystemExit):
        train.parse_args(["--teacher-ckpt", "t.pt", "--kd", "nope"])
    assert "argument --kd: invalid choice: 'nope'" in capsys.readouterr().err


def test_a_new_entry_is_all_it_takes_to_train_and_resume_a_new_loss(tmp_path, teacher_ckpt, monkeypatch, capsys,
                                                                   crash_in_step):
    """A toy loss (mean squared logit difference / tau), added as one entry: --kd takes it, it trains,
    its unused flags are refused, and an interrupted run of it resumes."""
    def toy_term(tau):
        return lambda student_logits, teacher_logits: {"kd": (student_logits - teacher_logits).pow(2).mean() / tau}

    monkeypatch.setitem(losses.LOSSES, "toy", losses.DistillationLoss({"tau_spatial": "tau"}, toy_term))
    flags = TINY + ["--teacher-ckpt", teacher_ckpt, "--kd", "toy", "--tau-spatial", "2", "--iters", "3",
                    "--save-every", "1", "--out", str(tmp_path)]
    restore = crash_in_step(3)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags)
    restore()
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    train.main(flags + ["--resume", "auto"])
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 3
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"kd"' in line]
    assert [r["iter"] for r in steps] == [1, 2, 3] and all(r["kd"] > 0 for r in steps)
    with pytest.raises(SystemExit):
        train.parse_args(["--teacher-ckpt", teacher_ckpt, "--kd", "toy", "--lambda-channel", "2"])
    assert "--lambda-channel does nothing in a run with --kd toy" in capsys.readouterr().err
