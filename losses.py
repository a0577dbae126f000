"""
The distillation losses train.py trains with, one entry each in LOSSES: the --kd name, the
train.py flags the loss reads and the keyword arguments they become, and the builder of the
distillation term. train.py's --kd choices and loss flags, the resume check's unused flags and
bench/speed.py's modes all come from here.

    distill = distillation("cwd", {"tau_channel": 4.0, "lambda_channel": 3.0})
    distill(student_logits, teacher_logits)   # {"kd": 3 * CWD(s, t; tau 4)}

Adding a loss: its function in its own file (fckd.py holds FCKD, KD and CWD), its flags in FLAGS
(a flag may serve several losses), and one DistillationLoss in LOSSES.
"""

import inspect
from typing import Callable, NamedTuple

from fckd import APPLY_MODES, CONDENSE_MODES, SIMILARITIES, FCKDLoss, channel_kd, spatial_kd

# the loss defaults are FCKDLoss's; KD and CWD take FCKD's spatial and channel ones
FCKD_DEFAULTS = {name: p.default for name, p in inspect.signature(FCKDLoss).parameters.items()}

# train.py's loss flags: argparse dest -> (option, add_argument's keyword arguments)
FLAGS = {
    "fckd_condense": ("--fckd-condense", dict(choices=CONDENSE_MODES, default=FCKD_DEFAULTS["condense"],
                                              help="how FCKD's condensation matrix is built (default: %(default)s)")),
    "fckd_threshold": ("--fckd-threshold", dict(type=float, default=FCKD_DEFAULTS["threshold"],
                                                help="entropy threshold of the hard condensation (default: %(default)s)")),
    "fckd_keep": ("--fckd-keep", dict(type=float, default=FCKD_DEFAULTS["keep"],
                                      help="share of each image's lowest-entropy pixels the quantile condensation "
                                           "keeps (default: %(default)s)")),
    "fckd_apply": ("--fckd-apply", dict(choices=APPLY_MODES, default=FCKD_DEFAULTS["apply"],
                                        help="how the condensation matrix acts on both nets' logits "
                                             "(default: %(default)s)")),
    "fckd_similarity": ("--fckd-similarity", dict(choices=SIMILARITIES, default=FCKD_DEFAULTS["similarity"],
                                                  help="attention score of the soft enhancement, with --fckd-gamma > 0 "
                                                       "(default: %(default)s)")),
    "fckd_temperature": ("--fckd-temperature", dict(type=float, default=FCKD_DEFAULTS["temperature"],
                                                    help="temperature of the cosine similarity, with --fckd-gamma > 0 "
                                                         "(default: %(default)s)")),
    "fckd_gamma": ("--fckd-gamma", dict(type=float, default=FCKD_DEFAULTS["gamma"],
                                        help="soft enhancement weight; 0: no enhancement (default: %(default)s)")),
    "tau_spatial": ("--tau-spatial", dict(type=float, default=FCKD_DEFAULTS["tau_spatial"],
                                          help="temperature of the spatial loss, fckd and kd (default: %(default)s)")),
    "tau_channel": ("--tau-channel", dict(type=float, default=FCKD_DEFAULTS["tau_channel"],
                                          help="temperature of the channel loss, fckd and cwd (default: %(default)s)")),
    "lambda_spatial": ("--lambda-spatial", dict(type=float, default=FCKD_DEFAULTS["lambda_spatial"],
                                                help="weight of the spatial loss, fckd and kd (default: %(default)s)")),
    "lambda_channel": ("--lambda-channel", dict(type=float, default=FCKD_DEFAULTS["lambda_channel"],
                                                help="weight of the channel loss, fckd and cwd (default: %(default)s)")),
}
DEFAULT_FLAGS = {dest: options["default"] for dest, (_, options) in FLAGS.items()}


class DistillationLoss(NamedTuple):
    """One --kd choice. keywords: {train.py flag's dest: keyword argument of build}; build(**those)
    returns the distillation term, (student logits, teacher logits) -> {"kd": weighted loss, and
    diagnostics}; idle(flags): the flags among its own that a setting makes irrelevant."""
    keywords: dict
    build: Callable
    idle: Callable = lambda flags: set()


def fckd_term(**settings):
    """FCKDLoss(**settings), reporting its keep ratio beside the loss."""
    loss = FCKDLoss(**settings)

    def distill(student_logits, teacher_logits):
        parts = loss(student_logits, teacher_logits)
        return {"kd": parts["loss"], "keep_ratio": parts["keep_ratio"]}
    return distill


def kd_term(tau, weight):
    """weight * pixel-wise KD at temperature tau."""
    return lambda student_logits, teacher_logits: {"kd": weight * spatial_kd(student_logits, teacher_logits, tau)}


def cwd_term(tau, weight):
    """weight * channel-wise distillation (CWD) at temperature tau."""
    return lambda student_logits, teacher_logits: {"kd": weight * channel_kd(student_logits, teacher_logits, tau)}


LOSSES = {
    "fckd": DistillationLoss(
        {"fckd_condense": "condense", "fckd_threshold": "threshold", "fckd_keep": "keep", "fckd_apply": "apply",
         "fckd_similarity": "similarity", "fckd_temperature": "temperature", "fckd_gamma": "gamma",
         "tau_spatial": "tau_spatial", "tau_channel": "tau_channel", "lambda_spatial": "lambda_spatial",
         "lambda_channel": "lambda_channel"},
        fckd_term,
        # gamma 0 computes no attention; the threshold is the hard mode's, the keep the quantile's
        lambda flags: ({"fckd_similarity", "fckd_temperature"} if flags["fckd_gamma"] == 0 else set())
        | ({"fckd_threshold"} if flags["fckd_condense"] != "hard" else set())
        | ({"fckd_keep"} if flags["fckd_condense"] != "quantile" else set())),
    "kd": DistillationLoss({"tau_spatial": "tau", "lambda_spatial": "weight"}, kd_term),
    "cwd": DistillationLoss({"tau_channel": "tau", "lambda_channel": "weight"}, cwd_term),
}


def loss_entry(kd):
    """LOSSES[kd]; ValueError naming the known losses for any other name."""
    if kd not in LOSSES:
        raise ValueError(f"unknown distillation loss {kd!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[kd]


def loss_settings(kd, flags):
    """The keyword arguments of loss `kd`'s builder, from `flags` ({dest: value}, e.g. vars(args))."""
    return {keyword: flags[dest] for dest, keyword in loss_entry(kd).keywords.items()}


def distillation(kd, flags):
    """The distillation term of loss `kd` with the values of `flags` ({dest: value})."""
    return loss_entry(kd).build(**loss_settings(kd, flags))


def unused_flags(kd, flags):
    """The loss flags that a run with --kd `kd` (None: no teacher) and these `flags` does not use:
    they do not change what it trains."""
    if kd is None:
        return set(FLAGS)
    entry = loss_entry(kd)
    return (set(FLAGS) - set(entry.keywords)) | entry.idle(flags)


def add_loss_flags(parser):
    """--kd (one choice per entry of LOSSES) and every loss flag of FLAGS."""
    parser.add_argument("--kd", choices=tuple(LOSSES), help="distillation loss (default: fckd with a teacher)")
    for dest, (option, options) in FLAGS.items():
        parser.add_argument(option, dest=dest, **options)
