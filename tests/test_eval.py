import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluate_script
import train
from data import MEAN, STD, build_dataset
from fckd import condensation_matrix, pixel_entropy
from run import load_checkpoint, model_from_checkpoint, run_cli, save_checkpoint
from utils import predict, segmentation_metrics, upsample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = build_dataset("synthetic", None, "val", False, length=1, image_size=32).class_names


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny student trained for 2 iterations on 7 synthetic images per split (an odd count, so
    2 ranks get unequal shares), and its folder."""
    out = tmp_path_factory.mktemp("student")
    train.main(["--synthetic-length", "7", "--synthetic-size", "32", "--width", "0.125", "--batch-size", "2",
                "--workers", "0", "--iters", "2", "--out", str(out)])
    return out


def run_eval(capsys, *flags):
    evaluate_script.main([str(f) for f in flags])
    return capsys.readouterr().out


def test_eval_prints_the_table_and_writes_json_equal_to_the_training_validation(trained, tmp_path, capsys):
    out = run_eval(capsys, "--ckpt", trained / "last.pt", "--json", tmp_path / "m.json")
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{trained / 'last.pt'} on synthetic val (7 images")
    assert [line.split()[0] for line in lines[2:2 + len(CLASSES)]] == [name.split()[0] for name in CLASSES]
    assert lines[-1].startswith("aAcc ") and " mAcc " in lines[-1] and " mIoU " in lines[-1]

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"aAcc", "mAcc", "mIoU", "per_class"}
    assert list(metrics["per_class"]) == list(CLASSES)
    assert all(set(m) == {"IoU", "Acc"} for m in metrics["per_class"].values())
    assert all(0 <= metrics[k] <= 100 for k in ("aAcc", "mAcc", "mIoU"))
    # the same weights on the same images: exactly what train.py logged at its final validation
    with open(trained / "log.jsonl") as f:
        final_val = [json.loads(line) for line in f if '"val"' in line][-1]["val"]
    assert {k: metrics[k] for k in ("aAcc", "mAcc", "mIoU")} == final_val


def test_flip_scales_and_window_run_and_stay_in_range(trained, tmp_path, capsys):
    run_eval(capsys, "--ckpt", trained / "last.pt", "--flip", "--scales", "0.75", "1.0", "1.5",
             "--window", 24, 24, "--json", tmp_path / "m.json")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert all(0 <= metrics[k] <= 100 for k in ("aAcc", "mAcc", "mIoU"))


def test_save_dir_writes_predictions_and_the_teachers_entropy_and_condensation(trained, tmp_path, capsys):
    pictures = tmp_path / "pictures"
    run_eval(capsys, "--ckpt", trained / "last.pt", "--teacher-ckpt", trained / "best.pt", "--save-dir", pictures,
             "--save-max", 3, "--fckd-threshold", 0.9)
    assert sorted(os.listdir(pictures)) == sorted(f"{i:05d}{suffix}.png" for i in range(3)
                                                  for suffix in ("", "_entropy", "_condensation"))
    dataset = build_dataset("synthetic", None, "val", False, length=7, image_size=32)
    image, label = dataset[1]
    side_by_side = np.asarray(Image.open(pictures / "00001.png"))
    assert side_by_side.shape == (32, 96, 3)
    # the middle panel is the label in the dataset's palette
    palette = np.array(dataset.palette, dtype=np.uint8)
    assert np.array_equal(side_by_side[:, 32:64], palette[label.numpy()])
    # the first panel is the image, un-normalised
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(side_by_side[:, :32].astype(int) - rgb).max() <= 1

    # the teacher pictures: its normalised entropy and its hard condensation matrix at threshold 0.9
    teacher, _ = model_from_checkpoint(trained / "best.pt")
    with torch.no_grad():
        logits = teacher.eval()(image[None])["out"]
    expected_entropy = upsample(pixel_entropy(logits), (32, 32))[0, 0].numpy() * 255
    expected_keep = torch.nn.functional.interpolate(condensation_matrix(logits, "hard", 0.9), size=(32, 32))
    entropy = Image.open(pictures / "00001_entropy.png")
    condensation = Image.open(pictures / "00001_condensation.png")
    assert entropy.mode == condensation.mode == "L" and entropy.size == condensation.size == (32, 32)
    assert np.abs(np.asarray(entropy) - expected_entropy).max() <= 1
    assert np.array_equal(np.asarray(condensation), expected_keep[0, 0].numpy().astype(np.uint8) * 255)


def test_two_cpu_ranks_give_the_metrics_of_one_process(trained, tmp_path):
    ckpt = str(trained / "last.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "eval.py", "--ckpt", ckpt, "--json", str(tmp_path / "one.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "eval.py", "--ckpt", ckpt, "--json", str(tmp_path / "two.json"),
                          "--save-dir", str(tmp_path / "pictures")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # 7 images over 2 ranks: 4 + 3, none counted twice, so the confusion matrix (and every metric) agrees
    assert json.loads((tmp_path / "two.json").read_text()) == {
        **json.loads((tmp_path / "one.json").read_text()), "checkpoint": ckpt}
    assert sorted(os.listdir(tmp_path / "pictures")) == [f"{i:05d}.png" for i in range(7)]
    assert two.stdout.count("aAcc ") == 1  # only rank 0 prints


def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: evaluate_script.main(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_clear_errors(trained, tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    assert cli_error(capsys, ["--ckpt", missing]) == f"error: checkpoint not found: {missing}"

    wrong = load_checkpoint(trained / "last.pt")
    wrong["num_classes"] = 4
    wrong["model"] = {k: v[:4] if k.endswith(("classifier.weight", "classifier.bias")) else v
                      for k, v in wrong["model"].items()}
    save_checkpoint(wrong, tmp_path / "four_classes.pt")
    err = cli_error(capsys, ["--ckpt", str(tmp_path / "four_classes.pt")])
    assert err == f"error: {tmp_path / 'four_classes.pt'} predicts 4 classes, the synthetic set has {len(CLASSES)}"
    err = cli_error(capsys, ["--ckpt", str(trained / "last.pt"), "--teacher-ckpt", str(tmp_path / "four_classes.pt"),
                             "--save-dir", str(tmp_path / "p")])
    assert err == (f"error: teacher checkpoint {tmp_path / 'four_classes.pt'} predicts 4 classes, "
                   f"the synthetic set has {len(CLASSES)}")

    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--ckpt", "x.pt", "--teacher-ckpt", "t.pt"])
    assert "pass --save-dir too" in capsys.readouterr().err


def test_pictures_keep_every_palette_colour_exactly(tmp_path):
    """colourise gives save_image colours in [0, 1]; every byte value comes back as it was, and
    the ignore label (255) is white."""
    palette = [(i, 255 - i, 7 * i % 256) for i in range(255)]
    label = torch.arange(256).view(16, 16)
    evaluate_script.save_image([evaluate_script.colourise(label, palette)], tmp_path / "label.png", padding=0)
    expected = np.array(palette + [evaluate_script.IGNORE_COLOUR], dtype=np.uint8)[label.numpy()]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "label.png")), expected)


# -----------------------------------------------------------------------------
# no silent wrong answer, no work spent before a clear error (issue 15)


def test_non_finite_weights_are_refused_naming_the_checkpoint(trained, tmp_path, capsys):
    """What a diverged run wrote before train.py checked its saves: inf BatchNorm statistics, which
    eval.py used to score."""
    checkpoint = load_checkpoint(trained / "last.pt")
    checkpoint["model"]["backbone.bn1.running_var"][0] = math.inf
    save_checkpoint(checkpoint, tmp_path / "diverged.pt")
    err = cli_error(capsys, ["--ckpt", str(tmp_path / "diverged.pt")])
    assert err == (f"error: {tmp_path / 'diverged.pt'} holds NaN or inf in 1 tensors (backbone.bn1.running_var); "
                   "use an earlier checkpoint")


def test_overflowing_logits_are_refused_naming_the_checkpoint(trained, tmp_path, capsys):
    checkpoint = load_checkpoint(trained / "last.pt")
    checkpoint["model"]["classifier.weight"].fill_(3e38)  # finite weights, logits beyond float32
    save_checkpoint(checkpoint, tmp_path / "overflow.pt")
    err = cli_error(capsys, ["--ckpt", str(tmp_path / "overflow.pt")])
    assert err == (f"error: {tmp_path / 'overflow.pt'} cannot be scored: the logits are NaN or inf on image 0 of 7 "
                   "of the synthetic val split")


def test_a_damaged_checkpoint_is_refused(trained, tmp_path, capsys, damage):
    path = tmp_path / "copy.pt"
    path.write_bytes((trained / "last.pt").read_bytes())
    damage(path)
    assert cli_error(capsys, ["--ckpt", str(path)]) == (
        f"error: {path} is damaged: its contents do not match the SHA-256 stored in it; "
        "use another checkpoint (e.g. best.pt or a copy)")


@pytest.fixture
def nothing_evaluated(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("evaluated before the error")

    monkeypatch.setattr(evaluate_script, "evaluate", fail)


def test_unwritable_outputs_are_refused_before_evaluating(trained, tmp_path, capsys, nothing_evaluated):
    ckpt = str(trained / "last.pt")
    (tmp_path / "file").write_text("")
    assert cli_error(capsys, ["--ckpt", ckpt, "--json", str(tmp_path / "file" / "m.json")]) == \
        f"error: --json {tmp_path / 'file' / 'm.json'} cannot be written: {tmp_path / 'file'} is a file"
    assert cli_error(capsys, ["--ckpt", ckpt, "--json", str(tmp_path / "no" / "m.json")]) == \
        f"error: --json {tmp_path / 'no' / 'm.json'} cannot be written: {tmp_path / 'no'} does not exist"
    assert cli_error(capsys, ["--ckpt", ckpt, "--json", str(tmp_path)]) == \
        f"error: --json {tmp_path} is a folder, not a file"
    assert cli_error(capsys, ["--ckpt", ckpt, "--save-dir", str(tmp_path / "file" / "p")]) == \
        f"error: --save-dir {tmp_path / 'file' / 'p'} is not a writable folder (Not a directory)"


@pytest.mark.parametrize("scale", ["nan", "inf", "0.001", "1000"])
def test_scales_outside_a_sane_range_are_refused(capsys, scale):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.parse_args(["--ckpt", "x.pt", "--scales", "1.0", scale])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: --scales must each be in [0.25, 4.0], got 1.0 {float(scale)}")


def test_a_window_below_the_output_stride_is_refused_before_evaluating(trained, capsys, nothing_evaluated):
    ckpt = trained / "last.pt"
    assert cli_error(capsys, ["--ckpt", str(ckpt), "--window", "4", "4"]) == (
        f"error: --window 4 4 is smaller than the output stride 8 of {ckpt}: pass a window of at least 8 x 8, "
        "or none (whole images)")


def test_evaluation_shows_its_progress_on_a_terminal_only(trained, capsys, monkeypatch):
    evaluate_script.main(["--ckpt", str(trained / "last.pt")])
    assert "evaluating" not in capsys.readouterr().err  # captured: not a terminal, so no bar to fill a log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    evaluate_script.main(["--ckpt", str(trained / "last.pt")])
    assert "evaluating" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_a_run_at_a_reduced_image_scale_is_scored_and_pictured_at_full_resolution(tmp_path):
    rng = np.random.default_rng(0)
    for split, stem in (("train", "0001"), ("val", "0002")):  # a SegNet-layout CamVid of 40 x 48 frames
        for folder, array in ((split, rng.integers(0, 255, (40, 48, 3))), (f"{split}annot", rng.integers(0, 12, (40, 48)))):
            os.makedirs(tmp_path / "camvid" / folder, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(tmp_path / "camvid" / folder / f"{stem}.png")
    out = tmp_path / "run"
    train.main(["--dataset", "camvid", "--data-root", str(tmp_path / "camvid"), "--image-scale", "0.5",
                "--crop-size", "32", "--width", "0.125", "--batch-size", "1", "--iters", "1", "--workers", "0",
                "--out", str(out)])
    pictures = tmp_path / "pictures"
    evaluate_script.main(["--ckpt", str(out / "last.pt"), "--teacher-ckpt", str(out / "last.pt"),
                          "--save-dir", str(pictures), "--json", str(tmp_path / "metrics.json")])
    assert json.loads((tmp_path / "metrics.json").read_text())["mIoU"] is not None
    assert Image.open(pictures / "00000.png").size == (3 * 48, 40)
    assert Image.open(pictures / "00000_entropy.png").size == Image.open(pictures / "00000_condensation.png").size == (48, 40)


# -----------------------------------------------------------------------------
# --export: a deployable student

# run in a clean process: isolated (-I: no PYTHONPATH, no script folder or cwd on sys.path), in
# a folder without this project's files, which it checks are out of reach
LOAD_EXPORTED = """
import importlib.util, sys, torch
assert not any(importlib.util.find_spec(name) for name in ("models", "utils", "eval", "data")), sys.path
program = torch.export.load(sys.argv[1])
images = torch.load(sys.argv[2])
torch.save({n: program.module()(images[:n]) for n in (1, 3)}, sys.argv[3])
"""


def test_export_writes_a_program_that_loads_without_the_project_and_gives_the_checkpoints_logits(
        trained, tmp_path, capsys, nothing_evaluated):
    program = tmp_path / "student.pt2"
    out = run_eval(capsys, "--ckpt", trained / "last.pt", "--export", program)
    assert out.strip().splitlines() == [
        f"wrote {program}: deeplabv3_resnet18 of {trained / 'last.pt'} as a torch.export program, float32 "
        f"N x 3 x 32 x 32 -> N x {len(CLASSES)} x 32 x 32 logits (batch size N dynamic, input size fixed)"]
    assert sorted(os.listdir(tmp_path)) == ["student.pt2"]  # no temporary file left

    images = torch.randn(3, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    clean = subprocess.run([sys.executable, "-I", "-c", LOAD_EXPORTED, "student.pt2", "images.pt", "logits.pt"],
                           cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")},
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")

    model, _ = model_from_checkpoint(trained / "last.pt")
    model.eval()
    for n in (1, 3):
        with torch.no_grad():
            expected = upsample(model(images[:n])["out"], (32, 32))
        assert logits[n].dtype == torch.float32 and logits[n].shape == (n, len(CLASSES), 32, 32)
        torch.testing.assert_close(logits[n], expected)
    # eval.py's own prediction of an image is the softmax of these logits
    torch.testing.assert_close(logits[1].softmax(1), predict(model, images[:1]))


def test_export_takes_the_input_size_given_and_only_that(trained, tmp_path, capsys):
    program = tmp_path / "student.pt2"
    out = run_eval(capsys, "--ckpt", trained / "last.pt", "--export", program, "--export-size", 32, 48)
    assert "N x 3 x 32 x 48 -> " in out
    deployed = torch.export.load(program).module()
    assert deployed(torch.randn(2, 3, 32, 48)).shape == (2, len(CLASSES), 32, 48)
    with pytest.raises(Exception, match=r"Guard failed: images.size\(\)\[3\] == 48"):  # the input size is fixed
        deployed(torch.randn(2, 3, 32, 32))


def test_export_refuses_an_existing_file_an_unwritable_folder_and_bad_sizes(trained, tmp_path, capsys):
    ckpt = str(trained / "last.pt")
    existing = tmp_path / "student.pt2"
    existing.write_text("the user's file")
    assert cli_error(capsys, ["--ckpt", ckpt, "--export", str(existing)]) == (
        f"error: --export {existing} exists: remove it or pass another path (nothing is overwritten)")
    assert existing.read_text() == "the user's file"
    missing = tmp_path / "no" / "student.pt2"
    assert cli_error(capsys, ["--ckpt", ckpt, "--export", str(missing)]) == (
        f"error: --export {missing} cannot be written: {tmp_path / 'no'} does not exist")
    assert cli_error(capsys, ["--ckpt", ckpt, "--export", str(tmp_path)]) == (
        f"error: --export {tmp_path} exists: remove it or pass another path (nothing is overwritten)")

    for size, message in ((["31", "64"], "--export-size must be two ints from 32 to 4096, got 31 64"),
                          (["64", "0"], "--export-size must be two ints from 32 to 4096, got 64 0"),
                          (["64", "-64"], "--export-size must be two ints from 32 to 4096, got 64 -64"),
                          (["100000", "100000"], "--export-size must be two ints from 32 to 4096, got 100000 100000"),
                          (["64"], "--export-size: expected 2 arguments"),
                          (["64", "6.4"], "--export-size: invalid int value: '6.4'")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_script.parse_args(["--ckpt", ckpt, "--export", "s.pt2", "--export-size", *size])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {message}"
                                                                 if message.startswith("--export-size:")
                                                                 else f"error: {message}")
    for argv, message in ((["--export-size", "64", "64"], "--export-size is only used with --export: pass "
                                                          "--export PATH too"),
                          (["--export", "s.pt2", "--json", "m.json", "--flip"],
                           "--export writes the program and exits without evaluating: drop --flip --json")):
        with pytest.raises(SystemExit):
            evaluate_script.parse_args(["--ckpt", ckpt, *argv])
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert os.listdir(tmp_path) == ["student.pt2"]


def test_the_default_export_size_is_the_runs_training_crop_or_the_synthetic_image_size():
    assert evaluate_script.export_size({"dataset": "cityscapes", "args": {"crop_size": [512, 1024]}}, "c.pt") == \
        (512, 1024)
    assert evaluate_script.export_size({"dataset": "synthetic", "args": {"synthetic_size": 48}}, "s.pt") == (48, 48)
    assert evaluate_script.export_size({"dataset": "synthetic", "args": {}}, "s.pt") == (64, 64)  # data.py's default
    with pytest.raises(ValueError, match="c.pt stores no training crop size: pass --export-size H W"):
        evaluate_script.export_size({"dataset": "camvid", "args": {}}, "c.pt")


def test_the_pictured_condensation_is_the_students_own_kind(trained, tmp_path, capsys):
    """A student distilled with condense="quantile" is pictured with its quantile matrix, not a hard one."""
    student = load_checkpoint(trained / "last.pt")
    student["args"].update(kd="fckd", fckd_condense="quantile", fckd_keep=0.5)
    save_checkpoint(student, tmp_path / "quantile.pt")
    pictures = tmp_path / "pictures"
    run_eval(capsys, "--ckpt", tmp_path / "quantile.pt", "--teacher-ckpt", trained / "best.pt", "--save-dir", pictures,
             "--save-max", 1)
    image, _ = build_dataset("synthetic", None, "val", False, length=7, image_size=32)[0]
    teacher, _ = model_from_checkpoint(trained / "best.pt")
    with torch.no_grad():
        logits = teacher.eval()(image[None])["out"]
    want = torch.nn.functional.interpolate(condensation_matrix(logits, "quantile", keep=0.5), size=(32, 32))
    assert 0.4 < want.mean() < 0.7  # half of the logit pixels, upsampled
    assert np.array_equal(np.asarray(Image.open(pictures / "00000_condensation.png")),
                          want[0, 0].numpy().astype(np.uint8) * 255)
    # a threshold means nothing to its quantile matrix: refused, not silently ignored
    err = cli_error(capsys, ["--ckpt", str(tmp_path / "quantile.pt"), "--teacher-ckpt", str(trained / "best.pt"),
                             "--save-dir", str(tmp_path / "more"), "--fckd-threshold", "0.5"])
    assert err == (f"error: --fckd-threshold sets a hard condensation's threshold; {tmp_path / 'quantile.pt'} was "
                   "trained with --fckd-condense quantile, whose matrix is pictured: drop --fckd-threshold")


@pytest.mark.parametrize("flag", ["--export", "--json", "--save-dir", "--frames", "--data-root"])
def test_an_empty_path_is_refused_by_name(trained, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.parse_args(["--ckpt", str(trained / "last.pt"), flag, ""])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {flag} is empty: give a path, or leave the "
                                                             "flag out")


def test_a_threshold_without_the_teachers_pictures_is_refused(trained, capsys):
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--ckpt", str(trained / "last.pt"), "--fckd-threshold", "0.5"])
    assert "--fckd-threshold is only used for the teacher's pictures" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# scoring on another dataset, over the classes the two share


def write_frames(root, layout, rng, classes, size=(24, 32)):
    """Two random frames (train, val) in the layout of CamVid or IDD-Lite, with labels 0..classes-1."""
    for split in ("train", "val"):
        image = rng.integers(0, 255, (*size, 3)).astype(np.uint8)
        label = rng.integers(0, classes, size).astype(np.uint8)
        if layout == "camvid":
            paths = (root / split / "f.png", root / f"{split}annot" / "f.png")
        else:
            paths = (root / "leftImg8bit" / split / "0" / "000001_image.jpg",
                     root / "gtFine" / split / "0" / "000001_label.png")
        for path, array in zip(paths, (image, label)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """A CamVid model (trained at image scale 0.5) and an IDD-Lite model, 1 iteration each, on tiny fixtures."""
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(40)
    write_frames(root / "camvid", "camvid", rng, 12)  # 11 is CamVid's void
    write_frames(root / "idd", "idd", rng, 7)
    for name, data_root, scale in (("camvid", root / "camvid", "0.5"), ("idd_lite", root / "idd", "1")):
        train.main(["--dataset", name, "--data-root", str(data_root), "--image-scale", scale, "--width", "0.0625",
                    "--batch-size", "1", "--crop-size", "32", "--iters", "1", "--workers", "0",
                    "--out", str(root / f"{name}_run")])
    return root


def test_a_camvid_model_is_scored_on_idd_lite_over_idd_lites_classes(two_domains, tmp_path, capsys):
    root = two_domains
    out = run_eval(capsys, "--ckpt", root / "camvid_run" / "last.pt", "--dataset", "idd_lite", "--data-root",
                   root / "idd", "--json", tmp_path / "m.json")
    # CamVid frames are 480 wide, trained at scale 0.5: 240 pixels; IDD-Lite's are 320
    assert "idd_lite frames resized by 0.75 to 240 pixels wide" in out
    assert "over the classes of idd_lite (camvid model)" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics["per_class"]) == list(data.IDD_LITE_CLASSES) and metrics["trained_on"] == "camvid"

    model, _ = model_from_checkpoint(root / "camvid_run" / "last.pt")
    groups, _, _ = data.shared_classes("camvid", "idd_lite")
    image, label = build_dataset("idd_lite", root / "idd", "val", False, image_scale=0.75)[0]
    shared = evaluate_script.SharedClassLogits(model.eval(), groups)
    with torch.no_grad():
        camvid_probabilities = model(image[None])["out"].softmax(1)
        shared_probabilities = shared(image[None])["out"].softmax(1)
        prediction = predict(shared, image[None], size=label.shape).argmax(1)[0]
    # each shared class's probability is the sum of its CamVid classes' (road; pedestrian + bicyclist; ...)
    summed = torch.stack([camvid_probabilities[:, group].sum(1) for group in groups], 1)
    torch.testing.assert_close(shared_probabilities, summed)
    confusion = torch.zeros(7, 7, dtype=torch.int64)
    for true, guess in zip(label.flatten().tolist(), prediction.flatten().tolist()):
        confusion[true, guess] += 1
    assert metrics["mIoU"] == pytest.approx(segmentation_metrics(confusion, data.IDD_LITE_CLASSES)["mIoU"])


def test_an_idd_lite_model_is_scored_on_camvid_with_the_camvid_labels_mapped(two_domains, tmp_path, capsys):
    root = two_domains
    out = run_eval(capsys, "--ckpt", root / "idd_lite_run" / "last.pt", "--dataset", "camvid", "--data-root",
                   root / "camvid", "--image-scale", "1", "--json", tmp_path / "m.json")
    assert "resized" not in out  # --image-scale given: the user's factor
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics["per_class"]) == list(data.IDD_LITE_CLASSES)
    _, lut, _ = data.shared_classes("idd_lite", "camvid")
    _, camvid_label = build_dataset("camvid", root / "camvid", "val", False)[0]
    labelled = {int(lut[c]) for c in camvid_label.unique().tolist() if c != 255}
    # a class whose IoU is defined is one in the mapped labels or in the predictions
    assert {k for k, name in enumerate(data.IDD_LITE_CLASSES) if metrics["per_class"][name]["Acc"] is not None} \
        == labelled


def test_a_pair_without_a_correspondence_is_refused_by_name(trained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(lambda: evaluate_script.main(["--ckpt", str(trained / "last.pt"), "--dataset", "camvid",
                                              "--data-root", str(tmp_path)]))
    assert "no class correspondence between synthetic and camvid" in capsys.readouterr().err


def test_frames_scores_the_listed_frames_only(trained, tmp_path, capsys):
    listing = tmp_path / "frames.txt"
    listing.write_text("2\n5\n")
    out = run_eval(capsys, "--ckpt", trained / "last.pt", "--frames", listing, "--json", tmp_path / "m.json")
    assert "(2 images" in out
    assert json.loads((tmp_path / "m.json").read_text())["frames"] == str(listing)
    listing.write_text("9\n")
    with pytest.raises(SystemExit):
        run_cli(lambda: evaluate_script.main(["--ckpt", str(trained / "last.pt"), "--frames", str(listing)]))
    assert "--frames: " in capsys.readouterr().err


def test_a_camvid_model_is_scored_on_camvid_over_idd_lites_classes_too(two_domains, tmp_path, capsys):
    """In domain over the shared classes: the model's probabilities summed and the labels mapped, as
    across domains, so that the drop from in domain compares the same classes."""
    root = two_domains
    out = run_eval(capsys, "--ckpt", root / "camvid_run" / "last.pt", "--classes", "idd_lite",
                   "--data-root", root / "camvid", "--json", tmp_path / "m.json")
    assert "over the classes of idd_lite (camvid model)" in out and "resized" not in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics["per_class"]) == list(data.IDD_LITE_CLASSES)
    model, _ = model_from_checkpoint(root / "camvid_run" / "last.pt")
    groups, lut, _ = data.shared_classes("camvid", "camvid", "idd_lite")
    image, label = build_dataset("camvid", root / "camvid", "val", False, image_scale=0.5)[0]
    with torch.no_grad():
        prediction = predict(evaluate_script.SharedClassLogits(model.eval(), groups), image[None],
                             size=label.shape).argmax(1)[0]
    mapped = torch.from_numpy(lut.astype(np.int64))[label]
    confusion = torch.zeros(7, 7, dtype=torch.int64)
    for true, guess in zip(mapped.flatten().tolist(), prediction.flatten().tolist()):
        if true != 255:
            confusion[true, guess] += 1
    assert metrics["mIoU"] == pytest.approx(segmentation_metrics(confusion, data.IDD_LITE_CLASSES)["mIoU"])
    with pytest.raises(SystemExit):
        run_cli(lambda: evaluate_script.main(["--ckpt", str(root / "camvid_run" / "last.pt"), "--classes", "voc",
                                              "--data-root", str(root / "camvid")]))
    assert "no class correspondence between camvid and camvid over the classes of voc" in capsys.readouterr().err
