"""The drop-in of docs/torchvision.md, run: a frozen teacher and FCKDLoss(downsample=8) added to
the training step of torchvision's segmentation reference trainer (references/segmentation/train.py).

The models are torchvision's own, built without weights (weights=None, weights_backbone=None; no
download): a DeepLabV3-ResNet50 teacher (aux_loss=True, as the reference recipe trains it; its
aux output is not used) and an LR-ASPP-MobileNetV3-Large student. LR-ASPP has no aux head, so
the reference criterion below takes its one-output branch (the reference recipe for lraspp runs
without --aux-loss). The teacher goes through a checkpoint in the reference trainer's format and
is loaded by the doc's lines (get_model, eval, requires_grad_(False), torch.load with
weights_only=False); the step is the doc's: teacher forward under no_grad, loss + the FCKD term.

Teacher confidence (the choice this file makes): a randomly initialised DeepLabV3 is uncertain
everywhere (normalised pixel entropy 0.93 or more at 1/8 resolution on inputs like these), so
the default hard condensation (threshold 0.7) keeps no pixel and the FCKD term would be 0.
Rather than change the loss the doc adds, the teacher's last classifier layer (weight and bias)
is scaled by 5, so that its logits are confident (about 90% of the pixels kept here), as a
trained teacher's are on most pixels: the test then runs exactly FCKDLoss(downsample=8). The
uncertain case is the second test's: a teacher with uniform logits makes FCKDLoss(downsample=8)
warn once and add 0, and condense="quantile", keep=0.8 (the doc's fallback) keeps pixels.
"""

import argparse
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fckd import FCKDLoss

NUM_CLASSES = 21
CONFIDENCE = 5.0  # scale of the random teacher's last classifier layer (see the module docstring)


def criterion(inputs, target):
    """torchvision's reference criterion: cross-entropy over "out", + 0.5 x "aux" when present."""
    losses = {}
    for name, x in inputs.items():
        losses[name] = F.cross_entropy(x, target, ignore_index=255)
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


def save_teacher_checkpoint(path, scale):
    """A deeplabv3_resnet50 checkpoint as the reference trainer writes one ("model", ..., "args")."""
    teacher = torchvision.models.get_model("deeplabv3_resnet50", weights=None, weights_backbone=None,
                                           num_classes=NUM_CLASSES, aux_loss=True)
    with torch.no_grad():
        last = teacher.classifier[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    torch.save({"model": teacher.state_dict(), "epoch": 0,
                "args": argparse.Namespace(model="deeplabv3_resnet50", aux_loss=True)}, path)


def load_teacher(path):
    """The doc's two teacher lines (a path instead of the hard-coded "teacher.pth")."""
    teacher = torchvision.models.get_model("deeplabv3_resnet50", weights=None, weights_backbone=None,
                                           num_classes=NUM_CLASSES, aux_loss=True).eval().requires_grad_(False)
    teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return teacher


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 64, 64, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=generator)
    target[:, :8] = 255  # the reference's ignore label
    return image, target


def train_steps(teacher, fckd_loss, steps=2):
    """The reference train_one_epoch's step with the doc's lines; returns the student, its initial
    parameters and, per step, (total loss, FCKD output)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    student = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None,
                                           num_classes=NUM_CLASSES)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6)
    student.train()
    records = []
    for step in range(steps):
        image, target = batch(step)
        image, target = image.to(device), target.to(device)
        output = student(image)
        loss = criterion(output, target)
        with torch.no_grad(): teacher_logits = teacher.to(device)(image)["out"]  # noqa: E701 (the doc's line)
        distill = fckd_loss(output["out"], teacher_logits)
        loss = loss + distill["loss"]

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append((loss.detach(), {k: v.detach() for k, v in distill.items()}))
    return student, before, records


def test_teacher_and_fckd_in_the_reference_step(tmp_path, one_thread):
    checkpoint = tmp_path / "teacher.pth"
    save_teacher_checkpoint(checkpoint, CONFIDENCE)
    teacher = load_teacher(checkpoint)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kept pixel, so no "kept no pixel" warning
        student, before, records = train_steps(teacher, FCKDLoss(downsample=8))

    for loss, distill in records:
        assert torch.isfinite(loss)
        assert 0 < distill["keep_ratio"] <= 1
        assert distill["loss"] > 0 and torch.isfinite(distill["loss"])
    # the student learned; the teacher, frozen and in eval mode (BN statistics too), did not change
    changed = [name for name, p in student.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(changed) == len(before)
    assert not teacher.training
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert all(p.grad is None for p in teacher.parameters())


def test_uniform_teacher_warns_once_and_adds_nothing(tmp_path, one_thread):
    checkpoint = tmp_path / "teacher.pth"
    save_teacher_checkpoint(checkpoint, 0.0)  # last layer's weight and bias zero: uniform logits
    teacher = load_teacher(checkpoint)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so that Python's own once-per-place filter hides nothing
        _, _, records = train_steps(teacher, FCKDLoss(downsample=8))
    kept_none = [w for w in caught if "kept no pixel" in str(w.message)]
    assert len(kept_none) == 1
    assert kept_none[0].category is RuntimeWarning
    for loss, distill in records:
        assert torch.isfinite(loss)
        assert distill["keep_ratio"] == 0 and distill["loss"] == 0

    # the doc's fallback for an uncertain teacher keeps a fixed share of the pixels instead
    image, _ = batch(0)
    student_logits = torch.randn(2, NUM_CLASSES, 64, 64, requires_grad=True)
    with torch.no_grad():
        teacher_logits = teacher(image)["out"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantile = FCKDLoss(downsample=8, condense="quantile", keep=0.8)(student_logits, teacher_logits)
    # a uniform teacher ties everywhere: ties are kept (the spec), so every pixel is, and FCKD says so
    assert not [w for w in caught if "kept no pixel" in str(w.message)]
    assert [w for w in caught if "ties" in str(w.message)]
    assert quantile["keep_ratio"] >= 0.8
    assert quantile["loss"] > 0 and torch.isfinite(quantile["loss"])
    quantile["loss"].backward()
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0
