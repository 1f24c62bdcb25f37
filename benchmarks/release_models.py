"""The authors' releases rebuilt in plain PyTorch, written the way the releases write them.

Written once here, used by the tests that load release checkpoints into mtlfast's models
(tests/models/test_release.py, tests/models/test_release_mtinet.py) and by the benchmarks that
compare mtlfast with the releases (bench_models.py, distillation_vs_release.py):

* ASTMT (github.com/facebookresearch/astmt): :class:`ReleaseNet`, the multi-task SE-ResNet
  DeepLab-v3+ of ``fblib/networks/deeplab_multi_task/deeplab_se_resnet_multitask.py`` with its
  ``ASPPv3Plus`` decoder, under the module names its state dict has, at any width; one task per
  forward (``net(x, task)``), as the release trains and evaluates it;
* MTI-Net and PAD-Net (github.com/SimonVandenhende/Multi-Task-Learning-PyTorch, models/resnet.py,
  layers.py, padnet.py, mti_net.py, seg_hrnet.py): :class:`ReleaseMTINet`, :class:`ReleasePADNet`
  over any 4-scale backbone (the release's HRNet has the names of :class:`mtlfast.backbones.HRNet`),
  per-task loops and one module per ordered task pair in the distillation;
* :class:`ReleaseDistillation`: that per-pair distillation loop with the weights of an mtlfast
  :class:`mtlfast.nn.MultiModalDistillation`, to swap into an mtlfast model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "RELEASE_TASKS",
    "ReleaseDistillation",
    "ReleaseMTINet",
    "ReleaseNet",
    "ReleasePADNet",
]

RELEASE_TASKS = {
    "edge": 1,
    "semseg": 21,
    "human_parts": 7,
    "normals": 3,
    "sal": 1,
}  # ASTMT's PASCAL tasks, release order and names


# ---- ASTMT ---------------------------------------------------------------------------------------


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


# ---- MTI-Net and PAD-Net -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def projection(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class SEBlock(nn.Module):
    def __init__(self, channels, r=16):
        super().__init__()
        self.squeeze = nn.Sequential(
            nn.Linear(channels, channels // r),
            nn.ReLU(),
            nn.Linear(channels // r, channels),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.squeeze(x.mean(dim=(2, 3))).view(b, c, 1, 1)


class SABlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.attention = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.Sigmoid()
        )
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x) * self.attention(x)


class MultiTaskDistillationModule(nn.Module):
    def __init__(self, tasks, auxilary_tasks, channels):
        super().__init__()
        self.tasks, self.auxilary_tasks = tasks, auxilary_tasks
        self.self_attention = nn.ModuleDict(
            {
                t: nn.ModuleDict({a: SABlock(channels) for a in auxilary_tasks if a != t})
                for t in tasks
            }
        )

    def forward(self, x):
        out = {}
        for t in self.tasks:
            adapters = [
                self.self_attention[t][a](x[f"features_{a}"]) for a in self.auxilary_tasks if a != t
            ]
            out[t] = x[f"features_{t}"] + torch.stack(adapters).sum(0)
        return out


class MTIInitialTaskPredictionModule(nn.Module):
    def __init__(self, tasks, input_channels, task_channels, out_channels):
        super().__init__()
        self.tasks = tasks

        def refinement():
            down = (
                projection(input_channels, task_channels)
                if input_channels != task_channels
                else None
            )
            return nn.Sequential(
                BasicBlock(input_channels, task_channels, down),
                BasicBlock(task_channels, task_channels),
            )

        self.refinement = nn.ModuleDict({t: refinement() for t in tasks})
        self.decoders = nn.ModuleDict(
            {t: nn.Conv2d(task_channels, out_channels[t], 1) for t in tasks}
        )

    def forward(self, curr, prev=None):
        out = {}
        for t in self.tasks:
            x = (
                curr
                if prev is None
                else torch.cat((curr, F.interpolate(prev[t], scale_factor=2, mode="bilinear")), 1)
            )
            out[f"features_{t}"] = self.refinement[t](x)
            out[t] = self.decoders[t](out[f"features_{t}"])
        return out


class FPM(nn.Module):
    def __init__(self, tasks, per_task_channels):
        super().__init__()
        self.tasks, self.n = tasks, len(tasks)
        shared = self.n * per_task_channels
        self.non_linear = nn.Sequential(
            BasicBlock(shared, shared // 4, projection(shared, shared // 4)),
            BasicBlock(shared // 4, shared // 4),
            nn.Conv2d(shared // 4, shared, 1),
        )
        self.dimensionality_reduction = BasicBlock(
            shared, per_task_channels, projection(shared, per_task_channels)
        )
        self.se = nn.ModuleDict({t: SEBlock(per_task_channels) for t in tasks})

    def forward(self, x):
        concat = torch.cat([x[f"features_{t}"] for t in self.tasks], 1)
        b, c, h, w = concat.shape
        # the release's grouping: T consecutive channels of the concatenation
        mask = F.softmax(self.non_linear(concat).view(b, c // self.n, self.n, h, w), dim=2)
        shared = (mask * concat.view(b, c // self.n, self.n, h, w)).view(b, -1, h, w)
        shared = self.dimensionality_reduction(shared)
        return {t: self.se[t](shared) + x[f"features_{t}"] for t in self.tasks}


def upsampled_concat(x):
    return torch.cat(
        [x[0]] + [F.interpolate(y, x[0].shape[-2:], mode="bilinear") for y in x[1:]], 1
    )


class HighResolutionHead(nn.Module):
    def __init__(self, channels, num_outputs):
        super().__init__()
        c = sum(channels)
        self.last_layer = nn.Sequential(
            nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, num_outputs, 1)
        )

    def forward(self, x):
        return self.last_layer(upsampled_concat(x))


class HighResolutionFuse(nn.Module):
    def __init__(self, channels):
        super().__init__()
        c = sum(channels)
        self.last_layer = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return self.last_layer(upsampled_concat(x))


class ReleaseMTINet(nn.Module):
    """The release's MTI-Net (models/mti_net.py) over ``backbone`` (its 4 scales, ``channels`` wide).

    ``tasks``: release task names; ``out_channels``: name -> channels. Returns the final
    predictions at input size and, as the release, ``"deep_supervision"``: ``{"scale_<s>": {task:
    prediction at scale s}}`` (the release's loss upsamples them to the input).
    """

    def __init__(self, tasks, backbone, channels, out_channels):
        super().__init__()
        self.tasks = tasks
        self.backbone = backbone
        for s in (3, 2, 1):
            setattr(self, f"fpm_scale_{s}", FPM(tasks, channels[s]))
        for s in range(4):
            cin = channels[s] + (channels[s + 1] if s < 3 else 0)
            setattr(
                self,
                f"scale_{s}",
                MTIInitialTaskPredictionModule(tasks, cin, channels[s], out_channels),
            )
        for s in range(4):
            setattr(
                self,
                f"distillation_scale_{s}",
                MultiTaskDistillationModule(tasks, tasks, channels[s]),
            )
        self.heads = nn.ModuleDict(
            {t: HighResolutionHead(channels, out_channels[t]) for t in tasks}
        )

    def forward(self, x):
        size = x.shape[-2:]
        x = self.backbone(x)
        x_3 = self.scale_3(x[3])
        x_2 = self.scale_2(x[2], self.fpm_scale_3(x_3))
        x_1 = self.scale_1(x[1], self.fpm_scale_2(x_2))
        x_0 = self.scale_0(x[0], self.fpm_scale_1(x_1))
        distilled = [
            getattr(self, f"distillation_scale_{s}")(f) for s, f in enumerate((x_0, x_1, x_2, x_3))
        ]
        out = {
            t: F.interpolate(self.heads[t]([d[t] for d in distilled]), size, mode="bilinear")
            for t in self.tasks
        }
        out["deep_supervision"] = {
            f"scale_{s}": {t: f[t] for t in self.tasks} for s, f in enumerate((x_0, x_1, x_2, x_3))
        }
        return out


class PADInitialTaskPredictionModule(nn.Module):
    def __init__(self, tasks, input_channels, intermediate_channels, out_channels):
        super().__init__()
        self.tasks = tasks

        def layers():
            down = None
            if input_channels != intermediate_channels:
                down = projection(input_channels, intermediate_channels)
            return nn.Sequential(
                Bottleneck(input_channels, intermediate_channels // 4, down),
                Bottleneck(intermediate_channels, intermediate_channels // 4),
            )

        self.layers = nn.ModuleDict({t: layers() for t in tasks})
        self.conv_out = nn.ModuleDict(
            {t: nn.Conv2d(intermediate_channels, out_channels[t], 1) for t in tasks}
        )

    def forward(self, x):
        out = {}
        for t in self.tasks:
            out[f"features_{t}"] = self.layers[t](x)
            out[t] = self.conv_out[t](out[f"features_{t}"])
        return out


class ReleasePADNet(nn.Module):
    """The release's PAD-Net (models/padnet.py); it hard-codes 256 task channels (``width``).

    Returns the final predictions at input size and, as the release, ``"initial_<task>"``: the
    initial predictions at 1/4 (the release's loss upsamples them to the input).
    """

    def __init__(self, tasks, backbone, channels, width, out_channels):
        super().__init__()
        self.tasks = tasks
        self.backbone = nn.Sequential(backbone, HighResolutionFuse(channels))
        self.initial_task_prediction_heads = PADInitialTaskPredictionModule(
            tasks, sum(channels), width, out_channels
        )
        self.multi_modal_distillation = MultiTaskDistillationModule(tasks, tasks, width)
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(
                    Bottleneck(width, width // 4),
                    Bottleneck(width, width // 4),
                    nn.Conv2d(width, out_channels[t], 1),
                )
                for t in tasks
            }
        )

    def forward(self, x):
        size = x.shape[-2:]
        x = self.initial_task_prediction_heads(self.backbone(x))
        out = {f"initial_{t}": x[t] for t in self.tasks}
        x = self.multi_modal_distillation(x)
        out.update(
            {t: F.interpolate(self.heads[t](x[t]), size, mode="bilinear") for t in self.tasks}
        )
        return out


# ---- the release's distillation loop, with an mtlfast layer's weights -----------------------------


class ReleaseDistillation(nn.Module):
    """The release's per-pair loop; ``self_attention[k][l]`` refines target k with source l."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        t, c = layer.num_tasks, layer.channels
        self.num_tasks = t
        self.self_attention = nn.ModuleList()
        for k in range(t):
            row = nn.ModuleDict()
            for l in range(t):
                if l != k:
                    block = SABlock(c)
                    mask, message = layer.pair_weights(k, l)
                    block.attention[0].weight = nn.Parameter(mask.detach().clone())
                    block.conv.weight = nn.Parameter(message.detach().clone())
                    row[str(l)] = block
            self.self_attention.append(row)

    def forward(self, features):
        # As the release: every pair's gated message first (a dict per target), then the sums.
        t = self.num_tasks
        adapters = [
            [row[str(l)](features[l]) for l in range(t) if l != k]
            for k, row in enumerate(self.self_attention)
        ]
        return [features[k] + torch.sum(torch.stack(adapters[k]), dim=0) for k in range(t)]
