"""Every backbone: feature shapes, channels and strides on odd-sized inputs, dilation, sizes, registry."""

import math

import pytest
import torch

from mtlfast.backbones import FPN, VGG16, MobileNetV2, ResNet, create_backbone, list_backbones

H, W = 33, 47


def small(name, **options):
    if name.startswith("hrnet"):  # HRNet-W18-small-v2 is one fixed configuration, small already
        return create_backbone(name, **options)
    if name != "vgg16":
        options.setdefault("width", 0.125)
    else:
        options.setdefault("width", 1 / 32)
    if name.startswith("fpn"):
        options.setdefault("fpn_channels", 8)
    return create_backbone(name, **options)


@pytest.mark.parametrize("name", list_backbones())
def test_features_match_channels_and_strides(name):
    model = small(name)
    x = torch.randn(2, 3, H, W, requires_grad=True)
    feats = model(x)
    assert isinstance(feats, (list, tuple)) and len(feats) == len(model.channels) == len(
        model.strides
    )
    for f, c, s in zip(feats, model.channels, model.strides):
        assert f.shape == (2, c, math.ceil(H / s), math.ceil(W / s))
    assert model.strides == sorted(model.strides)  # finest first
    sum(f.square().mean() for f in feats).backward()
    assert x.grad is not None and all(
        p.grad is not None for p in model.parameters() if p.requires_grad
    )


@pytest.mark.parametrize(
    "name", ["resnet18", "se_resnet26", "resnet50", "mobilenet_v2", "fpn_resnet18"]
)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_by_dilation(name, output_stride):
    model = small(name, output_stride=output_stride).eval()
    feats = model(torch.randn(1, 3, H, W))
    assert model.strides[-1] == output_stride
    assert feats[-1].shape[-2:] == (math.ceil(H / output_stride), math.ceil(W / output_stride))


def test_dilated_stages_keep_the_parameter_count():
    assert sum(p.numel() for p in ResNet(50, output_stride=8).parameters()) == 23_508_032


@pytest.mark.parametrize(
    "factory, params",
    [
        (lambda: ResNet(18), 11_176_512),  # torchvision resnet18 without fc: 11.69M - 0.51M
        (lambda: ResNet(50), 23_508_032),  # 25.56M - 2.05M
        (lambda: ResNet(101), 42_500_160),  # 44.55M - 2.05M
        (lambda: MobileNetV2(), 1_811_712),  # 3.50M - features.18 - classifier
    ],
)
def test_parameter_counts_match_torchvision(factory, params):
    assert sum(p.numel() for p in factory().parameters()) == params


def test_vgg16_is_deeplab_largefov():
    model = VGG16()
    assert model.channels == [64, 128, 256, 512, 512, 1024] and model.strides == [1, 2, 4, 8, 8, 8]
    assert model.fc6.dilation == (12, 12) and model.fc6.out_channels == 1024
    assert model.features[24].dilation == (2, 2) and model.features[23].stride == 1
    # conv1..conv5 parameters are torchvision's VGG-16 features (14.71M)
    assert sum(p.numel() for p in model.features.parameters()) == 14_714_688


def test_se_blocks_everywhere():
    model = create_backbone("se_resnet26", width=0.125)
    blocks = [
        b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer
    ]
    assert len(blocks) == 8 and all(b.se is not None and b.se.num_tasks == 1 for b in blocks)
    assert blocks[-1].se.reduction == 16


def test_task_conditioned_backbone_runs_per_sample():
    model = ResNet(
        26,
        output_stride=16,
        width=0.125,
        se=True,
        num_tasks=3,
        task_se=True,
        adapters=True,
        task_bn=True,
    ).eval()
    for p in model.parameters():  # non-trivial adapters and per-task rows
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, H, W)
    mixed = model(x, torch.tensor([2, 0, 1]))
    for row, t in enumerate([2, 0, 1]):
        alone = model(x[row : row + 1], t)
        for a, b in zip(alone, mixed):
            torch.testing.assert_close(a[0], b[row], rtol=1e-4, atol=1e-4)


def test_fpn_outputs_p2_to_p5():
    model = FPN(ResNet(18, width=0.125))
    assert model.channels == [256] * 4 and model.strides == [4, 8, 16, 32]


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet7")
    with pytest.raises(ValueError, match="output_stride"):
        ResNet(18, output_stride=4)
    with pytest.raises(ValueError, match="depth"):
        ResNet(34)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ResNet(18, width=0.125)(torch.randn(3, H, W))


def _plain_bottleneck(block, x, stride_in_1x1, dilation):
    """A bottleneck written out with F.conv2d: the stride on the 1x1 or on the 3x3 (eval-mode batch norm)."""
    from torch.nn import functional as F

    def bn(m, y):
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
    out = torch.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=s1)))
    out = torch.relu(
        bn(
            block.bn2,
            F.conv2d(out, block.conv2.weight, stride=s3, padding=dilation, dilation=dilation),
        )
    )
    out = bn(block.bn3, F.conv2d(out, block.conv3.weight))
    identity = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    return torch.relu(out + identity)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_bottleneck_stride_placement(stride_in_1x1):
    net = ResNet(26, width=0.125, stride_in_1x1=stride_in_1x1).eval()
    block = net.layer2[0]
    assert block.conv1.stride == ((2, 2) if stride_in_1x1 else (1, 1))
    assert block.conv2.stride == ((1, 1) if stride_in_1x1 else (2, 2))
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(2, net.layer1[-1].conv3.out_channels, 13, 10)
        torch.testing.assert_close(
            block(x), _plain_bottleneck(block, x, stride_in_1x1, 1), rtol=1e-5, atol=1e-5
        )
    # same parameters either way: torchvision (v1.5) checkpoints load into both
    assert sum(p.numel() for p in net.parameters()) == sum(
        p.numel() for p in ResNet(26, width=0.125).parameters()
    )
    with pytest.raises(ValueError, match="bottleneck"):
        ResNet(18, stride_in_1x1=True)


@pytest.mark.parametrize(
    "output_stride, expected",
    [
        (16, {"torchvision": [1, 2], "release": [2, 2]}),
        (8, {"torchvision": [1, 2, 2, 4], "release": [2, 2, 4, 4]}),
    ],
)
def test_first_block_dilation(output_stride, expected):
    """layer3/layer4 3x3 dilations: torchvision keeps the previous one in a dilated stage's first block."""
    for layout, dilate_first_block in (("torchvision", False), ("release", True)):
        net = ResNet(
            26, width=0.125, output_stride=output_stride, dilate_first_block=dilate_first_block
        )
        stages = (net.layer4,) if output_stride == 16 else (net.layer3, net.layer4)
        assert [b.conv2.dilation[0] for s in stages for b in s] == expected[layout]
        assert net.strides == [4, 8, min(16, output_stride), output_stride]
        feats = net(torch.randn(1, 3, H, W))
        assert feats[-1].shape[-2:] == (math.ceil(H / output_stride), math.ceil(W / output_stride))


def test_stem_task_bn():
    from mtlfast.nn import TaskBatchNorm2d

    per_task = ResNet(26, width=0.125, se=True, num_tasks=3, task_bn=True)
    shared = ResNet(26, width=0.125, se=True, num_tasks=3, task_bn=True, stem_task_bn=False)
    assert isinstance(per_task.bn1, TaskBatchNorm2d) and isinstance(
        shared.bn1, torch.nn.BatchNorm2d
    )
    assert isinstance(shared.layer1[0].bn1, TaskBatchNorm2d)
    shared.eval()
    x = torch.randn(3, 3, H, W)
    out = shared(x, torch.tensor([2, 0, 1]))
    torch.testing.assert_close(out[-1][1:2], shared(x[1:2], 0)[-1], rtol=1e-4, atol=1e-4)
