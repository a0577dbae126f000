"""FCKD: feature condensation knowledge distillation for semantic segmentation.

A reading of "FCKDNet: A Feature Condensation Knowledge Distillation Network for Semantic
Segmentation" (Entropy 2023, 25(1), 125) as one loss. It follows this project's spec, revision 4
(shared/FCKD_SPEC.md). This file imports nothing but torch and the standard library: copy it
into any training loop.

The paper's abstract fixes four steps; its equations were not available, so the formulas below
are this implementation's reading. Every part marked (choice) is a constructor argument of
FCKDLoss and can be switched off or changed in an ablation.

Inputs: student logits s (B x C x h x w) and teacher logits t (B x C x H x W), taken before
upsampling, on one device. s is resized to H x W bilinearly (align_corners=False) if needed,
antialiased where s is larger than t, so that every student pixel receives gradient; t is a
constant (no gradient). With downsample=K > 1 both are first average-pooled (adaptive_avg_pool2d)
to ceil(H/K) x ceil(W/K): for logits already upsampled to the input (torchvision's models), whose
spatial attention would cost O((H W)^2). All arithmetic runs in float32, whatever dtype arrives
and whether or not autocast is on.

1. Pixel information entropy (paper: an entropy rule on the teacher's outputs)
       p = softmax_C(t),   Hn = -sum_c p_c log p_c / log C   in [0, 1],   B x 1 x H x W
   with 0 log 0 = 0 (a class whose logit is -inf adds nothing).
2. Feature condensation matrix M (paper: separates confident foreground knowledge from
   uncertain background noise), no gradient:
       hard (default): M = [Hn <= threshold]     (choice: threshold)
       soft:           M = 1 - Hn                (choice)
       none:           M = 1
       quantile:       M = 1 on the `keep` fraction of each image's pixels of lowest Hn (choice: keep):
                       Hn <= the image's k-th smallest Hn, k = ceil(keep H W); ties at it are kept
                       (FCKDLoss warns once when ties make an image keep over 5% of its
                       pixels beyond k)
   A teacher pixel with a non-finite logit is dropped (M = 0) in every mode and does not count in H W.
3. M is applied to the outputs of both nets (paper); how is a choice, `apply`:
       multiply (revision 1, the literal wording): X = M t, S = M s, every pixel counts below
       mask: X = t, S = s, and M weights the pixels: w = M enters every softmax over pixels as
             + log w (a pixel with M = 0 is absent from it) and weights each pixel's spatial KL
   (under multiply, w = 1 below).
4. Soft enhancement of the teacher along space and channels (paper: "soft enhancement ... to
   strengthen the dependency between pixels"; the form is a choice): parameter-free attention
   on X viewed as C x N, N = H W,
       E_sp(X)[:, i] = sum_j softmax_j(score(X[:, i], X[:, j]) + log w_j) X[:, j]   (N x N, never stored)
       E_ch(X)[c]    = sum_d softmax_d(score(X[c] w, X[d] w)) X[d]                  (C x C)
       t_sp = (X + gamma E_sp(X)) / (1 + gamma),   t_ch = (X + gamma E_ch(X)) / (1 + gamma)
   gamma = 0 is no enhancement (t_sp = t_ch = X, no attention computed); with `similarity` (choice):
       dot (revision 1): score(u, v) = <u, v> / sqrt(len(u))
       cosine:           score(u, v) = <u, v> / (max(|u|, 1e-12) max(|v|, 1e-12) temperature)
5. Two distillation losses (paper: spatial and channel condensation features, each with its own
   loss; the KL forms and defaults follow the KD and CWD recipes the paper compares with: choice),
   KL_bi = KL(softmax_C(t_sp[b,:,i] / tau_s) || softmax_C(S[b,:,i] / tau_s)),
   P_bc = softmax_N(t_ch[b,c,:] / tau_c + log w_b),   Q_bc = softmax_N(S[b,c,:] / tau_c + log w_b):
       L_sp = tau_s^2 sum_{b,i} w_bi KL_bi / sum_{b,i} w_bi      (multiply: the mean over B H W)
       L_ch = tau_c^2 / (C * images that keep a pixel) sum_{b,c} KL(P_bc || Q_bc)   (multiply: / (B C))
       L_FCKD = lambda_s L_sp + lambda_c L_ch        defaults tau_s=1, lambda_s=1, tau_c=4, lambda_c=3
   An image (or a batch) in which M keeps no pixel adds 0 and sends no gradient (and FCKDLoss
   warns once, the first time a whole batch keeps none).

FCKDLoss's defaults (choice): hard M at threshold 0.7, apply "mask", gamma 0 (no soft
enhancement; similarity "cosine" and temperature 0.1 apply once gamma > 0). They were set from
validation results, among candidates named before the runs: the evidence is in docs/results.md,
and how the readings came to be in docs/method.md. Revision 1 of the spec is exactly
apply="multiply", similarity="dot", gamma=1.0.

Special cases: with condense="none", gamma=0, L_sp is pixel-wise KD (Hinton, per pixel) and L_ch
is channel-wise distillation (CWD, Shu et al., ICCV 2021); spatial_kd and channel_kd below are
those two baselines.
"""

import math
import numbers
import warnings

import torch
import torch.nn.functional as F

CONDENSE_MODES = ("hard", "soft", "none", "quantile")
APPLY_MODES = ("multiply", "mask")
SIMILARITIES = ("dot", "cosine")
ENHANCE_DIMS = ("spatial", "channel")
# Defaults of the choices that the spec leaves to validation evidence (docs/results.md).
DEFAULT_THRESHOLD = 0.7
DEFAULT_KEEP = 0.8  # used by condense="quantile" only
DEFAULT_APPLY = "mask"
DEFAULT_SIMILARITY = "cosine"
DEFAULT_TEMPERATURE = 0.1
DEFAULT_GAMMA = 0.0  # no soft enhancement; gamma > 0 enhances

# Largest block of spatial attention scores (batch x query pixels x N) asked for at once: 64 MB
# in float32. Where scaled_dot_product_attention has no fused kernel for its inputs (which depends
# on the device, dtype, mask and torch build) it falls back to a math path that stores every
# score it is asked for, N x N per image at once; fed the queries in blocks, it stores a few
# blocks' worth at most.
_ATTENTION_BLOCK = 2 ** 24
# Ties at the k-th smallest entropy are kept; beyond this share of an image, FCKDLoss says so.
_TIE_SLACK = 0.05


def _check_4d(x, name):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty 4-D tensor B x C x H x W, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating-point logits, got dtype {x.dtype}")


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_number(value, name, rule, holds):
    """TypeError unless value is a real number (a bool is a mistake here, not 0 or 1), ValueError
    unless holds(value); both messages name the argument, the rule and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {rule}, got {value!r}")
    if not holds(value):  # NaN fails every comparison, so it lands here too
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _check_nonnegative(value, name):
    _check_number(value, name, "a finite number >= 0", lambda v: 0 <= v < math.inf)


def _check_positive(value, name):
    _check_number(value, name, "a finite number > 0", lambda v: 0 < v < math.inf)


def _check_threshold(threshold):
    _check_number(threshold, "threshold", "a number in [0, 1]", lambda v: 0 <= v <= 1)


def _check_keep(keep):
    _check_number(keep, "keep", "a number in (0, 1]", lambda v: 0 < v <= 1)


def _check_downsample(downsample):
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample must be an int >= 1, got {downsample!r}")


def _prepare(student_logits, teacher_logits, downsample=1):
    """Validate a student/teacher pair and return both as float32 at the teacher's size.

    The teacher is detached; the student is resized bilinearly (align_corners=False) when its
    spatial size differs from the teacher's, with antialias where it is larger in either
    dimension. downsample K > 1: both are instead average-pooled (adaptive_avg_pool2d) to
    ceil(H / K) x ceil(W / K) of the teacher's H x W.
    """
    _check_4d(student_logits, "student_logits")
    _check_4d(teacher_logits, "teacher_logits")
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape[:2] != t_shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch size and classes (B x C), "
            f"got student {s_shape} and teacher {t_shape}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student logits are on {student_logits.device}, teacher logits on "
                         f"{teacher_logits.device}: put both on one device")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    with _float32_only(student):
        if downsample > 1:
            size = tuple(-(-side // downsample) for side in t_shape[2:])
            student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
        elif s_shape[2:] != t_shape[2:]:
            # Shrinking without antialias reads 2 x 2 student pixels per output pixel: at 8x the
            # teacher's size most student pixels would get no gradient at all.
            larger = s_shape[2] > t_shape[2] or s_shape[3] > t_shape[3]
            student = F.interpolate(student, size=t_shape[2:], mode="bilinear", align_corners=False,
                                    antialias=larger)
    return student, teacher


def _float32_only(x):
    """Autocast off: under bf16/fp16 autocast matmul and attention would silently drop to half precision."""
    return torch.autocast(x.device.type, enabled=False)


def _log_weights(weights):
    """log w, with log 0 taken as the most negative float32 instead of -inf.

    Added to logits, it makes a pixel's softmax share exactly 0 (its exp underflows), so the
    pixel is absent, while every value and gradient stays finite, even in an image with no pixel
    kept, whose softmax is then uniform (and whose terms the losses drop).
    """
    return torch.where(weights > 0, weights.log(), torch.finfo(torch.float32).min)


def _kl_along(student, teacher, dim, tau, log_weights=None):
    """sum over `dim` of KL(softmax(teacher / tau + log w) || softmax(student / tau + log w)), one value per slice.

    Where p = 0 (a pixel of weight 0) the term is 0 * (finite) = 0, with zero gradient.
    """
    teacher, student = teacher / tau, student / tau
    if log_weights is not None:
        teacher, student = teacher + log_weights, student + log_weights
    log_p = F.log_softmax(teacher, dim=dim)
    log_q = F.log_softmax(student, dim=dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim)


def _spatial_loss(student, teacher, tau, weights=None):
    """tau^2 * the w-weighted mean over pixels of KL over classes; w = 1 (None): the plain mean.

    weights: B x 1 x H x W. With all w = 0 the loss is 0 (the denominator is clamped, the
    numerator is 0), never NaN.
    """
    kl = _kl_along(student, teacher, dim=1, tau=tau)  # B x H x W
    if weights is None:
        return tau * tau * kl.mean()
    weights = weights[:, 0]
    return tau * tau * (weights * kl).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def _channel_loss(student, teacher, tau, weights=None):
    """tau^2 * the mean over (image, channel) of KL over pixels; w = 1 (None): every image counts.

    With weights (B x 1 x H x W) each softmax over pixels gets + log w, and images that keep no
    pixel are left out of the sum and of the count.
    """
    student, teacher = student.flatten(2), teacher.flatten(2)  # B x C x N
    if weights is None:
        return tau * tau * _kl_along(student, teacher, dim=2, tau=tau).mean()
    weights = weights.flatten(2)  # B x 1 x N
    kl = _kl_along(student, teacher, dim=2, tau=tau, log_weights=_log_weights(weights))  # B x C
    keeps_a_pixel = (weights.sum(2) > 0).float()  # B x 1
    counted = (keeps_a_pixel.sum() * kl.shape[1]).clamp_min(1.0)
    return tau * tau * (kl * keeps_a_pixel).sum() / counted


def pixel_entropy(logits):
    """Normalised pixel entropy Hn = -sum_c p_c log p_c / log C of p = softmax_C(logits), 0 log 0 = 0.

    logits: B x C x H x W (C >= 2). Returns B x 1 x H x W in [0, 1], float32. Finite wherever a
    pixel has a finite logit and none at +inf: log p comes from log_softmax, and a class with
    p = 0 (a logit of -inf, or one that underflows) adds 0, not 0 * -inf.
    """
    _check_4d(logits, "logits")
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"pixel_entropy needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(1, keepdim=True)
    # Rounding can push the ratio a hair outside [0, 1]; the matrix built from it must not.
    return (entropy / math.log(num_classes)).clamp_(0.0, 1.0)


def _finite_pixels(logits):
    """B x 1 x H x W: True where every class logit of the pixel is finite."""
    return torch.isfinite(logits).all(1, keepdim=True)


def _quantile_count(finite_counts, keep):
    """k = ceil(keep * n) for each image's count n of finite pixels (a long tensor like the counts).

    In float64 and a relative 1e-12 below: ceil(0.7 * 10) is 7, not float rounding's 8.
    """
    return torch.ceil(finite_counts.double() * keep * (1 - 1e-12)).long()


def _lowest_fraction(entropy, finite, keep):
    """B x 1 x H x W bool: per image, the pixels whose Hn is at most the k-th smallest Hn of its
    finite pixels, k = ceil(keep * finite pixels). One sort per image, no host sync."""
    flat = torch.where(finite, entropy, math.inf).flatten(1)  # B x N; dropped pixels sort last
    k = _quantile_count(finite.flatten(1).sum(1, keepdim=True), keep).clamp(1, flat.shape[1])  # B x 1
    kth = flat.sort(1).values.gather(1, k - 1)  # B x 1
    return (flat <= kth).reshape(entropy.shape) & finite


def condensation_matrix(teacher_logits, mode="hard", threshold=DEFAULT_THRESHOLD, keep=DEFAULT_KEEP):
    """Feature condensation matrix M (B x 1 x H x W, no gradient) from the teacher's entropy Hn.

    hard: M = 1 where Hn <= threshold, else 0.   soft: M = 1 - Hn.   none: M = 1.
    quantile: per image, M = 1 on its pixels with Hn <= its k-th smallest Hn, k = ceil(keep H W)
    (ties at that value are kept, so mean(M) can exceed keep: by a lot for a uniform or saturated
    teacher, which FCKDLoss warns about).
    A pixel with a non-finite teacher logit has no usable knowledge: M = 0 there in every mode
    (and it does not count in H W).
    """
    _check_choice(mode, CONDENSE_MODES, "condensation mode")
    _check_threshold(threshold)
    _check_keep(keep)
    with torch.no_grad():
        finite = _finite_pixels(teacher_logits.detach())
        entropy = pixel_entropy(torch.where(finite, teacher_logits.detach(), 0.0))
        if mode == "hard":
            matrix = (entropy <= threshold).float()
        elif mode == "soft":
            matrix = 1.0 - entropy
        elif mode == "quantile":
            matrix = _lowest_fraction(entropy, finite, keep).float()
        else:
            matrix = torch.ones_like(entropy)
        return matrix * finite


def _spatial_attention(x, similarity, temperature, weights):
    """E_sp(X)[:, i] = sum_j softmax_j(score(x_i, x_j) + log w_j) x_j over the H W pixels.

    Runs as one-head scaled_dot_product_attention with q = k = X^T (unit rows for cosine),
    v = X^T and log w as a float mask added to every query's scores, one block of query pixels
    at a time, so that no more than _ATTENTION_BLOCK scores exist at once and the N x N matrix is
    never stored. C is zero-padded to a multiple of 8 (what the fused GPU kernels want); zero
    columns change neither the dot products nor the norms, and the scale is passed explicitly.
    """
    batch, channels, height, width = x.shape
    pixels = height * width
    values = x.flatten(2).transpose(1, 2)  # B x N x C
    if similarity == "cosine":
        keys, scale = F.normalize(values, dim=-1, eps=1e-12), 1.0 / temperature
    else:
        keys, scale = values, 1.0 / math.sqrt(channels)
    padded = -channels % 8
    keys, values = (F.pad(z, (0, padded)).unsqueeze(1) for z in (keys, values))  # one head: B x 1 x N x C'
    mask = None if weights is None else _log_weights(weights.flatten(2)).unsqueeze(1)  # B x 1 x 1 x N
    rows = max(1, _ATTENTION_BLOCK // (batch * pixels))
    out = torch.cat([F.scaled_dot_product_attention(keys[:, :, start:start + rows], keys, values, attn_mask=mask,
                                                    scale=scale)
                     for start in range(0, pixels, rows)], dim=2)
    return out[:, 0, :, :channels].transpose(1, 2).reshape(batch, channels, height, width)


def _channel_attention(x, similarity, temperature, weights):
    """E_ch(X)[c] = sum_d softmax_d(score(X_c w, X_d w)) X_d over the C channel maps."""
    batch, channels, height, width = x.shape
    maps = x.flatten(2)  # B x C x N
    probes = maps if weights is None else maps * weights.flatten(2)
    if similarity == "cosine":
        probes = F.normalize(probes, dim=-1, eps=1e-12)
        scores = probes @ probes.transpose(1, 2) / temperature
    else:
        scores = probes @ probes.transpose(1, 2) / math.sqrt(height * width)
    return (torch.softmax(scores, dim=-1) @ maps).reshape(batch, channels, height, width)


def soft_enhance(x, dim, gamma=1.0, similarity=DEFAULT_SIMILARITY, temperature=DEFAULT_TEMPERATURE,
                 weights=None):
    """Parameter-free soft enhancement of teacher logits x (B x C x H x W, no gradient), step 4.

    dim="spatial": t_sp = (x + gamma E_sp(x)) / (1 + gamma), attention over the H W pixels.
    dim="channel": t_ch = (x + gamma E_ch(x)) / (1 + gamma), attention over the C channels.
    gamma = 0 returns x unchanged and computes no attention.
    similarity "dot": <u, v> / sqrt(len(u));  "cosine": <u, v> / (|u| |v| temperature).
    weights: the B x 1 x H x W matrix M of the mask reading (None: every pixel weighs 1); it
    enters the spatial softmax as + log w and the channel scores as maps X_c * w.
    Returns float32.
    """
    _check_4d(x, "x")
    _check_choice(dim, ENHANCE_DIMS, "enhancement dim")
    _check_choice(similarity, SIMILARITIES, "similarity")
    _check_nonnegative(gamma, "gamma")
    _check_positive(temperature, "temperature")
    if weights is not None and (weights.dim() != 4 or weights.shape[1] != 1 or weights.shape[0] != x.shape[0]
                                or weights.shape[2:] != x.shape[2:]):
        raise ValueError(f"weights must be B x 1 x H x W for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weights.shape)}")
    if weights is not None and weights.device != x.device:
        raise ValueError(f"x is on {x.device}, weights on {weights.device}: put both on one device")
    x = x.detach().float()
    weights = None if weights is None else weights.detach().float()
    with torch.no_grad(), _float32_only(x):
        if gamma == 0:
            return x.clone()
        attention = _spatial_attention if dim == "spatial" else _channel_attention
        return (x + gamma * attention(x, similarity, temperature, weights)) / (1.0 + gamma)


def spatial_kd(student_logits, teacher_logits, tau=1.0):
    """Pixel-wise KD (the KD baseline): tau^2 / (B H W) sum_i KL(softmax_C(t_i/tau) || softmax_C(s_i/tau))."""
    _check_positive(tau, "tau")
    student, teacher = _prepare(student_logits, teacher_logits)
    with _float32_only(student):
        return _spatial_loss(student, teacher, tau)


def channel_kd(student_logits, teacher_logits, tau=4.0):
    """Channel-wise distillation on logits (the CWD baseline, Shu et al. ICCV 2021):
    tau^2 / (B C) sum_{b,c} KL(softmax_N(t_bc/tau) || softmax_N(s_bc/tau)), softmax over the H W pixels."""
    _check_positive(tau, "tau")
    student, teacher = _prepare(student_logits, teacher_logits)
    with _float32_only(student):
        return _channel_loss(student, teacher, tau)


class FCKDLoss(torch.nn.Module):
    """L_FCKD = lambda_spatial * L_sp + lambda_channel * L_ch (see the module docstring).

    forward(student_logits, teacher_logits) returns a dict of scalar float32 tensors:
    loss (L_FCKD), spatial (L_sp), channel (L_ch), keep_ratio (mean of M, a diagnostic).
    gamma = 0 is no soft enhancement (and computes no attention); gamma > 0 enhances.
    No host-device synchronisation happens inside forward (on an accelerator; see _watch).
    downsample K > 1: distil at 1/K of the teacher's resolution, for logits already upsampled to
    the input (torchvision's segmentation models: use K = 8).
    """

    def __init__(self, *, condense="hard", threshold=DEFAULT_THRESHOLD, keep=DEFAULT_KEEP, apply=DEFAULT_APPLY,
                 similarity=DEFAULT_SIMILARITY, temperature=DEFAULT_TEMPERATURE, gamma=DEFAULT_GAMMA,
                 tau_spatial=1.0, tau_channel=4.0, lambda_spatial=1.0, lambda_channel=3.0, downsample=1):
        super().__init__()
        _check_choice(condense, CONDENSE_MODES, "condense")
        _check_threshold(threshold)
        _check_keep(keep)
        _check_choice(apply, APPLY_MODES, "apply")
        _check_choice(similarity, SIMILARITIES, "similarity")
        _check_positive(temperature, "temperature")
        _check_nonnegative(gamma, "gamma")
        _check_positive(tau_spatial, "tau_spatial")
        _check_positive(tau_channel, "tau_channel")
        _check_nonnegative(lambda_spatial, "lambda_spatial")
        _check_nonnegative(lambda_channel, "lambda_channel")
        _check_downsample(downsample)
        self.condense, self.threshold, self.keep, self.apply = condense, threshold, keep, apply
        self.similarity, self.temperature, self.gamma = similarity, temperature, gamma
        self.tau_spatial, self.tau_channel = tau_spatial, tau_channel
        self.lambda_spatial, self.lambda_channel = lambda_spatial, lambda_channel
        self.downsample = downsample
        # only quantile condensation has ties to warn about
        self._warned_empty, self._warned_ties, self._pending = False, condense != "quantile", None

    def forward(self, student_logits, teacher_logits):
        student, teacher = _prepare(student_logits, teacher_logits, self.downsample)
        with _float32_only(student):
            keep = condensation_matrix(teacher, self.condense, self.threshold, self.keep)
            finite = _finite_pixels(teacher)
            self._watch(keep, finite)
            # dropped by M already; zeroed so that no NaN or inf reaches the attention or a product with 0
            teacher = torch.where(finite, teacher, 0.0)
            if self.apply == "mask":
                weights = keep
            else:
                teacher, student, weights = keep * teacher, keep * student, None
            teacher_spatial = teacher_channel = teacher
            if self.gamma > 0:  # gamma 0: t_sp = t_ch = X exactly, no attention to compute
                options = dict(gamma=self.gamma, similarity=self.similarity, temperature=self.temperature,
                               weights=weights)
                teacher_spatial = soft_enhance(teacher, "spatial", **options)
                teacher_channel = soft_enhance(teacher, "channel", **options)
            spatial = _spatial_loss(student, teacher_spatial, self.tau_spatial, weights)
            channel = _channel_loss(student, teacher_channel, self.tau_channel, weights)
            loss = self.lambda_spatial * spatial + self.lambda_channel * channel
        return {"loss": loss, "spatial": spatial, "channel": channel, "keep_ratio": keep.mean()}

    def _watch(self, keep, finite):
        """Warn once when a whole batch keeps no pixel (its loss is then 0), and once when, under
        condense="quantile", ties make an image keep more than _TIE_SLACK of its pixels beyond
        k = ceil(keep n) (so more than keep + _TIE_SLACK of them).

        Two numbers per batch: the pixels kept, and the largest share of an image's finite pixels
        kept beyond k = ceil(keep n). They are read without waiting for the device: on CPU at
        once; elsewhere a copy is started and read at a later call, once it has landed (so a
        warning comes a batch or so late).
        """
        if self._warned_empty and self._warned_ties:
            return
        excess = keep.new_zeros(())
        if not self._warned_ties:
            counts = finite.flatten(1).sum(1)  # finite pixels per image
            beyond_k = keep.flatten(1).sum(1) - _quantile_count(counts, self.keep)
            excess = (beyond_k / counts.clamp_min(1)).max()
        stats = torch.stack([keep.sum(), excess.float()])
        if stats.device.type == "cpu":
            landed = [stats]
        else:
            landed = []
            if self._pending is not None and self._pending[1].query():
                landed.append(self._pending[0])
                self._pending = None
            if self._pending is None:
                event = torch.Event(device=stats.device)
                self._pending = (stats.to("cpu", non_blocking=True), event)
                event.record()
        for kept, excess in (s.tolist() for s in landed):
            if kept == 0 and not self._warned_empty:
                self._warned_empty = True
                setting = f"condense={self.condense!r}"
                if self.condense == "hard":
                    setting += f", threshold={self.threshold}"
                warnings.warn(
                    f"FCKDLoss ({setting}): the condensation matrix kept no pixel of a whole batch, so its "
                    "distillation loss is 0; the teacher is uncertain everywhere (untrained?). A higher threshold, "
                    "or condense='quantile', keeps pixels.", RuntimeWarning, stacklevel=2)
            if excess > _TIE_SLACK and not self._warned_ties:
                self._warned_ties = True
                warnings.warn(
                    f"FCKDLoss (condense='quantile', keep={self.keep}): ties in the teacher's entropy made an image "
                    f"keep {excess:.0%} of its pixels beyond its keep share: every pixel tied at the k-th smallest "
                    "entropy is kept, so a uniform or saturated teacher keeps most or all of its pixels.",
                    RuntimeWarning, stacklevel=2)

    def extra_repr(self):
        return (f"condense={self.condense!r}, threshold={self.threshold}, keep={self.keep}, apply={self.apply!r}, "
                f"similarity={self.similarity!r}, temperature={self.temperature}, gamma={self.gamma}, "
                f"tau_spatial={self.tau_spatial}, tau_channel={self.tau_channel}, "
                f"lambda_spatial={self.lambda_spatial}, lambda_channel={self.lambda_channel}, "
                f"downsample={self.downsample}")
