"""Tests of fckd.py against the spec (shared/FCKD_SPEC.md).

The reference below is written from the spec alone, in float64, with the N x N attention
materialised; it never calls fckd.py.
"""

import ast
import math
import re
import shutil
import subprocess
import sys
import warnings
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


def ref_score(u, v, similarity, temperature):
    """Scores between the columns of u (L x n) and of v (L x m): n x m."""
    if similarity == "dot":
        return u.T @ v / math.sqrt(u.shape[0])
    un = u / u.norm(dim=0, keepdim=True).clamp_min(1e-12)
    vn = v / v.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return un.T @ vn / temperature


def ref_log(w):
    return torch.where(w > 0, torch.log(w), torch.full_like(w, -math.inf))


def ref_enhance(x, dim, gamma, similarity="dot", temperature=0.1, weights=None):
    """Step 4 of the spec with the attention materialised; weights None means w = 1."""
    b, c, hgt, wid = x.shape
    n = hgt * wid
    out = torch.empty_like(x)
    for i in range(b):
        X = x[i].reshape(c, n)  # C x N
        w = torch.ones(n, dtype=x.dtype) if weights is None else weights[i].reshape(n).to(x.dtype)
        if dim == "spatial":
            A = ref_softmax(ref_score(X, X, similarity, temperature) + ref_log(w)[None, :], 1)  # N x N, row i: pixel i
            E = (A @ X.T).T
        else:
            probes = X * w[None, :]
            A = ref_softmax(ref_score(probes.T, probes.T, similarity, temperature), 1)  # C x C
            E = A @ X
        out[i] = ((X + gamma * E) / (1 + gamma)).reshape(c, hgt, wid)
    return out


def ref_fckd(s, t, condense="hard", threshold=0.5, apply="multiply", similarity="dot",
             temperature=0.1, gamma=1.0, tau_s=1.0, tau_c=4.0, lam_s=1.0, lam_c=3.0, matrix=None):
    """Steps 1-5; matrix: a given M (B x 1 x H x W) in place of steps 1-2."""
    s, t = s.double(), t.double()
    if s.shape[2:] != t.shape[2:]:
        larger = s.shape[2] > t.shape[2] or s.shape[3] > t.shape[3]
        s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False, antialias=larger)
    b, c, hgt, wid = t.shape
    m = ref_matrix(t, condense, threshold) if matrix is None else matrix
    if apply == "multiply":
        X, S, w = m * t, m * s, None
    else:
        X, S, w = t, s, m
    options = dict(similarity=similarity, temperature=temperature, weights=w)
    t_sp = ref_enhance(X, "spatial", gamma, **options)  # gamma 0: X + 0 E = X
    t_ch = ref_enhance(X, "channel", gamma, **options)
    kl_pixels = ref_kl(ref_softmax(t_sp / tau_s, 1), ref_softmax(S / tau_s, 1), 1)  # B x H x W
    if apply == "multiply":
        l_sp = tau_s ** 2 / (b * hgt * wid) * kl_pixels.sum()
    else:
        l_sp = tau_s ** 2 * (m[:, 0] * kl_pixels).sum() / m.sum() if m.sum() > 0 else torch.zeros((), dtype=t.dtype)
    l_ch, counted = torch.zeros((), dtype=t.dtype), 0
    for i in range(b):
        w_i = torch.ones(hgt * wid, dtype=t.dtype) if apply == "multiply" else m[i].reshape(-1)
        if w_i.sum() == 0:
            continue  # an image that keeps no pixel adds nothing and is not counted
        log_w = ref_log(w_i)[None, :]
        p = ref_softmax(t_ch[i].reshape(c, -1) / tau_c + log_w, 1)
        q = ref_softmax(S[i].reshape(c, -1) / tau_c + log_w, 1)
        l_ch = l_ch + ref_kl(p, q, 1).sum()
        counted += c
    l_ch = tau_c ** 2 * l_ch / max(counted, 1)
    return {"loss": lam_s * l_sp + lam_c * l_ch, "spatial": l_sp, "channel": l_ch, "keep_ratio": m.mean()}


def logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
@pytest.mark.parametrize("gamma", [0.7, 0.0])
@pytest.mark.parametrize("student_size", [(6, 10), (3, 5), (4, 25)])  # (4, 25): larger in width only
def test_matches_float64_reference(apply, similarity, condense, gamma, student_size):
    t = logits(2, 7, 6, 10, seed=1)
    s = logits(2, 7, *student_size, seed=2)
    options = dict(condense=condense, threshold=0.6, apply=apply, similarity=similarity, temperature=0.2,
                   gamma=gamma)
    got = fckd.FCKDLoss(**options)(s, t)
    want = ref_fckd(s, t, **options)
    if condense == "hard":  # the threshold should actually split the pixels in this fixture
        assert 0.1 < float(want["keep_ratio"]) < 0.9
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        assert got[key].dtype == torch.float32 and got[key].dim() == 0
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_non_default_temperatures_and_weights():
    t, s = logits(1, 5, 4, 6, seed=3), logits(1, 5, 4, 6, seed=4)
    options = dict(condense="soft", apply="multiply", similarity="dot", gamma=2.0, tau_spatial=2.5,
                   tau_channel=1.5, lambda_spatial=0.3, lambda_channel=1.7)
    got = fckd.FCKDLoss(**options)(s, t)["loss"]
    want = ref_fckd(s, t, condense="soft", apply="multiply", similarity="dot", gamma=2.0, tau_s=2.5, tau_c=1.5,
                    lam_s=0.3, lam_c=1.7)["loss"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_the_defaults_are_the_reading_the_camvid_table_chose():
    """FCKDLoss() is the finalists' winner (docs/results.md): hard M at 0.7, mask, no enhancement
    (gamma 0), with the KD and CWD temperatures and weights."""
    t, s = logits(2, 5, 6, 7, seed=40), logits(2, 5, 6, 7, seed=41)
    got = fckd.FCKDLoss()(s, t)
    want = ref_fckd(s, t, condense="hard", threshold=0.7, apply="mask", gamma=0.0, tau_s=1.0, tau_c=4.0,
                    lam_s=1.0, lam_c=3.0)
    # and gamma 0 is the loss without enhancement under any similarity
    torch.testing.assert_close(fckd.FCKDLoss(gamma=0.0, similarity="dot")(s, t)["loss"], got["loss"])
    assert 0.05 < float(want["keep_ratio"]) < 0.95  # the threshold splits this fixture's pixels
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dim", ["spatial", "channel"])
@pytest.mark.parametrize("channels", [8, 19])  # 19 exercises the zero padding to a multiple of 8
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_enhance_matches_materialised_attention(dim, channels, similarity, weighted):
    x = logits(2, channels, 5, 7, seed=5)
    weights = None
    if weighted:  # a hard matrix with a soft value or two: both kinds of weight
        weights = (torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(6)) > 0.4).float()
        weights[0, 0, 0, :2] = torch.tensor([0.3, 0.8])
    got = fckd.soft_enhance(x, dim, gamma=1.3, similarity=similarity, temperature=0.15, weights=weights)
    want = ref_enhance(x.double(), dim, 1.3, similarity, 0.15, None if weights is None else weights.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", ["spatial", "channel"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cosine_weights_do_not_depend_on_the_scale_of_the_logits(dim, weighted):
    """E(k x) = k E(x) for any k > 0 exactly when the attention weights do not change with k."""
    x = logits(2, 6, 4, 5, seed=30)
    weights = (torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(31)) > 0.3).float() if weighted else None
    base = fckd.soft_enhance(x, dim, similarity="cosine", temperature=0.1, weights=weights)
    for k in (0.01, 7.0, 300.0):
        scaled = fckd.soft_enhance(k * x, dim, similarity="cosine", temperature=0.1, weights=weights)
        torch.testing.assert_close(scaled, k * base, rtol=1e-4, atol=1e-5 * k)
    # the dot product is not scale-free: the same check fails for it (on small logits, whose dot
    # attention is not yet one-hot)
    small = x / 50
    dot = fckd.soft_enhance(small, dim, similarity="dot", weights=weights)
    assert not torch.allclose(fckd.soft_enhance(7.0 * small, dim, similarity="dot", weights=weights), 7.0 * dot,
                              rtol=1e-3, atol=1e-3)


def test_cosine_attention_puts_most_weight_on_the_pixel_itself():
    """The reason for cosine: a vector's most similar vector is itself, whatever the norms."""
    x = logits(1, 8, 4, 4, seed=32)
    x[0, :, 0, 0] *= 50  # one pixel of large norm: under dot it draws the attention of its neighbours
    tokens = x.double().reshape(8, 16)
    attention = ref_softmax(ref_score(tokens, tokens, "cosine", 0.05), 1)
    assert (attention.argmax(1) == torch.arange(16)).all()
    assert (ref_softmax(ref_score(tokens, tokens, "dot", None), 1).argmax(1) == 0).sum() > 1  # dot: pixel 0 draws others
    # and fckd.soft_enhance with gamma large is close to that average, never dominated by pixel 0
    enhanced = fckd.soft_enhance(x, "spatial", gamma=1e6, similarity="cosine", temperature=0.05)
    want = (attention @ tokens.T).T.reshape(1, 8, 4, 4)
    torch.testing.assert_close(enhanced.double(), want, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_fckd_reduces_to_pixel_kd(apply, tau):
    t, s = logits(2, 6, 5, 7, seed=10), logits(2, 6, 5, 7, seed=11)
    loss = fckd.FCKDLoss(condense="none", apply=apply, gamma=0.0, lambda_channel=0.0, tau_spatial=tau)(s, t)["loss"]
    torch.testing.assert_close(loss.double(), ref_pixel_kd(s, t, tau))
    torch.testing.assert_close(fckd.spatial_kd(s, t, tau).double(), ref_pixel_kd(s, t, tau))


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_fckd_reduces_to_cwd(apply, tau):
    t, s = logits(2, 6, 5, 7, seed=12), logits(2, 6, 5, 7, seed=13)
    loss = fckd.FCKDLoss(condense="none", apply=apply, gamma=0.0, lambda_spatial=0.0, lambda_channel=1.0,
                         tau_channel=tau)(s, t)["loss"]
    torch.testing.assert_close(loss.double(), ref_cwd(s, t, tau))
    torch.testing.assert_close(fckd.channel_kd(s, t, tau).double(), ref_cwd(s, t, tau))


def kept_pixels(x, keep):
    """The pixels of image b that keep[b] keeps, as a 1 x C x 1 x n tensor (the others deleted)."""
    return x.permute(1, 0, 2, 3)[:, keep[:, 0]].reshape(1, x.shape[1], 1, -1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_mask_with_hard_matrix_is_kd_and_cwd_on_the_kept_pixels_only(tau):
    t, s = logits(3, 6, 5, 7, seed=40), logits(3, 6, 5, 7, seed=41)
    t[2] = 0.0  # a uniform teacher: image 2 keeps no pixel and must count for nothing
    keep = fckd.condensation_matrix(t, "hard", 0.8).bool()
    assert 0 < keep[:2].sum() < keep[:2].numel() and not keep[2].any()
    options = dict(condense="hard", threshold=0.8, apply="mask", gamma=0.0, tau_spatial=tau, tau_channel=tau)
    out = fckd.FCKDLoss(**options)(s, t)
    # KD over the kept pixels of all images, as if the dropped ones had been deleted
    close = dict(rtol=1e-5, atol=1e-6)  # float32 against the float64 reference
    torch.testing.assert_close(out["spatial"].double(), ref_pixel_kd(kept_pixels(s, keep), kept_pixels(t, keep), tau),
                               **close)
    # CWD image by image on the kept pixels only, averaged over the (image, channel) pairs that keep a pixel
    per_image = [ref_cwd(kept_pixels(s[i:i + 1], keep[i:i + 1]), kept_pixels(t[i:i + 1], keep[i:i + 1]), tau)
                 for i in range(2)]
    torch.testing.assert_close(out["channel"].double(), sum(per_image) / 2, **close)


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
def test_identical_logits_give_zero_loss_and_zero_gradient(apply, condense):
    t = logits(2, 5, 6, 6, seed=14)
    s = t.clone().requires_grad_()
    out = fckd.FCKDLoss(condense=condense, apply=apply, gamma=0.0)(s, t)
    out["loss"].backward()
    assert abs(float(out["loss"].detach())) < 1e-6
    assert s.grad.abs().max() < 1e-6


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_condensed_out_pixels_send_no_gradient(apply, similarity):
    t = logits(2, 5, 6, 6, scale=2.0, seed=15)
    s = logits(2, 5, 6, 6, seed=16).requires_grad_()
    fckd.FCKDLoss(threshold=0.5, apply=apply, similarity=similarity)(s, t)["loss"].backward()
    dropped = fckd.condensation_matrix(t, "hard", 0.5) == 0
    assert dropped.any() and (~dropped).any()
    grad = s.grad.abs().sum(1, keepdim=True)
    assert grad[dropped].max() == 0
    assert grad[~dropped].min() > 0


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("condense", ["hard", "soft"])
def test_a_matrix_that_keeps_no_pixel_gives_finite_values_and_gradients(apply, similarity, condense):
    t = logits(2, 5, 4, 6, scale=4.0, seed=42)
    t[1] = 0.0  # image 1: a uniform teacher, entropy 1 everywhere, so M = 0 there (hard and soft)
    options = dict(condense=condense, threshold=0.9, apply=apply, similarity=similarity, gamma=0.5)
    for teacher in (t, torch.zeros_like(t)):  # one image empty, then the whole batch
        s = logits(2, 5, 4, 6, seed=43).requires_grad_()
        out = fckd.FCKDLoss(**options)(s, teacher)
        out["loss"].backward()
        assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(s.grad).all()
        assert fckd.condensation_matrix(teacher[1:], condense, 0.9).max() == 0
        if apply == "mask":  # an image with no pixel kept adds nothing and sends no gradient
            assert s.grad[1].abs().max() == 0
    assert out["keep_ratio"] == 0 and (apply == "multiply" or out["loss"] == 0)
    if apply == "mask":  # so the first batch's loss is image 0's alone
        alone = ref_fckd(s[:1].detach(), t[:1], **options)["loss"]
        torch.testing.assert_close(fckd.FCKDLoss(**options)(s, t)["loss"].double(), alone, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient():
    t = logits(1, 4, 4, 4).requires_grad_()
    s = logits(1, 4, 4, 4, seed=1).requires_grad_()
    fckd.FCKDLoss()(s, t)["loss"].backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_teacher_pixel_is_dropped_not_spread(apply, similarity, condense, bad):
    t = logits(2, 5, 4, 6, scale=4.0, seed=44)
    s = logits(2, 5, 4, 6, seed=45).requires_grad_()
    broken = t.clone()
    broken[1, 2, 3, 4] = bad
    options = dict(condense=condense, threshold=0.9, apply=apply, similarity=similarity)
    out = fckd.FCKDLoss(**options)(s, broken)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(s.grad).all()
    matrix = fckd.condensation_matrix(broken, condense, 0.9)
    assert matrix[1, 0, 3, 4] == 0 and torch.isfinite(matrix).all()
    assert s.grad[1, :, 3, 4].abs().max() == 0  # the broken pixel teaches nothing
    others = torch.ones_like(matrix, dtype=torch.bool)
    others[1, 0, 3, 4] = False
    assert torch.equal(matrix[others], fckd.condensation_matrix(t, condense, 0.9)[others])  # nothing else moves


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("apply, similarity", [("multiply", "dot"), ("mask", "cosine")])
def test_bf16_inputs_are_close_to_float32(apply, similarity):
    t, s = logits(2, 19, 8, 12, seed=17), logits(2, 19, 8, 12, seed=18)
    loss_fn = fckd.FCKDLoss(condense="soft", apply=apply, similarity=similarity)
    full = loss_fn(s, t)
    half = loss_fn(s.bfloat16(), t.bfloat16())
    ref = loss_fn(s.bfloat16().float(), t.bfloat16().float())  # same rounded inputs, float32 inside
    for key in ("loss", "spatial", "channel"):
        assert half[key].dtype == torch.float32 and torch.isfinite(half[key])
        torch.testing.assert_close(half[key], ref[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(half[key], full[key], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("apply, similarity", [("multiply", "dot"), ("mask", "cosine")])
def test_autocast_does_not_lower_precision(apply, similarity):
    t, s = logits(2, 19, 8, 12, seed=19), logits(2, 19, 8, 12, seed=20)
    loss_fn = fckd.FCKDLoss(apply=apply, similarity=similarity)
    plain = loss_fn(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = loss_fn(s, t)
        kd, cwd = fckd.spatial_kd(s, t), fckd.channel_kd(s, t)
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        torch.testing.assert_close(cast[key], plain[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, fckd.spatial_kd(s, t))
    torch.testing.assert_close(cwd, fckd.channel_kd(s, t))


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("condense", ["hard", "soft", "none"])
def test_extreme_logits_stay_finite(apply, similarity, condense):
    t = logits(2, 19, 6, 8, scale=1e4, seed=21)
    s = logits(2, 19, 6, 8, scale=1e4, seed=22).requires_grad_()
    out = fckd.FCKDLoss(condense=condense, threshold=0.9, apply=apply, similarity=similarity)(s, t)
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
    (lambda: fckd.FCKDLoss()(torch.zeros(0, 5, 4, 4), torch.zeros(0, 5, 4, 4)), r"non-empty.*\(0, 5, 4, 4\)"),
    (lambda: fckd.FCKDLoss()(torch.zeros(2, 5, 4, 4), torch.zeros(2, 5, 0, 4)), r"non-empty.*\(2, 5, 0, 4\)"),
    (lambda: fckd.FCKDLoss()(torch.zeros(2, 5, 4, 4, dtype=torch.long), torch.zeros(2, 5, 4, 4)),
     r"student_logits.*floating-point.*int64"),
    (lambda: fckd.spatial_kd(torch.zeros(2, 5, 4, 4), torch.zeros(2, 5, 4, 4, dtype=torch.bool)),
     r"teacher_logits.*floating-point.*bool"),
    (lambda: fckd.pixel_entropy(torch.zeros(2, 1, 3, 3)), r"at least 2 classes"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), threshold=1.5), r"threshold.*\[0, 1\].*1.5"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), threshold=-0.1), r"threshold"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), mode="median"), r"mode.*'median'"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "temporal"), r"dim.*'temporal'"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "spatial", gamma=-1.0), r"gamma.*-1.0"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "spatial", similarity="euclid"), r"similarity.*'euclid'"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "spatial", temperature=0.0), r"temperature.*0.0"),
    (lambda: fckd.soft_enhance(torch.zeros(2, 3, 2, 2), "channel", weights=torch.ones(2, 1, 2, 3)),
     r"weights.*\(2, 3, 2, 2\).*\(2, 1, 2, 3\)"),
    (lambda: fckd.soft_enhance(torch.zeros(2, 3, 2, 2), "spatial", weights=torch.ones(2, 3, 2, 2)), r"B x 1 x H x W"),
    (lambda: fckd.FCKDLoss(condense="entropy"), r"condense.*'entropy'"),
    (lambda: fckd.FCKDLoss(apply="add"), r"apply.*'add'"),
    (lambda: fckd.FCKDLoss(similarity="l2"), r"similarity.*'l2'"),
    (lambda: fckd.FCKDLoss(temperature=-0.1), r"temperature.*-0.1"),
    (lambda: fckd.FCKDLoss(temperature=float("nan")), r"temperature.*nan"),
    (lambda: fckd.FCKDLoss(gamma=float("inf")), r"gamma.*inf"),
    (lambda: fckd.FCKDLoss(tau_channel=float("inf")), r"tau_channel.*inf"),
    (lambda: fckd.FCKDLoss(lambda_spatial=float("inf")), r"lambda_spatial.*inf"),
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


def test_fckdloss_takes_keyword_arguments_only():
    """Revision 2 inserted arguments: a positional call written for revision 1 must fail, not shift."""
    with pytest.raises(TypeError):
        fckd.FCKDLoss("hard", 0.7)


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


# ----------------------------------------------------------------------------- revision 3

def ref_quantile_matrix(t, keep):
    """Spec, quantile: per image, keep the pixels whose Hn is at most the k-th smallest finite Hn,
    k = ceil(keep * finite pixels), with keep read as the decimal it is written as."""
    from fractions import Fraction
    finite = torch.isfinite(t).all(1, keepdim=True)
    p = ref_softmax(torch.where(finite, t.double(), 0.0), 1)
    hn = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(1, keepdim=True) / math.log(t.shape[1])
    out = torch.zeros_like(hn)
    for b in range(t.shape[0]):
        values = sorted(hn[b][finite[b]].tolist())
        if not values:
            continue
        k = math.ceil(Fraction(str(keep)) * len(values))
        out[b] = ((hn[b] <= values[k - 1]) & finite[b]).double()
    return out


@pytest.mark.parametrize("keep", [0.1, 0.37, 0.5, 0.7, 0.8, 1.0])
def test_quantile_keeps_the_lowest_entropy_pixels_of_each_image(keep):
    t = logits(3, 7, 6, 10, seed=50)
    t[1, :, 2, 3] = float("nan")  # dropped first, and not counted in H W
    got = fckd.condensation_matrix(t, "quantile", keep=keep)
    want = ref_quantile_matrix(t, keep)
    assert torch.equal(got.double(), want)
    # random logits have distinct entropies: each image keeps exactly ceil(keep * its finite pixels)
    counts = got.sum((1, 2, 3)).tolist()
    finite = [60, 59, 60]
    assert counts == [math.ceil(round(keep * n, 9)) for n in finite]
    assert got[1, 0, 2, 3] == 0


def test_quantile_keeps_ties_at_the_kth_value():
    t = torch.zeros(1, 3, 2, 2)
    t[0, 0] = torch.tensor([[5.0, 5.0], [5.0, 1.0]])  # three pixels with the same (lowest) entropy
    matrix = fckd.condensation_matrix(t, "quantile", keep=0.25)  # k = 1, but the lowest value is shared
    assert matrix.sum() == 3 and matrix[0, 0, 1, 1] == 0


def test_quantile_with_keep_one_is_no_condensation():
    t, s = logits(2, 6, 5, 7, seed=51), logits(2, 6, 5, 7, seed=52)
    for apply in ("mask", "multiply"):
        got = fckd.FCKDLoss(condense="quantile", keep=1.0, apply=apply)(s, t)
        want = fckd.FCKDLoss(condense="none", apply=apply)(s, t)
        for key in ("loss", "spatial", "channel", "keep_ratio"):
            torch.testing.assert_close(got[key], want[key], msg=key)


@pytest.mark.parametrize("apply", ["multiply", "mask"])
@pytest.mark.parametrize("gamma", [0.7, 0.0])
def test_quantile_loss_matches_the_reference_on_its_matrix(apply, gamma):
    """FCKDLoss(condense="quantile") is the loss of the reference with M = the sort-based matrix."""
    t, s = logits(2, 7, 6, 10, seed=53), logits(2, 7, 6, 10, seed=54)
    options = dict(apply=apply, similarity="cosine", temperature=0.2, gamma=gamma)
    got = fckd.FCKDLoss(condense="quantile", keep=0.6, **options)(s, t)
    want = ref_fckd(s, t, matrix=ref_quantile_matrix(t, 0.6), **options)
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("downsample", [2, 3, 8])
@pytest.mark.parametrize("student_size", [(16, 20), (8, 10)])
def test_downsample_is_the_loss_on_average_pooled_logits(downsample, student_size):
    t, s = logits(2, 5, 16, 20, seed=55), logits(2, 5, *student_size, seed=56)
    size = (math.ceil(16 / downsample), math.ceil(20 / downsample))
    options = dict(apply="mask", similarity="cosine", temperature=0.2, gamma=0.5)
    got = fckd.FCKDLoss(downsample=downsample, condense="quantile", keep=0.5, **options)(s, t)
    pooled_t = F.adaptive_avg_pool2d(t.double(), size)
    want = ref_fckd(F.adaptive_avg_pool2d(s.double(), size), pooled_t, matrix=ref_quantile_matrix(pooled_t, 0.5),
                    **options)
    for key in ("loss", "spatial", "channel", "keep_ratio"):
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_downsample_one_changes_nothing():
    t, s = logits(2, 5, 9, 11, seed=57), logits(2, 5, 5, 6, seed=58)
    got, want = fckd.FCKDLoss(downsample=1)(s, t), fckd.FCKDLoss()(s, t)
    for key in got:
        assert torch.equal(got[key], want[key]), key


def test_a_batch_that_keeps_no_pixel_warns_once():
    loss_fn = fckd.FCKDLoss(threshold=0.5)
    s = logits(2, 5, 4, 4, seed=59)
    with pytest.warns(RuntimeWarning, match="kept no pixel of a whole batch"):
        assert loss_fn(s, torch.zeros(2, 5, 4, 4))["loss"] == 0  # a uniform teacher: entropy 1 everywhere
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        loss_fn(s, torch.zeros(2, 5, 4, 4))
        fckd.FCKDLoss(threshold=0.5)(s, logits(2, 5, 4, 4, scale=20.0, seed=60))  # pixels kept: no warning


@pytest.mark.parametrize("call, message", [
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), "quantile", keep=0.0), r"keep.*\(0, 1\].*0.0"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), "quantile", keep=1.5), r"keep.*1.5"),
    (lambda: fckd.FCKDLoss(keep=float("nan")), r"keep.*nan"),
    (lambda: fckd.FCKDLoss(downsample=0), r"downsample.*int >= 1.*0"),
    (lambda: fckd.FCKDLoss(downsample=2.0), r"downsample.*2.0"),
    (lambda: fckd.FCKDLoss(downsample=True), r"downsample.*True"),
])
def test_bad_revision_3_arguments_raise_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- revision 4

def test_enhance_is_gone_and_gamma_zero_computes_no_attention(monkeypatch):
    for value in (False, True):
        with pytest.raises(TypeError, match="enhance"):
            fckd.FCKDLoss(enhance=value)
    assert "enhance" not in repr(fckd.FCKDLoss()) and "gamma=0.0" in repr(fckd.FCKDLoss())
    t, s = logits(2, 5, 4, 6, seed=70), logits(2, 5, 4, 6, seed=71)
    # revision 1 is exactly apply="multiply", similarity="dot", gamma=1.0
    revision_1 = dict(condense="hard", threshold=0.6, apply="multiply", similarity="dot", gamma=1.0)
    torch.testing.assert_close(fckd.FCKDLoss(**revision_1)(s, t)["loss"].double(), ref_fckd(s, t, **revision_1)["loss"],
                               rtol=1e-5, atol=1e-6)

    def no_attention(*args, **kwargs):
        raise AssertionError("gamma 0 computed an attention")
    for name in ("_spatial_attention", "_channel_attention"):
        monkeypatch.setattr(fckd, name, no_attention)
    monkeypatch.setattr(fckd.F, "scaled_dot_product_attention", no_attention)
    for apply in ("multiply", "mask"):
        fckd.FCKDLoss(apply=apply, similarity="dot", gamma=0.0)(s, t)
    x = logits(1, 4, 3, 3)
    for dim in ("spatial", "channel"):
        assert torch.equal(fckd.soft_enhance(x, dim, gamma=0.0), x)


def test_a_student_larger_than_the_teacher_gets_gradient_at_every_pixel():
    t = logits(2, 5, 4, 5, seed=72)
    s = logits(2, 5, 32, 40, seed=73).requires_grad_()  # 8x the teacher's size
    fckd.FCKDLoss(condense="none")(s, t)["loss"].backward()
    reached = s.grad.abs().sum(1) > 0
    assert reached.float().mean() > 0.99
    # plain bilinear reads 2 x 2 student pixels per teacher pixel: most would get nothing
    plain = s.detach().clone().requires_grad_()
    F.interpolate(plain, size=(4, 5), mode="bilinear", align_corners=False).square().sum().backward()
    assert (plain.grad.abs().sum(1) > 0).float().mean() < 0.1


@pytest.mark.parametrize("block", [1, 3 * 2 * 35])  # one query pixel per block; three (35 is not a multiple of 3)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
def test_spatial_attention_runs_in_bounded_blocks_of_queries(monkeypatch, block, similarity, weighted):
    x = logits(2, 11, 5, 7, seed=74)  # N = 35
    weights = None
    if weighted:
        weights = (torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(75)) > 0.4).float()
        weights[0, 0, 0, :2] = torch.tensor([0.3, 0.8])
    assert fckd._ATTENTION_BLOCK * 4 <= 64 * 2 ** 20  # the default: at most 64 MB of float32 scores at once
    scores, sdpa = [], F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        assert kwargs.get("scale") is not None  # zero-padded C: the default 1/sqrt(C') would be wrong
        scores.append(query.shape[0] * query.shape[2] * key.shape[2])  # B x queries x N
        return sdpa(query, key, value, **kwargs)
    monkeypatch.setattr(fckd.F, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(fckd, "_ATTENTION_BLOCK", block)
    got = fckd.soft_enhance(x, "spatial", gamma=1.3, similarity=similarity, temperature=0.15, weights=weights)
    want = ref_enhance(x.double(), "spatial", 1.3, similarity, 0.15, None if weights is None else weights.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    rows = 1 if block == 1 else 3
    assert len(scores) == math.ceil(35 / rows) and max(scores) == 2 * rows * 35


def test_quantile_ties_that_keep_much_more_than_keep_warn_once():
    loss_fn = fckd.FCKDLoss(condense="quantile", keep=0.5)
    s = logits(2, 5, 4, 4, seed=76)
    with pytest.warns(RuntimeWarning, match="ties in the teacher's entropy"):
        out = loss_fn(s, torch.zeros(2, 5, 4, 4))  # a uniform teacher: every Hn is 1, every pixel tied
    assert out["keep_ratio"] == 1  # the ties are kept, as the spec says
    saturated = torch.zeros(2, 5, 4, 4)
    saturated[:, 1] = 1e4  # Hn 0 everywhere
    with pytest.warns(RuntimeWarning, match="ties"):
        fckd.FCKDLoss(condense="quantile", keep=0.8)(s, saturated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning, or one for distinct entropies, would raise here
        loss_fn(s, torch.zeros(2, 5, 4, 4))
        for keep in (0.5, 0.8, 0.93):
            out = fckd.FCKDLoss(condense="quantile", keep=keep)(s, logits(2, 5, 4, 4, seed=77))
            assert out["keep_ratio"] == math.ceil(keep * 16) / 16
        fckd.FCKDLoss(condense="hard")(s, torch.zeros(2, 5, 4, 4) + 1e4 * (torch.arange(5) == 1).view(1, 5, 1, 1))


def test_pixel_entropy_is_finite_with_a_minus_inf_logit():
    masked = logits(2, 6, 3, 4, seed=78)
    masked[:, 2] = -math.inf  # class 2 is impossible everywhere
    masked[1, 4, 0, 0] = -math.inf  # and class 4 at one pixel
    leaf = masked.clone().requires_grad_()
    hn = fckd.pixel_entropy(leaf)
    assert torch.isfinite(hn).all()
    hn.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    for b, i, j in [(0, 1, 2), (1, 0, 0), (1, 2, 3)]:
        rest = masked[b, :, i, j].double()
        p = ref_softmax(rest[torch.isfinite(rest)], 0)
        torch.testing.assert_close(hn[b, 0, i, j].double(), -(p * p.log()).sum() / math.log(6), rtol=1e-5, atol=1e-6)
    # a pixel with no finite logit has no entropy to give, and the condensation matrix drops it as before
    masked[0, :, 1, 1] = -math.inf
    assert torch.isnan(fckd.pixel_entropy(masked)[0, 0, 1, 1])
    assert fckd.condensation_matrix(masked, "none")[0, 0, 1, 1] == 0


NUMBER_ARGUMENTS = ("keep", "threshold", "gamma", "temperature", "tau_spatial", "tau_channel", "lambda_spatial",
                    "lambda_channel", "downsample")


@pytest.mark.parametrize("name", NUMBER_ARGUMENTS)
@pytest.mark.parametrize("value", ["0.5", None, True])
def test_arguments_of_the_wrong_type_are_named(name, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        fckd.FCKDLoss(**{name: value})


@pytest.mark.parametrize("call, message", [
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), "hard", threshold="0.5"), r"threshold.*'0.5'"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), "quantile", keep=None), r"keep.*None"),
    (lambda: fckd.condensation_matrix(torch.zeros(1, 3, 2, 2), "quantile", keep=True), r"keep.*True"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "spatial", gamma="1"), r"gamma.*'1'"),
    (lambda: fckd.soft_enhance(torch.zeros(1, 3, 2, 2), "channel", temperature=None), r"temperature.*None"),
    (lambda: fckd.spatial_kd(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), tau="1"), r"tau.*'1'"),
    (lambda: fckd.channel_kd(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), tau=False), r"tau.*False"),
])
def test_functions_name_arguments_of_the_wrong_type(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


def test_logits_on_two_devices_raise_a_value_error_naming_both():
    s, t = torch.zeros(2, 5, 4, 4, device="meta"), torch.zeros(2, 5, 4, 4)
    for call in (fckd.FCKDLoss(), fckd.spatial_kd, fckd.channel_kd):
        with pytest.raises(ValueError, match=r"student logits are on meta, teacher logits on cpu: put both on one"):
            call(s, t)
    with pytest.raises(ValueError, match=r"student logits are on cpu, teacher logits on meta"):
        fckd.FCKDLoss()(t, s)
    with pytest.raises(ValueError, match=r"x is on cpu, weights on meta"):
        fckd.soft_enhance(t, "spatial", weights=torch.ones(2, 1, 4, 4, device="meta"))
