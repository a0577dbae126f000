"""Tests of fckd.py against the spec (shared/FCKD_SPEC.md).

The reference below is written from the spec alone, in float64, with the N x N attention
materialised; it never calls fckd.py.
"""

import ast
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fckd

FCKD_FILE = Path(fckd.__file__)


# ----------------------------------------------------------------------------- reference

def ref_softmax(z, dim):
    e = torch.exp(z - z.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def ref_kl(p, q, dim):
    """KL(p || q) along dim for probability tensors, with 0 log 0 = 0."""
    ratio = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return ratio.sum(dim)


def ref_matrix(t, mode, threshold):
    num_classes = t.shape[1]
    p = ref_softmax(t, 1)
    h = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(1, keepdim=True)
    hn = h / math.log(num_classes)
    if mode == "hard":
        return (hn <= threshold).double()
    if mode == "soft":
        return 1 - hn
    return torch.ones_like(hn)


def ref_enhance(x, dim, gamma):
    b, c, hgt, wid = x.shape
    n = hgt * wid
    out = torch.empty_like(x)
    for i in range(b):
        X = x[i].reshape(c, n)  # C x N
        if dim == "spatial":
            A = ref_softmax(X.T @ X / math.sqrt(c), 1)  # N x N, row i = weights of pixel i
            E = (A @ X.T).T
        else:
            A = ref_softmax(X @ X.T / math.sqrt(n), 1)  # C x C
            E = A @ X
        out[i] = ((X + gamma * E) / (1 + gamma)).reshape(c, hgt, wid)
    return out


def ref_fckd(s, t, condense="hard", threshold=0.5, enhance=True, gamma=1.0, tau_s=1.0, tau_c=4.0,
             lam_s=1.0, lam_c=3.0):
    s, t = s.double(), t.double()
    if s.shape[2:] != t.shape[2:]:
        s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False)
    b, c, hgt, wid = t.shape
    m = ref_matrix(t, condense, threshold)
    tc, sc = m * t, m * s
    t_sp = ref_enhance(tc, "spatial", gamma) if enhance else tc
    t_ch = ref_enhance(tc, "channel", gamma) if enhance else tc
    l_sp = tau_s ** 2 / (b * hgt * wid) * ref_kl(ref_softmax(t_sp / tau_s, 1), ref_softmax(sc / tau_s, 1), 1).sum()
    t_flat, s_flat = t_ch.reshape(b, c, -1), sc.reshape(b, c, -1)
    l_ch = tau_c ** 2 / (b * c) * ref_kl(ref_softmax(t_flat / tau_c, 2), ref_softmax(s_flat / tau_c, 2), 2).sum()
    return {"loss": lam_s * l_sp + lam_c * l_ch, "spatial": l_sp, "channel": l_ch, "keep_ratio": m.mean()}


def logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
@pytest.mark.parametrize("enhance", [True, False])
@pytest.mark.parametrize("student_size", [(6, 10), (3, 5)])
def test_matches_float64_reference(condense, enhance, student_size):
    t = logits(2, 7, 6, 10, seed=1)
    s = logits(2, 7, *student_size, seed=2)
    got = fckd.FCKDLoss(condense=condense, threshold=0.6, enhance=enhance, gamma=0.7)(s, t)
    want = ref_fckd(s, t, condense=condense, threshold=0.6, enhance=enhance, gamma=0.7)
    if condense == "hard":  # the threshold should actually split the pixels in this fixture
        assert 0.1 < float(want["keep_ratio"]) < 0.9
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        assert got[key].dtype == torch.float32 and got[key].dim() == 0
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_non_default_temperatures_and_weights():
    t, s = logits(1, 5, 4, 6, seed=3), logits(1, 5, 4, 6, seed=4)
    options = dict(condense="soft", gamma=2.0, tau_spatial=2.5, tau_channel=1.5, lambda_spatial=0.3,
                   lambda_channel=1.7)
    got = fckd.FCKDLoss(**options)(s, t)["loss"]
    want = ref_fckd(s, t, condense="soft", gamma=2.0, tau_s=2.5, tau_c=1.5, lam_s=0.3, lam_c=1.7)["loss"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", ["spatial", "channel"])
@pytest.mark.parametrize("channels", [8, 19])  # 19 exercises the zero padding to a multiple of 8
def test_soft_enhance_matches_materialised_attention(dim, channels):
    x = logits(2, channels, 5, 7, seed=5)
    got = fckd.soft_enhance(x, dim, gamma=1.3)
    torch.testing.assert_close(got.double(), ref_enhance(x.double(), dim, 1.3), rtol=1e-5, atol=1e-5)


def test_soft_enhance_gamma_zero_is_identity_and_has_no_gradient():
    x = logits(1, 4, 3, 3).requires_grad_()
    out = fckd.soft_enhance(x, "spatial", gamma=0.0)
    torch.testing.assert_close(out, x.detach())
    assert not out.requires_grad


def test_pixel_entropy_values_and_range():
    t = logits(2, 6, 4, 4, seed=6)
    hn = fckd.pixel_entropy(t)
    assert hn.shape == (2, 1, 4, 4)
    p = ref_softmax(t.double(), 1)
    torch.testing.assert_close(hn.double(), -(p * p.log()).sum(1, keepdim=True) / math.log(6))
    uniform = fckd.pixel_entropy(torch.zeros(1, 6, 2, 2))
    torch.testing.assert_close(uniform, torch.ones(1, 1, 2, 2))
    confident = torch.zeros(1, 6, 2, 2)
    confident[:, 2] = 1e4
    torch.testing.assert_close(fckd.pixel_entropy(confident), torch.zeros(1, 1, 2, 2))


def test_condensation_matrix_range_binary_and_threshold():
    t = logits(3, 11, 8, 8, scale=2.0, seed=7)
    hard = fckd.condensation_matrix(t, "hard", 0.5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(hard, (fckd.pixel_entropy(t) <= 0.5).float())
    soft = fckd.condensation_matrix(t, "soft")
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.equal(fckd.condensation_matrix(t, "none"), torch.ones(3, 1, 8, 8))
    assert fckd.condensation_matrix(t, "hard", 0.0).sum() == 0  # no pixel has entropy exactly 0
    assert fckd.condensation_matrix(t, "hard", 1.0).all()
    assert not fckd.condensation_matrix(t.requires_grad_(), "soft").requires_grad


def test_keep_ratio_is_mean_of_matrix():
    t, s = logits(2, 9, 5, 5, seed=8), logits(2, 9, 5, 5, seed=9)
    out = fckd.FCKDLoss(threshold=0.7)(s, t)
    torch.testing.assert_close(out["keep_ratio"], fckd.condensation_matrix(t, "hard", 0.7).mean())


# ----------------------------------------------------------------------------- identities

def ref_pixel_kd(s, t, tau):
    """Hinton's KD per pixel: KL(softmax(t/tau) || softmax(s/tau)) * tau^2 averaged over pixels."""
    c = s.shape[1]
    s2 = s.double().permute(0, 2, 3, 1).reshape(-1, c)
    t2 = t.double().permute(0, 2, 3, 1).reshape(-1, c)
    return F.kl_div(F.log_softmax(s2 / tau, 1), F.softmax(t2 / tau, 1), reduction="batchmean") * tau ** 2


def ref_cwd(s, t, tau):
    """CWD (Shu et al. 2021) on logits: per channel, KL of the spatial softmaxes, tau^2 / (B C)."""
    b, c = s.shape[:2]
    s2, t2 = s.double().reshape(b * c, -1), t.double().reshape(b * c, -1)
    p_t = F.softmax(t2 / tau, 1)
    return (p_t * (F.log_softmax(t2 / tau, 1) - F.log_softmax(s2 / tau, 1))).sum() * tau ** 2 / (b * c)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_fckd_reduces_to_pixel_kd(tau):
    t, s = logits(2, 6, 5, 7, seed=10), logits(2, 6, 5, 7, seed=11)
    loss = fckd.FCKDLoss(condense="none", enhance=False, lambda_channel=0.0, tau_spatial=tau)(s, t)["loss"]
    torch.testing.assert_close(loss.double(), ref_pixel_kd(s, t, tau))
    torch.testing.assert_close(fckd.spatial_kd(s, t, tau).double(), ref_pixel_kd(s, t, tau))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_fckd_reduces_to_cwd(tau):
    t, s = logits(2, 6, 5, 7, seed=12), logits(2, 6, 5, 7, seed=13)
    loss = fckd.FCKDLoss(condense="none", enhance=False, lambda_spatial=0.0, lambda_channel=1.0,
                         tau_channel=tau)(s, t)["loss"]
    torch.testing.assert_close(loss.double(), ref_cwd(s, t, tau))
    torch.testing.assert_close(fckd.channel_kd(s, t, tau).double(), ref_cwd(s, t, tau))


@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
def test_identical_logits_give_zero_loss_and_zero_gradient(condense):
    t = logits(2, 5, 6, 6, seed=14)
    s = t.clone().requires_grad_()
    out = fckd.FCKDLoss(condense=condense, enhance=False)(s, t)
    out["loss"].backward()
    assert abs(float(out["loss"].detach())) < 1e-6
    assert s.grad.abs().max() < 1e-6


def test_condensed_out_pixels_send_no_gradient():
    t = logits(2, 5, 6, 6, scale=2.0, seed=15)
    s = logits(2, 5, 6, 6, seed=16).requires_grad_()
    fckd.FCKDLoss(threshold=0.5)(s, t)["loss"].backward()
    dropped = fckd.condensation_matrix(t, "hard", 0.5) == 0
    assert dropped.any() and (~dropped).any()
    grad = s.grad.abs().sum(1, keepdim=True)
    assert grad[dropped].max() == 0
    assert grad[~dropped].min() > 0


def test_teacher_gets_no_gradient():
    t = logits(1, 4, 4, 4).requires_grad_()
    s = logits(1, 4, 4, 4, seed=1).requires_grad_()
    fckd.FCKDLoss()(s, t)["loss"].backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- precision

def test_bf16_inputs_are_close_to_float32():
    t, s = logits(2, 19, 8, 12, seed=17), logits(2, 19, 8, 12, seed=18)
    loss_fn = fckd.FCKDLoss(condense="soft")
    full = loss_fn(s, t)
    half = loss_fn(s.bfloat16(), t.bfloat16())
    ref = loss_fn(s.bfloat16().float(), t.bfloat16().float())  # same rounded inputs, float32 inside
    for key in ("loss", "spatial", "channel"):
        assert half[key].dtype == torch.float32 and torch.isfinite(half[key])
        torch.testing.assert_close(half[key], ref[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(half[key], full[key], rtol=2e-2, atol=1e-3)


def test_autocast_does_not_lower_precision():
    t, s = logits(2, 19, 8, 12, seed=19), logits(2, 19, 8, 12, seed=20)
    plain = fckd.FCKDLoss()(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fckd.FCKDLoss()(s, t)
        kd, cwd = fckd.spatial_kd(s, t), fckd.channel_kd(s, t)
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        torch.testing.assert_close(cast[key], plain[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, fckd.spatial_kd(s, t))
    torch.testing.assert_close(cwd, fckd.channel_kd(s, t))


@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
def test_extreme_logits_stay_finite(condense):
    t = logits(2, 19, 6, 8, scale=1e4, seed=21)
    s = logits(2, 19, 6, 8, scale=1e4, seed=22).requires_grad_()
    out = fckd.FCKDLoss(condense=condense, threshold=0.9)(s, t)
    out["loss"].backward()
    for key, value in out.items():
        assert torch.isfinite(value), key
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(fckd.pixel_entropy(t)).all()


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, message", [
    (lambda: fckd.FCKDLoss()(torch.zeros(2, 5, 4, 4), torch.zeros(3, 5, 4, 4)), r"\(2, 5, 4, 4\).*\(3, 5, 4, 4\)"),
    (lambda: fckd.FCKDLoss()(torch.zeros(2, 5, 4, 4), torch.zeros(2, 6, 4, 4)), r"\(2, 5, 4, 4\).*\(2, 6, 4, 4\)"),
    (lambda: fckd.FCKDLoss()(torch.zeros(5, 4, 4), torch.zeros(2, 5, 4, 4)), r"student_logits.*4-D.*\(5, 4, 4\)"),
    (lambda: fckd.spatial_kd(torch.zeros(2, 5, 4, 4), torch.zeros(2, 5, 4)), r"teacher_logits.*4-D.*\(2, 5, 4\)"),
    (lambda: fckd.channel_kd(torch.zeros(2, 5, 4, 4), torch.zeros(2, 4, 4, 4)), r"B x C"),
    (lambda: fckd.pixel_entropy(torch.zeros(2, 5)), r"4-D"),
    (lambda: fckd.pixel_entropy(torch.zeros(2, 1, 3, 3)), r"at least 2 classes"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), threshold=1.5), r"threshold.*\[0, 1\].*1.5"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), threshold=-0.1), r"threshold"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), mode="median"), r"mode.*'median'"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "temporal"), r"dim.*'temporal'"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "spatial", gamma=-1.0), r"gamma.*-1.0"),
    (lambda: fckd.FCKDLoss(condense="entropy"), r"condense.*'entropy'"),
    (lambda: fckd.FCKDLoss(threshold=2.0), r"threshold"),
    (lambda: fckd.FCKDLoss(gamma=-0.5), r"gamma"),
    (lambda: fckd.FCKDLoss(tau_spatial=-1.0), r"tau_spatial"),
    (lambda: fckd.FCKDLoss(tau_channel=0.0), r"tau_channel"),
    (lambda: fckd.FCKDLoss(lambda_spatial=-1.0), r"lambda_spatial"),
    (lambda: fckd.FCKDLoss(lambda_channel=-3.0), r"lambda_channel"),
    (lambda: fckd.spatial_kd(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), tau=-2.0), r"tau"),
    (lambda: fckd.channel_kd(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), tau=0.0), r"tau"),
])
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- portability

def test_imports_only_torch_and_standard_library():
    tree = ast.parse(FCKD_FILE.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "fckd.py must not use relative imports"
            modules.add(node.module.split(".")[0])
    outside = {m for m in modules if m != "torch" and m not in sys.stdlib_module_names}
    assert not outside, f"fckd.py imports {outside}"


def test_works_when_copied_alone(tmp_path):
    shutil.copy(FCKD_FILE, tmp_path / "fckd.py")
    script = (
        "import sys, torch, fckd; assert fckd.__file__.startswith(sys.argv[1]);"
        "s = torch.randn(2, 4, 3, 3, requires_grad=True); t = torch.randn(2, 4, 6, 6);"
        "out = fckd.FCKDLoss()(s, t); out['loss'].backward();"
        "print(float(out['loss']) >= 0, bool(torch.isfinite(s.grad).all()))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
