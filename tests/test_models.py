import math
import re

import pytest
import torch
import torch.nn as nn
import torchvision

from models import MODEL_NAMES, BasicBlock, Bottleneck, ResNet, build_model, load_backbone
from run import CHECKPOINT_KEYS, model_from_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = 0.125  # width multiplier for CPU tests: 8 base channels
ZOO = ("deeplabv3_wide_resnet50_2", "deeplabv3_mobilenet_v2", "deeplabv3_mobilenet_v3_large")
# the width each model is tested at: wide_resnet50_2 has no width multiplier, the MobileNets' width_mult is one
TEST_WIDTH = {name: 1.0 if name == "deeplabv3_wide_resnet50_2" else SMALL for name in MODEL_NAMES}
# the head width at the test width: 128 (students) or 256 (teachers), scaled by it
TEST_HEAD = {"deeplabv3_resnet18": 16, "deeplabv3_resnet34": 16, "deeplabv3_resnet50": 32, "deeplabv3_resnet101": 32,
             "deeplabv3_wide_resnet50_2": 256, "deeplabv3_mobilenet_v2": 16, "deeplabv3_mobilenet_v3_large": 16}


def image_size(name, height, width):
    """(height, width) of a test image, a quarter as high and wide (and odd) for the 85 M-parameter
    wide_resnet50_2."""
    return (height // 4 | 1, width // 4 | 1) if name == "deeplabv3_wide_resnet50_2" else (height, width)


@pytest.fixture(scope="module")
def built():
    """build(name, output_stride=8) -> a model (5 classes, test width) with a copy of the weights
    drawn once per module at seed 0. The copy goes into a model built on the meta device, which
    skips the init: wide_resnet50_2's takes about a second, the copy a third of that."""
    states = {}

    def build(name, output_stride=8):
        options = dict(width=TEST_WIDTH[name], output_stride=output_stride)
        if (name, output_stride) not in states:
            torch.manual_seed(0)
            states[name, output_stride] = build_model(name, 5, **options).state_dict()
        with torch.device("meta"):
            model = build_model(name, 5, **options)
        model.load_state_dict({k: v.clone() for k, v in states[name, output_stride].items()}, assign=True)
        return model
    return build


def randomise_batchnorm(model):
    """Non-trivial BN statistics and affine weights, so that eval mode tests them too."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


# -----------------------------------------------------------------------------
# torchvision's published ResNet layout, written down independently of models.py

TORCHVISION_RESNETS = {  # depth -> (blocks per stage, bottleneck?)
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
# parameter counts torchvision publishes for its ImageNet models (fc included)
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


def batchnorm_keys(prefix, channels):
    shapes = {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def torchvision_layout(depth):
    """key -> shape of torchvision.models.resnet{depth}().state_dict() without fc.*"""
    blocks, bottleneck = TORCHVISION_RESNETS[depth]
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": (64, 3, 7, 7), **batchnorm_keys("bn1", 64)}
    in_channels = 64
    for stage, num_blocks in enumerate(blocks):
        planes = 64 * 2 ** stage
        for b in range(num_blocks):
            prefix = f"layer{stage + 1}.{b}"
            if bottleneck:
                convs = [(planes, in_channels, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            else:
                convs = [(planes, in_channels, 3, 3), (planes, planes, 3, 3)]
            for j, shape in enumerate(convs, 1):
                shapes[f"{prefix}.conv{j}.weight"] = shape
                shapes.update(batchnorm_keys(f"{prefix}.bn{j}", shape[0]))
            if b == 0 and (stage > 0 or in_channels != planes * expansion):
                shapes[f"{prefix}.downsample.0.weight"] = (planes * expansion, in_channels, 1, 1)
                shapes.update(batchnorm_keys(f"{prefix}.downsample.1", planes * expansion))
            in_channels = planes * expansion
    return shapes


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_backbone_layout_matches_torchvision(depth):
    with torch.device("meta"):  # full width, no memory or init cost
        model = build_model(f"deeplabv3_resnet{depth}", 19)
    state = model.backbone.state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == torchvision_layout(depth)
    fc_params = (2048 if depth >= 50 else 512) * 1000 + 1000
    params = sum(p.numel() for p in model.backbone.parameters())
    assert params == TORCHVISION_PARAMS[depth] - fc_params
    # the backbone's keys sit under "backbone." in the full model, nothing else is in there
    full = {k[len("backbone."):] for k in model.state_dict() if k.startswith("backbone.")}
    assert full == set(state)
    with torch.device("meta"):  # and torchvision's own net has the same keys and shapes
        reference = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    assert got == {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilation_follows_torchvision(depth, output_stride):
    """replace_stride_with_dilation: a dilated layer's first block keeps the previous dilation."""
    expected = {  # (layer, first block?) -> (stride, dilation) of its 3x3 convs
        8: {(2, True): (2, 1), (2, False): (1, 1), (3, True): (1, 1), (3, False): (1, 2),
            (4, True): (1, 2), (4, False): (1, 4)},
        16: {(2, True): (2, 1), (2, False): (1, 1), (3, True): (2, 1), (3, False): (1, 1),
             (4, True): (1, 1), (4, False): (1, 2)},
    }[output_stride]
    model = build_model(f"deeplabv3_resnet{depth}", 3, width=SMALL, output_stride=output_stride)
    for layer_index in (2, 3, 4):
        for b, block in enumerate(getattr(model.backbone, f"layer{layer_index}")):
            stride, dilation = expected[(layer_index, b == 0)]
            convs3x3 = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
            assert len(convs3x3) == (2 if depth < 50 else 1)
            assert convs3x3[0].stride == (stride, stride)
            for conv in convs3x3:
                assert conv.dilation == (dilation, dilation)
                assert conv.padding == (dilation, dilation)


# -----------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes(built, name, output_stride):
    model = built(name, output_stride)
    head = model.classifier.in_channels
    assert head == TEST_HEAD[name]
    height, width = image_size(name, 65, 97)
    h, w = math.ceil(height / output_stride), math.ceil(width / output_stride)
    # the aux head reads layer3 in a ResNet (at the output stride), the first block at stride 8 in a MobileNet
    aux_stride = 8 if "mobilenet" in name else output_stride
    x = torch.randn(2, 3, height, width)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out", "feat"}
    assert out["out"].shape == (2, 5, h, w)
    assert out["feat"].shape == (2, head, h, w)
    model.train()
    out = model(x)
    assert set(out) == {"out", "feat", "aux"}
    assert out["out"].shape == (2, 5, h, w)
    assert out["aux"].shape == (2, 5, math.ceil(height / aux_stride), math.ceil(width / aux_stride))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_aux_false_has_no_aux_head():
    model = build_model("deeplabv3_resnet18", 4, width=SMALL, aux=False).train()
    assert set(model(torch.randn(2, 3, 33, 33))) == {"out", "feat"}
    assert not any(k.startswith("aux_head.") for k in model.state_dict())
    with_aux = build_model("deeplabv3_resnet18", 4, width=SMALL)
    assert any(k.startswith("aux_head.") for k in with_aux.state_dict())


@pytest.mark.parametrize("name", ("deeplabv3_resnet18",) + ZOO)
def test_train_with_batch_of_one(built, name):
    """The image-pooling branch sees one value per channel with one image: BatchNorm would raise."""
    model = built(name).train()
    out = model(torch.randn(1, 3, *image_size(name, 41, 41)))
    (out["out"].mean() + 0.4 * out["aux"].mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in model.parameters())
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ("deeplabv3_resnet18",) + ZOO)
def test_channels_last_and_bf16_autocast(built, name):
    model = built(name).eval()
    x = torch.randn(2, 3, *image_size(name, 49, 63))
    with torch.no_grad():
        reference = model(x)["out"]
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_cl)["out"], reference, rtol=1e-4, atol=1e-4)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_cl)
    assert out["out"].dtype == torch.bfloat16
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    (out["out"].float().mean() + out["aux"].float().mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large"])
def test_sync_batchnorm_conversion(built, name):
    model = built(name)
    keys = list(model.state_dict())
    num_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert num_bn > 0
    assert sum(type(m) is nn.SyncBatchNorm for m in converted.modules()) == num_bn
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert list(converted.state_dict()) == keys


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "deeplabv3_resnet101"])
def test_init(name):
    model = build_model(name, 3, width=0.25)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    last_bns = {id(b.bn2 if isinstance(b, BasicBlock) else b.bn3) for b in blocks}
    assert len(last_bns) == (8 if name == "deeplabv3_resnet18" else 33)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            assert torch.all(m.weight == (0 if id(m) in last_bns else 1)) and torch.all(m.bias == 0)
    block = model.backbone.layer2[1]  # zero-init residual: a block without downsample starts as relu(x)
    block.eval()
    x = torch.randn(2, block.conv1.in_channels, 5, 5)
    assert torch.equal(block(x), torch.relu(x))
    conv = model.backbone.layer3[1].conv2  # 64 x 64 x 3 x 3, Kaiming fan_out: std sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)
    assert torch.all(model.classifier.bias == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="deeplabv3_resnet152"), "unknown model"),
    (dict(output_stride=32), "output_stride"),
    (dict(width=0), "width"),
    (dict(num_classes=0), "num_classes"),
    (dict(head_channels=0), "head_channels"),
    (dict(name="deeplabv3_wide_resnet50_2"), r"wide_resnet50_2 is built at width 1\.0 only .* got width 0\.125"),
])
def test_bad_options(kwargs, message):
    args = dict(name="deeplabv3_resnet18", num_classes=3, width=SMALL) | kwargs
    with pytest.raises(ValueError, match=message):
        build_model(args.pop("name"), args.pop("num_classes"), **args)


# -----------------------------------------------------------------------------
# loading torchvision-style backbone checkpoints

def random_backbone_state(depth, width):
    """A backbone state dict with every float tensor random, so a load is visible."""
    state = ResNet(depth, width).state_dict()
    generator = torch.Generator().manual_seed(depth)
    return {k: torch.rand(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in state.items()}


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "model"])
def test_load_pretrained_backbone(tmp_path, wrapping):
    state = random_backbone_state(18, 0.25)
    saved = dict(state)
    saved["fc.weight"], saved["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)
    if wrapping == "plain":  # torchvision's own old files have no num_batches_tracked
        saved = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    else:  # as saved by a training script around a DDP model
        saved = {wrapping: {"module." + k: v for k, v in saved.items()}, "epoch": 90}
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)

    model = build_model("deeplabv3_resnet18", 3, pretrained_backbone=str(path), width=0.25)
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    fresh = build_model("deeplabv3_resnet18", 3, width=0.25)
    assert not torch.equal(fresh.backbone.conv1.weight, state["conv1.weight"])


def test_load_errors(tmp_path):
    def load_file(obj, depth=18, width=0.25):
        path = tmp_path / "backbone.pth"
        torch.save(obj, path)
        load_backbone(ResNet(depth, width), path)

    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model("deeplabv3_resnet18", 3, pretrained_backbone=missing, width=0.25)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=re.escape(str(text)) + ".*not a readable torch checkpoint"):
        load_backbone(ResNet(18, 0.25), text)

    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_file(torch.zeros(3))

    with pytest.raises(ValueError, match=r"unexpected keys: .*layer1\.2\.conv1\.weight"):
        load_file(random_backbone_state(34, 0.25))  # resnet34 into resnet18

    state = random_backbone_state(18, 0.25)
    del state["layer4.1.bn2.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys: layer4\.1\.bn2\.weight"):
        load_file(state)

    with pytest.raises(ValueError, match=re.escape("conv1.weight (file (32, 3, 7, 7), model (16, 3, 7, 7))")):
        load_file(random_backbone_state(18, 0.5))  # width 0.5 into width 0.25


# -----------------------------------------------------------------------------
# against torchvision itself

@pytest.mark.parametrize("depth, dilate", [
    (18, (False, False, False)),
    (101, (False, False, False)),
    (101, (False, True, True)),  # output stride 8, as in build_model
])
def test_matches_torchvision(tmp_path, depth, dilate):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(replace_stride_with_dilation=list(dilate))
    randomise_batchnorm(reference)
    reference.eval()
    ours = ResNet(depth, replace_stride_with_dilation=dilate)
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")},
                         strict=True)
    ours.eval()
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(f"deeplabv3_resnet{depth}", 3, pretrained_backbone=path)
    for k, v in reference.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.backbone.state_dict()[k], v), k

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            y = layer(y)
            expected.append(y)
        for got, want in zip(ours(x), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# the backbones from torchvision's zoo

TORCHVISION_ARCH = {"deeplabv3_wide_resnet50_2": "wide_resnet50_2", "deeplabv3_mobilenet_v2": "mobilenet_v2",
                    "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large"}
# parameter counts torchvision publishes for these ImageNet models (classifier included), and the
# parameters of what the backbone leaves out: the classifier (wide_resnet50_2: fc 2048 -> 1000;
# mobilenet_v3_large: 960 -> 1280 -> 1000) and, for mobilenet_v2, also the 1x1 conv 320 -> 1280 + BN before it
ZOO_PARAMS = {"deeplabv3_wide_resnet50_2": 68_883_240, "deeplabv3_mobilenet_v2": 3_504_872,
              "deeplabv3_mobilenet_v3_large": 5_483_032}
LEFT_OUT_PARAMS = {"deeplabv3_wide_resnet50_2": 2048 * 1000 + 1000,
                   "deeplabv3_mobilenet_v2": 1280 * 1000 + 1000 + 320 * 1280 + 2 * 1280,
                   "deeplabv3_mobilenet_v3_large": 960 * 1280 + 1280 + 1280 * 1000 + 1000}
IGNORED = {"deeplabv3_wide_resnet50_2": ("fc.",), "deeplabv3_mobilenet_v2": ("classifier.", "features.18."),
           "deeplabv3_mobilenet_v3_large": ("classifier.",)}


def torchvision_net(name, width=1.0):
    """torchvision's own classification net behind a zoo model (no dilation: it changes no parameter)."""
    options = {} if name == "deeplabv3_wide_resnet50_2" else {"width_mult": width}
    return getattr(torchvision.models, TORCHVISION_ARCH[name])(**options)


def without_ignored(state, name):
    return {k: v for k, v in state.items() if not k.startswith(IGNORED[name])}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_parameter_counts_and_keys_are_torchvisions(name):
    with torch.device("meta"):
        model = build_model(name, 19)
        reference = torchvision_net(name)
    assert sum(p.numel() for p in reference.parameters()) == ZOO_PARAMS[name]
    assert sum(p.numel() for p in model.backbone.parameters()) == ZOO_PARAMS[name] - LEFT_OUT_PARAMS[name]
    got = {k: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in without_ignored(reference.state_dict(), name).items()}
    assert model.classifier.in_channels == (256 if name == "deeplabv3_wide_resnet50_2" else 128)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_backbone_is_torchvisions_net_with_its_init(name):
    """Built first by torchvision's own builder, so at the same seed the backbone is exactly a fresh
    torchvision net (wide_resnet50_2 with zero_init_residual, as models.py's ResNets); the head has
    models.py's init."""
    width = TEST_WIDTH[name]
    torch.manual_seed(3)
    model = build_model(name, 3, width=width)
    torch.manual_seed(3)
    if name == "deeplabv3_wide_resnet50_2":
        reference = torchvision.models.wide_resnet50_2(zero_init_residual=True)
        assert all(torch.all(block.bn3.weight == 0) for block in model.backbone.layer4)
    else:
        reference = torchvision_net(name, width)
    state = model.backbone.state_dict()
    for k, v in without_ignored(reference.state_dict(), name).items():
        assert torch.equal(state[k], v), k
    head = [model.aspp, model.head, model.classifier, model.aux_head]
    for m in (m for part in head for m in part.modules()):
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.classifier.bias == 0)


def depthwise_layout(features):
    """features index -> (stride, dilation) of its conv with a kernel over 1 (each block has one),
    checking that the padding keeps sizes."""
    layout = {}
    for i, block in enumerate(features):
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
        if convs:
            (conv,) = convs
            assert conv.padding[0] == conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
            layout[i] = (conv.stride[0], conv.dilation[0])
    return layout


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v2", "deeplabv3_mobilenet_v3_large"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_mobilenet_dilation(name, output_stride):
    """The strides of the stages past the output stride become dilation. MobileNetV2 follows CIRKD
    (its _nostride_dilate: the block that loses its stride keeps the previous dilation, as in
    torchvision's ResNets); MobileNetV3 at 16 is torchvision's dilated=True (whose first block of
    the last stage is at dilation 2 already), and at 8 that doubled, with the stage before dilated too."""
    last = 17 if name == "deeplabv3_mobilenet_v2" else 15  # the last block with a 3x3 or 5x5 conv
    strided = (0, 2, 4, 7, 14) if name == "deeplabv3_mobilenet_v2" else (0, 2, 4, 7, 13)
    expected = {i: (2 if i in strided else 1, 1) for i in range(last + 1)}
    c3, c4 = strided[-2], strided[-1]
    if output_stride == 8:
        expected |= {i: (1, 2) for i in range(c3, c4)} | {i: (1, 4) for i in range(c4, last + 1)}
        expected[c3] = (1, 1)
        if name == "deeplabv3_mobilenet_v2":
            expected[c4] = (1, 2)
    else:
        expected |= {i: (1, 2) for i in range(c4, last + 1)}
        if name == "deeplabv3_mobilenet_v2":
            expected[c4] = (1, 1)
    model = build_model(name, 3, width=SMALL, output_stride=output_stride)
    assert depthwise_layout(model.backbone.features) == expected


def test_mobilenet_v3_matches_torchvisions_segmentation_backbone():
    """At output stride 16, deeplabv3_mobilenet_v3_large's backbone is torchvision's own
    deeplabv3_mobilenet_v3_large's: the same dilation, the same features for ASPP and aux head."""
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=True).backbone
    randomise_batchnorm(reference)
    reference.eval()
    model = build_model("deeplabv3_mobilenet_v3_large", 3, output_stride=16)
    model.backbone.load_state_dict({f"features.{k}": v for k, v in reference.state_dict().items()}, strict=True)
    model.eval()
    x = torch.randn(1, 3, 67, 81)
    with torch.no_grad():
        expected = reference(x)
        aux, last = model.backbone(x)
    torch.testing.assert_close(aux, expected["aux"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, expected["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ("deeplabv3_resnet18",) + ZOO)
def test_checkpoint_round_trip(built, tmp_path, name):
    """What train.py saves, model_from_checkpoint (eval.py, a student's teacher) rebuilds: the same
    weights and the same outputs, here at output stride 16, which only the options record."""
    model = built(name, 16)
    randomise_batchnorm(model)
    options = {"width": TEST_WIDTH[name], "output_stride": 16, "head_channels": None}
    checkpoint = dict.fromkeys(CHECKPOINT_KEYS) | {"model": model.state_dict(), "num_classes": 5, "model_name": name,
                                                   "model_options": options}
    save_checkpoint(checkpoint, tmp_path / "last.pt")
    loaded, _ = model_from_checkpoint(tmp_path / "last.pt")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, *image_size(name, 45, 53))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x)["out"], model.eval()(x)["out"])


@pytest.mark.parametrize("name", ZOO)
def test_load_torchvision_imagenet_file(tmp_path, name):
    """torchvision's ImageNet file (a plain state dict with its classifier) loads into the backbone,
    every kept tensor equal; here a fresh torchvision net with random values stands in for it."""
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.rand(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in torchvision_net(name).state_dict().items()}
    path = tmp_path / f"{TORCHVISION_ARCH[name]}.pth"
    torch.save(state, path)
    model = build_model(name, 3, pretrained_backbone=path)
    loaded = model.backbone.state_dict()
    kept = without_ignored(state, name)
    assert set(loaded) == set(kept)
    for k, v in kept.items():
        assert torch.equal(loaded[k], v), k


def test_zoo_load_errors(built, tmp_path):
    """The ResNets' check, naming the file and every problem, for the zoo's backbones too."""
    def load_file(state, name, width=1.0):
        path = tmp_path / "backbone.pth"
        torch.save(state, path)
        backbone = built(name).backbone if width == TEST_WIDTH[name] else build_model(name, 3, width=width).backbone
        load_backbone(backbone, path)
        return path

    path = tmp_path / "backbone.pth"
    v3 = torchvision.models.mobilenet_v3_large().state_dict()
    message = (re.escape(f"{path} does not fit the mobilenet_v2 backbone at width 1.0 (expected torchvision's "
                         "mobilenet_v2 state dict, classifier.*, features.18.* ignored): ")
               + r"\d+ missing keys: .*; \d+ unexpected keys: .*features\.1\.block.*; \d+ shape mismatches: ")
    with pytest.raises(ValueError, match=message):
        load_file(v3, "deeplabv3_mobilenet_v2")  # a V3 file into V2

    half = torchvision.models.mobilenet_v3_large(width_mult=0.5).state_dict()
    with pytest.raises(ValueError, match=re.escape("features.0.0.weight (file (8, 3, 3, 3), model (16, 3, 3, 3))")):
        load_file(half, "deeplabv3_mobilenet_v3_large")  # width 0.5 into width 1.0

    del v3["features.16.1.running_var"]
    with pytest.raises(ValueError, match=r"1 missing keys: features\.16\.1\.running_var$"):
        load_file(v3, "deeplabv3_mobilenet_v3_large")

    resnet50 = {k: v for k, v in ResNet(50).state_dict().items()}  # torchvision's resnet50 layout
    with pytest.raises(ValueError, match=r"wide_resnet50_2 backbone .*fc\.\* ignored.* shape mismatches: "
                       + re.escape("layer1.0.conv1.weight (file (64, 64, 1, 1), model (128, 64, 1, 1))")):
        load_file(resnet50, "deeplabv3_wide_resnet50_2")
