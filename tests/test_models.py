import math
import re

import pytest
import torch
import torch.nn as nn

from models import MODEL_NAMES, BasicBlock, Bottleneck, ResNet, build_model, load_backbone

torch.set_num_threads(2)
SMALL = 0.125  # width multiplier for CPU tests: 8 base channels


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
def test_output_shapes(name, output_stride):
    torch.manual_seed(0)
    model = build_model(name, 5, width=SMALL, output_stride=output_stride)
    head = model.classifier.in_channels
    assert head == (16 if name.endswith(("18", "34")) else 32)  # 128 / 256 scaled by 1/8
    h, w = math.ceil(65 / output_stride), math.ceil(97 / output_stride)
    x = torch.randn(2, 3, 65, 97)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out", "feat"}
    assert out["out"].shape == (2, 5, h, w)
    assert out["feat"].shape == (2, head, h, w)
    model.train()
    out = model(x)
    assert set(out) == {"out", "feat", "aux"}
    assert out["out"].shape == (2, 5, h, w) and out["aux"].shape == (2, 5, h, w)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_aux_false_has_no_aux_head():
    model = build_model("deeplabv3_resnet18", 4, width=SMALL, aux=False).train()
    assert set(model(torch.randn(2, 3, 33, 33))) == {"out", "feat"}
    assert not any(k.startswith("aux_head.") for k in model.state_dict())
    with_aux = build_model("deeplabv3_resnet18", 4, width=SMALL)
    assert any(k.startswith("aux_head.") for k in with_aux.state_dict())


def test_train_with_batch_of_one():
    """The image-pooling branch sees one value per channel with one image: BatchNorm would raise."""
    model = build_model("deeplabv3_resnet18", 3, width=SMALL).train()
    out = model(torch.randn(1, 3, 41, 41))
    (out["out"].mean() + 0.4 * out["aux"].mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in model.parameters())
    assert all(torch.isfinite(g).all() for g in grads)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 3, width=SMALL).eval()
    x = torch.randn(2, 3, 49, 63)
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


def test_sync_batchnorm_conversion():
    model = build_model("deeplabv3_resnet50", 3, width=SMALL)
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
# against torchvision itself, where it is installed

@pytest.mark.parametrize("depth, dilate", [
    (18, (False, False, False)),
    (101, (False, False, False)),
    (101, (False, True, True)),  # output stride 8, as in build_model
])
def test_matches_torchvision(tmp_path, depth, dilate):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(replace_stride_with_dilation=list(dilate))
    with torch.no_grad():  # non-trivial BN statistics so that eval mode tests them too
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
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
