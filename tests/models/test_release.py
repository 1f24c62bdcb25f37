"""The ASTMT release's checkpoints in mtlfast's ASTMT: same outputs, clear errors, inferred options.

The real weights are not needed: ``ReleaseNet`` below rebuilds, in plain PyTorch, the network of
github.com/facebookresearch/astmt (``fblib/networks/deeplab_multi_task/deeplab_se_resnet_multitask.py``
with its ``ASPPv3Plus`` decoder), under the module names its state dict has, at any width. Its
random, perturbed weights stand in for a released checkpoint.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtlfast.models import ASTMT, load_release_checkpoint, release_options, summary
from mtlfast.models.release import RELEASE_TASK_NAMES

RELEASE_TASKS = {
    "edge": 1,
    "semseg": 21,
    "human_parts": 7,
    "normals": 3,
    "sal": 1,
}  # PASCAL, release order
OURS = {RELEASE_TASK_NAMES.get(t, t): n for t, n in RELEASE_TASKS.items()}


# --- the release's network, rebuilt under its names ------------------------------------------------


def _norm(channels, tasks):
    """One BatchNorm2d, or a ModuleDict of them keyed by task (the release's per-task norms)."""
    return (
        nn.ModuleDict({t: nn.BatchNorm2d(channels) for t in tasks})
        if tasks
        else nn.BatchNorm2d(channels)
    )


def _run_norm(norm, x, task):
    return norm[task](x) if isinstance(norm, nn.ModuleDict) else norm(x)


class _SE(nn.Module):
    """``SELayerMultiTaskDict``: fc = Linear, ReLU, Linear, Sigmoid, shared or keyed by task."""

    def __init__(self, channels, reduction, tasks):
        super().__init__()

        def fc():
            return nn.Sequential(
                nn.Linear(channels, channels // reduction),
                nn.ReLU(),
                nn.Linear(channels // reduction, channels),
                nn.Sigmoid(),
            )

        self.fc = nn.ModuleDict({t: fc() for t in tasks}) if tasks else fc()

    def forward(self, x, task):
        fc = self.fc[task] if isinstance(self.fc, nn.ModuleDict) else self.fc
        return x * fc(x.mean((2, 3)))[:, :, None, None]


class _Downsample(nn.Module):
    """``ConvCoupledBatchNormMT``: ``process`` (1x1 conv) then ``norm``."""

    def __init__(self, cin, cout, stride, tasks):
        super().__init__()
        self.process = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.norm = _norm(cout, tasks)

    def forward(self, x, task):
        return _run_norm(self.norm, self.process(x), task)


class _Bottleneck(nn.Module):
    """``SEBottleneck``: the stride on conv1 (1x1), every 3x3 at the stage's dilation, adapters on conv2."""

    def __init__(
        self, cin, planes, stride, dilation, downsample, tasks, task_bn, task_se, adapters
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        if adapters:
            self.adapt = nn.ModuleDict({t: nn.Conv2d(planes, planes, 1, bias=False) for t in tasks})
        bn_tasks = tasks if task_bn else None
        self.bn1, self.bn2, self.bn3 = (
            _norm(planes, bn_tasks),
            _norm(planes, bn_tasks),
            _norm(planes * 4, bn_tasks),
        )
        self.se = _SE(planes * 4, 16, tasks if task_se else None)
        self.downsample = downsample

    def forward(self, x, task):
        out = F.relu(_run_norm(self.bn1, self.conv1(x), task))
        out = self.conv2(out) + (self.adapt[task](out) if hasattr(self, "adapt") else 0)
        out = F.relu(_run_norm(self.bn2, out, task))
        out = self.se(_run_norm(self.bn3, self.conv3(out), task), task)
        residual = x if self.downsample is None else self.downsample(x, task)
        return F.relu(out + residual)


class _ConvCoupledSE(nn.Module):
    """``ConvCoupledSE``: process (+ task adapter) -> norm -> ReLU -> SE (se_after_relu)."""

    def __init__(self, layers, tasks, task_bn, squeeze, adapters, reduction=16):
        super().__init__()
        self.process = nn.Sequential(*layers)
        conv = layers[-1]
        if squeeze:
            self.se = _SE(conv.out_channels, reduction, tasks)
        if adapters:
            self.adapt = nn.ModuleDict(
                {t: nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False) for t in tasks}
            )
        self.norm = _norm(conv.out_channels, tasks if task_bn else None)

    def forward(self, x, task):
        y = self.process(x) + (self.adapt[task](x) if hasattr(self, "adapt") else 0)
        y = F.relu(_run_norm(self.norm, y, task))
        return self.se(y, task) if hasattr(self, "se") else y


class _ASPP(nn.Module):
    """``AtrousSpatialPyramidPoolingModule``: 1x1, three atrous 3x3, image pooling; conv2d_final."""

    def __init__(self, cin, depth, rates, tasks, task_bn, squeeze, adapters):
        super().__init__()
        opts = {"tasks": tasks, "task_bn": task_bn, "squeeze": squeeze}
        self.conv2d_list = nn.ModuleList(
            [_ConvCoupledSE([nn.Conv2d(cin, depth, 1, bias=False)], adapters=adapters, **opts)]
            + [
                _ConvCoupledSE(
                    [nn.Conv2d(cin, depth, 3, padding=r, dilation=r, bias=False)],
                    adapters=adapters,
                    **opts,
                )
                for r in rates
            ]
            + [
                _ConvCoupledSE(
                    [nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, depth, 1, bias=False)],
                    adapters=False,
                    **opts,
                )
            ]
        )
        self.conv2d_final = _ConvCoupledSE(
            [nn.Conv2d(depth * 5, depth, 1, bias=False)], adapters=adapters, **opts
        )

    def forward(self, x, task):
        outs = [m(x, task) for m in self.conv2d_list]
        outs[-1] = F.interpolate(outs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv2d_final(torch.cat(outs, 1), task)


class _Decoder(nn.Module):
    """``ASPPv3Plus``: layer5 (ASPP), low_level_reduce (48 * width / 256), conv_concat, conv_process, conv_predict."""

    def __init__(
        self, tasks, n_classes, cin_low, cin_high, width, rates, task_bn, squeeze, adapters
    ):
        super().__init__()
        low = 48 * width // 256
        opts = {"tasks": tasks, "task_bn": task_bn, "squeeze": squeeze, "adapters": adapters}
        self.layer5 = _ASPP(cin_high, width, rates, **opts)
        self.low_level_reduce = _ConvCoupledSE(
            [nn.Conv2d(cin_low, low, 1, bias=False)], reduction=4, **opts
        )
        self.conv_concat = _ConvCoupledSE(
            [nn.Conv2d(width + low, width, 3, padding=1, bias=False)], **opts
        )
        self.conv_process = _ConvCoupledSE(
            [nn.Conv2d(width, width, 3, padding=1, bias=False)], **opts
        )
        self.conv_predict = nn.ModuleDict({t: nn.Conv2d(width, n_classes[t], 1) for t in tasks})

    def forward(self, low, x, task):
        low = self.low_level_reduce(low, task)
        x = F.interpolate(
            self.layer5(x, task), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        x = self.conv_process(self.conv_concat(torch.cat([x, low], 1), task), task)
        return self.conv_predict[task](x), x


class ReleaseNet(nn.Module):
    """The release's multi-task SE-ResNet DeepLab-v3+ (``ResNet(SEBottleneck, ...)``), ``width`` x 64 at the stem.

    ``seenc``/``sedec``/``adapt``/``trNorm``/``dec_w`` are the release's flags; ``norm_per_task`` is
    its decoder batch norm (``= sedec`` in its configs); ``dscr``: the fconv discriminator (depth 2, k 1).
    """

    def __init__(
        self,
        tasks=RELEASE_TASKS,
        layers=(2, 2, 2, 2),
        width=1.0,
        dec_w=64,
        output_stride=16,
        seenc=True,
        sedec=True,
        adapt=True,
        trNorm=True,
        norm_per_task=None,
        dscr=True,
    ):
        super().__init__()
        names = list(tasks)
        norm_per_task = sedec if norm_per_task is None else norm_per_task
        strides, dilations = {16: ((2, 2, 2, 2, 1), (1, 2)), 8: ((2, 2, 2, 1, 1), (2, 4))}[
            output_stride
        ]
        rates = [r * 16 // output_stride for r in (6, 12, 18)]
        stem = int(64 * width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=strides[0], padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)  # shared, whatever trNorm
        self.maxpool = nn.MaxPool2d(3, stride=strides[1], padding=1)
        self.inplanes = stem
        blocks = {"tasks": names, "task_bn": trNorm, "task_se": seenc, "adapters": adapt}
        for i, (n, stride, dilation) in enumerate(
            zip(layers, (1, *strides[2:]), (1, 1, *dilations))
        ):
            planes = stem * 2**i
            down = _Downsample(self.inplanes, planes * 4, stride, names if trNorm else None)
            mods = [_Bottleneck(self.inplanes, planes, stride, dilation, down, **blocks)]
            self.inplanes = planes * 4
            mods += [
                _Bottleneck(self.inplanes, planes, 1, dilation, None, **blocks) for _ in range(1, n)
            ]
            setattr(self, f"layer{i + 1}", nn.ModuleList(mods))
        self.decoder = _Decoder(
            names, tasks, stem * 4, stem * 32, dec_w, rates, norm_per_task, sedec, adapt
        )
        if dscr:
            self.discriminator = nn.Module()
            self.discriminator.model = nn.Sequential(
                nn.Conv2d(dec_w, dec_w, 1, bias=False), nn.ReLU(), nn.Conv2d(dec_w, len(names), 1)
            )

    def forward(self, x, task):
        y = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(1, 5):
            for block in getattr(self, f"layer{i}"):
                y = block(y, task)
            feats.append(y)
        out, _ = self.decoder(feats[0], feats[-1], task)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _perturbed(net):
    """Random weights everywhere (adapters, BN statistics, per-task entries all distinct), as after training."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
        for m in net.decoder.conv_predict.values():
            m.weight.mul_(0.05)  # predictions of order 1, so that 1e-5 is float32 rounding's scale
    return net.eval()


def _converted(net, output_stride=16):
    """mtlfast's ASTMT built from the release net's state dict alone, and loaded from it."""
    state = net.state_dict()
    model = ASTMT(**{**release_options(state), "output_stride": output_stride})
    result = load_release_checkpoint(model, state)
    return model.eval(), result


# (release network options, output stride): its PASCAL configuration and the ablations' switches
RELEASES = [
    ({}, 16),  # train.sh: seenc, sedec, adapt, trNorm
    ({"adapt": False}, 16),  # SE modulation only (paper's SEA)
    (
        {"seenc": False, "sedec": False, "adapt": False, "dscr": False},
        16,
    ),  # the release's multi-task baseline
    ({"seenc": False, "trNorm": False}, 16),  # decoder-only modulation
    ({"layers": (3, 4, 6, 3), "width": 0.0625}, 8),  # SE-ResNet-50, output stride 8
    ({"tasks": {"sal": 1}, "adapt": True}, 16),  # one task
]


@pytest.mark.parametrize(
    "options, output_stride",
    RELEASES,
    ids=["pascal", "se-only", "baseline", "decoder-only", "r50-os8", "one-task"],
)
def test_release_outputs_are_reproduced(options, output_stride):
    options = {"width": 0.125, "dec_w": 32, **options}
    net = _perturbed(ReleaseNet(output_stride=output_stride, **options))
    model, result = _converted(net, output_stride)
    assert len(result.loaded) == len(model.state_dict())
    assert result.ignored == [k for k in net.state_dict() if k.startswith("discriminator.")]
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        together = model.forward_all(x)
        for task in net.decoder.conv_predict:
            theirs = net(x, task)
            ours = RELEASE_TASK_NAMES.get(task, task)
            scale = float(theirs.abs().max())
            assert 0.01 < scale < 10  # a signal of order 1
            # float32: 1e-5 of the predictions' scale (the two sum in different orders)
            torch.testing.assert_close(
                model(x, ours), theirs, rtol=1e-5, atol=1e-5 * max(scale, 1.0)
            )
            torch.testing.assert_close(
                together[ours], theirs, rtol=1e-5, atol=1e-5 * max(scale, 1.0)
            )
        # in float64 the two agree to rounding: the mapping is exact, not merely close
        net.double(), model.double()
        for task in net.decoder.conv_predict:
            torch.testing.assert_close(
                model(x.double(), RELEASE_TASK_NAMES.get(task, task)),
                net(x.double(), task),
                rtol=1e-10,
                atol=1e-10,
            )


def test_release_options():
    net = ReleaseNet(width=0.125, dec_w=32, seenc=False, sedec=False, adapt=True)
    options = release_options(net.state_dict())
    assert options == {
        "tasks": ["edge", "semseg", "parts", "normals", "saliency"],
        "out_channels": OURS,
        "backbone": "se_resnet26",
        "width": 0.125,
        "output_stride": 16,
        "head_channels": 32,
        "low_channels": 6,
        "se_encoder": False,
        "se_decoder": False,
        "decoder_se": False,
        "adapters": True,
        "decoder_adapters": True,
        "task_bn": (True, False),
    }
    assert (
        release_options(ReleaseNet(layers=(3, 4, 23, 3), width=0.0625).state_dict())["backbone"]
        == "se_resnet101"
    )


@pytest.mark.parametrize("adapt, count", [(True, 31_274_956), (False, 25_009_356)])
def test_parameter_counts_match_the_release(adapt, count):
    """The release's PASCAL network (SE-ResNet-26, five tasks, decoder 64 wide): 31.28M parameters
    with its discriminator's 4,421, 31,274,956 without; ASTMT's defaults are it without adapters."""
    release = ReleaseNet(adapt=adapt, dscr=False)
    ours = summary(ASTMT(list(OURS), adapters=adapt), (1, 3, 33, 33))
    assert sum(p.numel() for p in release.parameters()) == count
    assert ours.params_total == count


def test_checkpoint_file(tmp_path):
    net = _perturbed(ReleaseNet(width=0.125, dec_w=32))
    path = tmp_path / "model_epoch-59.pth"
    torch.save(
        {f"module.{k}": v for k, v in net.state_dict().items()}, path
    )  # as DataParallel saves it
    model = ASTMT(**release_options(path))
    load_release_checkpoint(model, path)
    x = torch.randn(1, 3, 29, 31)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x, "parts"), net(x, "human_parts"), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_release_checkpoint(model, tmp_path / "absent.pth")


def test_errors_name_the_keys():
    state = _perturbed(ReleaseNet(width=0.125, dec_w=32)).state_dict()
    model = ASTMT(**release_options(state))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fails(bad, *patterns):
        with pytest.raises(ValueError) as info:
            load_release_checkpoint(model, bad)
        for pattern in patterns:
            assert pattern in str(info.value)
        for k, v in model.state_dict().items():  # nothing copied
            assert torch.equal(v, before[k]), k

    fails(
        {k: v for k, v in state.items() if k != "layer2.1.se.fc.normals.2.bias"},
        "missing from the checkpoint: layer2.1.se.fc.normals.2.bias",
    )
    fails(
        {**state, "layer5.0.conv1.weight": torch.zeros(1)},
        "unexpected in the checkpoint: layer5.0.conv1.weight",
    )
    fails(
        {**state, "decoder.conv_predict.semseg.weight": torch.zeros(40, 32, 1, 1)},
        "shapes that disagree: decoder.conv_predict.semseg.weight (40, 32, 1, 1) -> heads.semseg.weight",
    )
    no_adapters = ASTMT(**{**release_options(state), "adapters": False})
    with pytest.raises(
        ValueError, match=r"unexpected in the checkpoint: layer1\.0\.adapt\.edge\.weight"
    ):
        load_release_checkpoint(no_adapters, state)
    # a model whose backbone has the torchvision layout holds the same shapes but computes otherwise
    from mtlfast.backbones import ResNet

    tv = ResNet(
        26,
        output_stride=16,
        width=0.125,
        se=True,
        num_tasks=5,
        task_se=True,
        adapters=True,
        task_bn=True,
        stem_task_bn=False,
    )
    with pytest.raises(ValueError, match="stride_in_1x1"):
        load_release_checkpoint(ASTMT(**{**release_options(state), "backbone": tv}), state)
    with pytest.raises(TypeError, match="SE-ResNet"):
        load_release_checkpoint(
            ASTMT(["semseg"], "se_mobilenet_v2", width=0.25, head_channels=16), state
        )
    with pytest.raises(TypeError, match="state dict"):
        load_release_checkpoint(model, [1, 2])
