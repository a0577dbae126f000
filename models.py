"""
DeepLabV3 segmentation nets on dilated ResNets and on three nets of torchvision's zoo.

The ResNets are our own because torchvision's cannot do two things they need: dilation in
BasicBlock (a ResNet-18 at output stride 8) and a width multiplier (the small CPU models).
Otherwise they are torchvision's: at width=1.0 the backbone's state_dict() has exactly
torchvision's ResNet keys and shapes (minus fc.*), so its ImageNet checkpoints (resnet18-*.pth,
resnet101-*.pth) load as they are. wide_resnet50_2 (a teacher), mobilenet_v2 and
mobilenet_v3_large (students) are built by torchvision.models itself and dilated in place; their
ImageNet files load the same way.

    teacher: build_model("deeplabv3_resnet101", num_classes, "resnet101.pth")
    student: build_model("deeplabv3_resnet18", num_classes, "resnet18.pth")

model(x) returns {"out": logits at 1/output_stride of the input (NOT upsampled), "feat": the
feature before the classifier, "aux": FCN logits on a middle feature (training only): layer3 in
a ResNet, in a MobileNet the first block at output stride 8, where torchvision puts it}.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# model name -> head width at width 1.0: CIRKD's 256 for the teachers, 128 for the students
HEAD_WIDTHS = {
    "deeplabv3_resnet18": 128, "deeplabv3_resnet34": 128, "deeplabv3_resnet50": 256, "deeplabv3_resnet101": 256,
    "deeplabv3_wide_resnet50_2": 256, "deeplabv3_mobilenet_v2": 128, "deeplabv3_mobilenet_v3_large": 128,
}
MODEL_NAMES = tuple(HEAD_WIDTHS)

# depth -> (block type, blocks per stage), from torchvision's resnet18/34/50/101
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

# output stride -> (dilate layer2, layer3, layer4) and the ASPP rates that go with it
DILATIONS = {8: (False, True, True), 16: (False, False, True)}
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def conv3x3(in_channels, out_channels, stride=1, dilation=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def scaled(channels, width):
    """Channel count `channels` scaled by the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


# -----------------------------------------------------------------------------
# ResNet backbone (torchvision's v1.5 layout: the stride sits on the 3x3 conv of a Bottleneck)

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """
    torchvision's ResNet without avgpool/fc. forward(x) -> (layer1, layer2, layer3, layer4) outputs.
    arch, width and ignored (the keys of torchvision's file it has no use for) serve load_backbone.

    replace_stride_with_dilation[i] swaps the stride 2 of layer{i+2} for dilation, with
    torchvision's semantics: the first block of a dilated layer keeps the previous dilation and
    every later block uses the doubled one (so (False, True, True) gives layer3 dilation 2 and
    layer4 dilation 4: output stride 8).
    """

    ignored = ("fc.",)

    def __init__(self, depth, width=1.0, replace_stride_with_dilation=(False, False, False)):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"unknown ResNet depth {depth!r}; expected one of {sorted(RESNET_LAYOUTS)}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width!r}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs 3 entries (layer2, layer3, layer4), "
                             f"got {replace_stride_with_dilation!r}")
        kind, blocks_per_layer = RESNET_LAYOUTS[depth]
        self.depth, self.width, self.arch = depth, width, f"resnet{depth}"
        self.block = BasicBlock if kind == "basic" else Bottleneck
        base = scaled(64, width)
        self.in_channels = base
        self.dilation = 1

        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = (False,) + tuple(replace_stride_with_dilation)
        self.layer1 = self._make_layer(base, blocks_per_layer[0], stride=1, dilate=dilate[0])
        self.layer2 = self._make_layer(base * 2, blocks_per_layer[1], stride=2, dilate=dilate[1])
        self.layer3 = self._make_layer(base * 4, blocks_per_layer[2], stride=2, dilate=dilate[2])
        self.layer4 = self._make_layer(base * 8, blocks_per_layer[3], stride=2, dilate=dilate[3])
        self.channels = tuple(base * 2 ** i * self.block.expansion for i in range(4))  # per layer output

    def _make_layer(self, planes, num_blocks, stride, dilate):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_channels = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(conv1x1(self.in_channels, out_channels, stride),
                                       nn.BatchNorm2d(out_channels))
        blocks = [self.block(self.in_channels, planes, stride, previous_dilation, downsample)]
        self.in_channels = out_channels
        blocks += [self.block(out_channels, planes, 1, self.dilation) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


# -----------------------------------------------------------------------------
# DeepLabV3 head

def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv, norm, ReLU, broadcast back."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        # Not BatchNorm: on the 1 x 1 pooled map a batch of one image has a single value per
        # channel, and BatchNorm in training raises on it (CIRKD crashes there with one image per
        # GPU). GroupNorm with one group normalises each image over its channels instead: it needs
        # no batch, has no running statistics (same in train and eval), works for any channel
        # count, and SyncBatchNorm conversion leaves it alone, as it needs nothing from other GPUs.
        self.norm = nn.GroupNorm(1, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = self.relu(self.norm(self.conv(F.adaptive_avg_pool2d(x, 1))))
        return y.expand(-1, -1, h, w)  # bilinear upsampling of a 1 x 1 map is this broadcast


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches, image pooling,
    concatenated and projected back to out_channels by a 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels, out_channels, rates):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv_bn_relu(in_channels, out_channels, 3, dilation=rate) for rate in rates]
            + [ImagePooling(in_channels, out_channels)]
        )
        self.project = conv_bn_relu(out_channels * len(self.branches), out_channels, 1)

    def forward(self, x):
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class FCNHead(nn.Module):
    """Auxiliary head (torchvision's FCNHead): 3x3 conv-BN-ReLU to in/4 channels,
    dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        hidden = max(1, in_channels // 4)
        self.block = conv_bn_relu(in_channels, hidden, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.dropout(self.block(x)))


class DeepLabV3(nn.Module):
    """
    backbone -> ASPP -> 3x3 conv-BN-ReLU ("feat") -> dropout 0.1 -> 1x1 classifier ("out"),
    plus an FCN head on a middle feature ("aux", training only). Nothing is upsampled: the losses
    work at the head's resolution (1/output_stride of the input) and the caller resizes as it needs.
    backbone(x) returns a tuple of features whose last two feed the aux head and the ASPP;
    backbone.channels holds their channel counts in the same order.
    """

    def __init__(self, backbone, num_classes, head_channels, aspp_rates, aux=True):
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.channels[-1], head_channels, aspp_rates)
        self.head = conv_bn_relu(head_channels, head_channels, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.aux_head = FCNHead(backbone.channels[-2], num_classes) if aux else None

    def forward(self, x):
        *_, middle, last = self.backbone(x)
        feat = self.head(self.aspp(last))
        result = {"out": self.classifier(self.dropout(feat)), "feat": feat}
        if self.training and self.aux_head is not None:
            result["aux"] = self.aux_head(middle)
        return result


def init_weights(model):
    """
    torchvision's ResNet init, for the head and models.py's own ResNet: Kaiming-normal (fan_out,
    ReLU) convs, norm weight 1 / bias 0, and the last BN of every residual branch at weight 0
    (torchvision's zero_init_residual, Goyal et al. 2017), so that each block starts as the
    identity. That last part matters only when training from scratch (ImageNet weights overwrite
    it); there it is what lets the bigger synthetic-set teacher pull ahead of the student within the
    quick-start budget (see README, "The synthetic set"). A backbone from torchvision's zoo keeps the
    init its torchvision builder gave it.
    """
    zoo = set() if isinstance(model.backbone, ResNet) else set(model.backbone.modules())
    for m in model.modules():  # in order, not over the set: the order decides the random draws
        if m in zoo:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
        elif isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


# -----------------------------------------------------------------------------
# backbones from torchvision's zoo, built by torchvision.models itself

class TorchvisionResNet(nn.Module):
    """
    A torchvision ResNet (here wide_resnet50_2) without avgpool and fc: its modules under their own
    names, so that state_dict() has torchvision's keys. forward(x) -> (layer3, layer4) outputs.
    """

    ignored = ("fc.",)

    def __init__(self, arch, net):
        super().__init__()
        self.arch, self.width = arch, 1.0
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (net.fc.in_features // 2, net.fc.in_features)  # layer3 has half layer4's channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)


class TorchvisionMobileNet(nn.Module):
    """
    torchvision's MobileNetV2 or V3 `features` (no pooling, no classifier), under their own name so
    that state_dict() has torchvision's keys. forward(x) -> (output of features[aux_index], last
    output). ignored: the keys of torchvision's file that are not in `features`.
    """

    def __init__(self, arch, width, features, aux_index, ignored):
        super().__init__()
        self.arch, self.width, self.ignored, self.aux_index = arch, width, ignored, aux_index
        self.features = features
        self.channels = (features[aux_index].out_channels, features[-1].out_channels)

    def forward(self, x):
        aux = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.aux_index:
                aux = x
        return aux, x


def dilate(net, output_stride):
    """
    Swap the strides that would take `net` past `output_stride` for dilation, in place, by
    torchvision's replace_stride_with_dilation rule: every conv has its dilation multiplied by the
    strides removed before it (its padding follows, so sizes are kept), and a conv that loses its
    stride counts only the earlier ones. For MobileNetV2 this is what CIRKD does (CSAIL's
    _nostride_dilate); on MobileNetV3 it multiplies the dilation torchvision's dilated=True set.
    It walks the convs in the order they run and assumes each downsampling is one strided conv, as
    in the MobileNets (not in a ResNet, whose downsample branch strides too).
    """
    stride, removed = 1, 1
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        dilation = conv.dilation[0] * removed
        if conv.stride[0] > 1:
            if stride * conv.stride[0] <= output_stride:
                stride *= conv.stride[0]
                continue
            removed *= conv.stride[0]
            conv.stride = (1, 1)
        if conv.kernel_size[0] > 1:
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation * (conv.kernel_size[0] - 1) // 2,) * 2


def torchvision_backbone(arch, width, output_stride):
    """
    wide_resnet50_2, mobilenet_v2 or mobilenet_v3_large from torchvision.models, with torchvision's
    own init, at `output_stride` 8 or 16. width: 1.0 for wide_resnet50_2 (torchvision's has no
    width multiplier); the MobileNets' width_mult.
    """
    if arch == "wide_resnet50_2":
        if width != 1:
            raise ValueError(f"deeplabv3_wide_resnet50_2 is built at width 1.0 only (torchvision's "
                             f"wide_resnet50_2 has no width multiplier), got width {width!r}")
        # zero_init_residual, as models.py's own ResNets (see init_weights)
        net = torchvision.models.wide_resnet50_2(replace_stride_with_dilation=list(DILATIONS[output_stride]),
                                                 zero_init_residual=True)
        return TorchvisionResNet(arch, net)
    if arch == "mobilenet_v2":
        # CIRKD's student: the features up to the last block (320 channels at width 1). The 1x1 conv
        # to 1280 channels after it (features.18) serves the classifier, and would quadruple the ASPP.
        features = torchvision.models.mobilenet_v2(width_mult=width).features[:-1]
        ignored = ("classifier.", "features.18.")
    else:
        # dilated=True, as in torchvision's segmentation models: the last stage at dilation 2 instead
        # of stride 2, so output stride 16; output stride 8 takes dilate() on the stage before it too.
        features = torchvision.models.mobilenet_v3_large(width_mult=width, dilated=True).features
        ignored = ("classifier.",)
    dilate(features, output_stride)
    # aux on features[4], the first block at output stride 8: where torchvision's
    # deeplabv3_mobilenet_v3_large puts its aux head ("C2", stage_indices[-4]); the same place on V2
    return TorchvisionMobileNet(arch, width, features, 4, ignored)


def build_backbone(name, width, output_stride):
    arch = name[len("deeplabv3_"):]
    if arch.startswith("resnet"):
        return ResNet(int(arch[len("resnet"):]), width, DILATIONS[output_stride])
    return torchvision_backbone(arch, width, output_stride)


# -----------------------------------------------------------------------------
# loading weights: torchvision's files here, train.py's checkpoints in utils.py, the same checks

def listing(names, shown=10):
    """'a, b, c ... and 7 more': the first `shown` names and how many are left out."""
    more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def require_file(path, what):
    """FileNotFoundError "{what} not found: {path}" unless path is a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def load_torch_file(path, what):
    """torch.load(path) onto the CPU with weights_only=True (a file of weights is data, never code).

    what names the file in the errors: FileNotFoundError "{what} not found: {path}", ValueError
    "{path} is not a readable {what} (the error torch.load raised)".
    """
    require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {e})") from e


def load_weights(module, state, mismatch, may_lack=()):
    """module.load_state_dict(state) if `state` has exactly module's keys and shapes; otherwise
    ValueError "{mismatch}: N missing keys: ...; N unexpected keys: ...; N shape mismatches: key
    (file shape, model shape), ...". may_lack: key endings that `state` may lack (torch fills them in).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(may_lack)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{len(keys)} {kind}: {listing(keys)}" for kind, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ValueError(f"{mismatch}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_backbone(backbone, path):
    """
    Load torchvision's state dict for backbone.arch (its ImageNet file) from `path` into
    `backbone`, strictly except for the keys under backbone.ignored (the classifier). The file may
    hold the state dict itself or wrap it under "state_dict" or "model"; a DDP "module." prefix is
    stripped. Anything else raises ValueError naming the file and every problem.
    """
    checkpoint = load_torch_file(path, "torch checkpoint of a pretrained backbone")
    state = checkpoint
    if isinstance(checkpoint, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(checkpoint.get(wrapper), dict):
                state = checkpoint[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (a plain dict, or one under "
                         f"'state_dict' or 'model'); found {type(state).__name__}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(backbone.ignored)}
    ignored = ", ".join(prefix + "*" for prefix in backbone.ignored)
    # old torchvision checkpoints predate BatchNorm's num_batches_tracked; torch fills it in
    load_weights(backbone, state, f"{path} does not fit the {backbone.arch} backbone at width {backbone.width} "
                 f"(expected torchvision's {backbone.arch} state dict, {ignored} ignored)",
                 may_lack=("num_batches_tracked",))


# -----------------------------------------------------------------------------

def build_model(name, num_classes, pretrained_backbone=None, *, width=1.0, output_stride=8,
                head_channels=None, aux=True):
    """
    DeepLabV3 on a dilated backbone. name: one of MODEL_NAMES. width scales every backbone width
    (64 * width base channels for the ResNets, the MobileNets' width_mult; wide_resnet50_2 takes
    1.0 only) and the default head width (HEAD_WIDTHS: 128 for the students, 256 for the
    teachers); an explicit head_channels is used as given. output_stride 8 dilates the last two
    stages (ResNets: layer3 by 2, layer4 by 4), ASPP rates 12/24/36; 16 dilates the last stage
    only, rates 6/12/18. pretrained_backbone: path to torchvision's state dict of the backbone
    (its ImageNet file, e.g. resnet18-f37072fd.pth, mobilenet_v2-b0353104.pth).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if output_stride not in DILATIONS:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if head_channels is None:
        head_channels = scaled(HEAD_WIDTHS[name], width)
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1:
        raise ValueError(f"head_channels must be a positive int or None, got {head_channels!r}")

    backbone = build_backbone(name, width, output_stride)  # first: a zoo net draws as torchvision's builder does
    model = DeepLabV3(backbone, num_classes, head_channels, ASPP_RATES[output_stride], aux)
    init_weights(model)
    if pretrained_backbone is not None:
        load_backbone(model.backbone, pretrained_backbone)
    return model
