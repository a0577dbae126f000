import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import run
from models import build_model
from run import CHECKPOINT_KEYS, load_checkpoint, model_from_checkpoint, run_cli, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# checkpoints


def tiny_checkpoint(num_classes=3, name="deeplabv3_resnet18"):
    options = {"width": 0.125, "output_stride": 8, "head_channels": None}
    model = build_model(name, num_classes, **options)
    return {"model": model.state_dict(), "optimizer": {}, "scaler": {}, "iteration": 0, "args": {}, "rng": [],
            "best_miou": None, "num_classes": num_classes, "dataset": "synthetic", "model_name": name,
            "model_options": options}


def test_save_then_load_round_trip(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint = tiny_checkpoint()
    save_checkpoint(checkpoint, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(CHECKPOINT_KEYS)
    assert all(torch.equal(loaded["model"][k], v) for k, v in checkpoint["model"].items())
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f):
        real_save(obj, f)
        f.truncate(10)  # as if the disk filled up mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"iteration": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt is not a readable checkpoint"):
        load_checkpoint(garbage)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "iteration": 3}, partial)
    with pytest.raises(ValueError, match="partial.pt is not a train.py checkpoint: it lacks optimizer"):
        load_checkpoint(partial)
    state_dict_only = tmp_path / "weights.pt"
    torch.save([torch.zeros(1)], state_dict_only)
    with pytest.raises(ValueError, match="weights.pt .* holds a list"):
        load_checkpoint(state_dict_only)


def test_model_from_checkpoint_builds_the_saved_architecture_and_rejects_a_wrong_one(tmp_path):
    path = tmp_path / "teacher.pt"
    checkpoint = tiny_checkpoint(num_classes=4, name="deeplabv3_resnet50")
    save_checkpoint(checkpoint, path)
    model, loaded = model_from_checkpoint(path)
    assert model.classifier.out_channels == 4 and loaded["model_name"] == "deeplabv3_resnet50"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["model"].items())
    wrong = tmp_path / "wrong_teacher.pt"  # a ResNet-50's weights under the name of a ResNet-18
    save_checkpoint(checkpoint | {"model_name": "deeplabv3_resnet18"}, wrong)
    with pytest.raises(ValueError, match="wrong_teacher.pt do not fit deeplabv3_resnet18"):
        model_from_checkpoint(wrong)


def test_run_cli_turns_input_errors_into_one_line_and_exit_status_2(capsys):
    def bad_input():
        raise ValueError("label x.png has values [300]")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(bad_input)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: label x.png has values [300]\n"

    def bug():
        raise KeyError("a real bug keeps its traceback")

    with pytest.raises(KeyError):
        run_cli(bug)


def test_a_checkpoint_carries_the_sha256_of_its_contents_and_damage_is_refused(tmp_path, damage):
    path = tmp_path / "ck.pt"
    checkpoint = tiny_checkpoint()
    save_checkpoint(checkpoint, path)
    raw = torch.load(path, weights_only=True)
    assert raw["sha256"] == run.payload_sha256(checkpoint) and len(raw["sha256"]) == 64
    assert "sha256" not in load_checkpoint(path)

    damage(path)
    assert torch.load(path, weights_only=True)  # torch.load itself notices nothing
    with pytest.raises(ValueError, match=f"^{path} is damaged: its contents do not match the SHA-256 stored in it"):
        load_checkpoint(path)
    # the digest covers what is not a tensor too
    raw["iteration"] = 7
    torch.save(raw, path)
    with pytest.raises(ValueError, match="is damaged"):
        load_checkpoint(path)


def test_a_checkpoint_written_before_the_sha256_loads_unchecked(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(tiny_checkpoint(), path)  # what train.py wrote before it stored a SHA-256
    assert set(load_checkpoint(path)) == set(CHECKPOINT_KEYS)


def test_non_finite_tensors_are_named_and_others_ignored():
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "empty": torch.empty(0),
             "count": torch.tensor(5), "c": torch.full((2,), float("-inf"))}
    assert run.non_finite_tensors(state) == ["b", "c"]
    assert run.non_finite_tensors({"a": torch.ones(3), "count": torch.tensor(1)}) == []


def test_remove_temporaries_removes_what_killed_saves_left(tmp_path):
    save_checkpoint({"iteration": 1}, tmp_path / "last.pt")
    (tmp_path / ".last.pt.tmp123").write_bytes(b"half a checkpoint")
    (tmp_path / ".log.jsonl.tmp9").write_bytes(b"")
    run.remove_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["last.pt"]


class Unreadable(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise ValueError("cannot read image val/0003.png: image file is truncated")


def test_run_cli_reduces_a_data_worker_traceback_to_its_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: list(DataLoader(Unreadable(), num_workers=1)))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: cannot read image val/0003.png: image file is truncated\n"


def test_run_cli_exits_an_interrupted_run_with_128_plus_the_signal(capsys):
    def stopped():
        raise run.Interrupted("stopped by SIGTERM after iteration 3; last.pt holds it", signal.SIGTERM)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(stopped)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == "stopped by SIGTERM after iteration 3; last.pt holds it\n"
