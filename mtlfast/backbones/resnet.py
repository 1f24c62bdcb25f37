"""ResNet-18/26/50/101 and SE-ResNet, with DeepLab-style dilation for output stride 8 or 16."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.max_pool import MaxPool2d
from ._blocks import (
    AtrousResidualAdapter,
    PointwiseConv2d,
    TaskSequential,
    call,
    make_norm,
    make_se,
    norm_for_next,
    run_se,
)
from .base import Backbone

__all__ = ["DEPTHS", "BasicBlock", "Bottleneck", "ResNet"]

#: depth -> (block, blocks per stage). 26 is ASTMT's SE-ResNet-26: bottlenecks, two per stage.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv3x3(
    cin: int, cout: int, stride: int, dilation: int, num_tasks: int, adapters: bool
) -> nn.Module:
    if adapters:
        return AtrousResidualAdapter(cin, cout, num_tasks, stride=stride, dilation=dilation)
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _Block(nn.Module):
    """Options shared by both blocks; ``forward(x, task=None)``.

    se: an SE block (reduction 16) on the residual branch before the addition (Hu et al.);
    task_se: one SE per task; adapters: a zero-initialised per-task 1x1 convolution in parallel
    with each 3x3 convolution (ASTMT Eq. 2); task_bn: one batch norm per task.
    """

    takes_task = True

    def _finish(self, out: torch.Tensor, identity: torch.Tensor, task) -> torch.Tensor:
        if self.se is not None:
            return run_se(self.se, out, task, identity, relu=True)
        return torch.relu(out + identity)


class BasicBlock(_Block):
    """ResNet-18's block: two 3x3 convolutions. Shapes: (N, C_in, H, W) -> (N, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
        *,
        se: bool = False,
        num_tasks: int = 1,
        task_se: bool = False,
        adapters: bool = False,
        task_bn: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, first_dilation, num_tasks, adapters)
        self.bn1 = make_norm(planes, num_tasks, task_bn)
        self.conv2 = _conv3x3(planes, planes, 1, dilation, num_tasks, adapters)
        self.bn2 = make_norm(planes, num_tasks, task_bn)
        self.se = make_se(planes, num_tasks, task_se) if se else None
        self.downsample = downsample

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        identity = x if self.downsample is None else call(self.downsample, x, task)
        out, keep = norm_for_next(self.bn1, call(self.conv1, x, task), task, with_relu=True)
        with keep:  # what the convolution saves of its input is rebuilt (_blocks.norm_for_next)
            out = call(self.conv2, out, task)
        out, keep = norm_for_next(self.bn2, out, task)
        with keep:
            return self._finish(out, identity, task)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand x4 (torchvision's v1.5: stride on the 3x3).

    ``stride_in_1x1``: the stride on the first 1x1 convolution instead (the original ResNet's and
    Caffe's layout, which the ASTMT release's DeepLab network uses); the 3x3 then has stride 1.

    Shapes: (N, C_in, H, W) -> (N, 4 planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
        *,
        se: bool = False,
        num_tasks: int = 1,
        task_se: bool = False,
        adapters: bool = False,
        task_bn: bool = False,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        del dilation  # one 3x3 per block: it takes first_dilation, as torchvision's does
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = PointwiseConv2d(inplanes, planes, stride=s1, bias=False)
        self.bn1 = make_norm(planes, num_tasks, task_bn)
        self.conv2 = _conv3x3(planes, planes, s3, first_dilation, num_tasks, adapters)
        self.bn2 = make_norm(planes, num_tasks, task_bn)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = make_norm(planes * 4, num_tasks, task_bn)
        self.se = make_se(planes * 4, num_tasks, task_se) if se else None
        self.downsample = downsample

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        identity = x if self.downsample is None else call(self.downsample, x, task)
        out, keep = norm_for_next(self.bn1, self.conv1(x), task, with_relu=True)
        with keep:  # what the convolution saves of its input is rebuilt (_blocks.norm_for_next)
            out = call(self.conv2, out, task)
        out, keep = norm_for_next(self.bn2, out, task, with_relu=True)
        with keep:
            out = self.conv3(out)
        out, keep = norm_for_next(self.bn3, out, task)
        with keep:  # the SE's input
            return self._finish(out, identity, task)


class ResNet(Backbone):
    """ResNet (He et al.) without its classifier; features are the outputs of layer1..layer4.

    Module names follow torchvision (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0, ...), so
    torchvision checkpoints load by name. With ``output_stride`` 16 (8) the stride of layer4
    (layer3 and layer4) is replaced by dilation 2 (2 and 4), DeepLab style: by default the first
    block of a dilated stage keeps the previous dilation in its 3x3 convolution, as torchvision's
    ``replace_stride_with_dilation`` does; with ``dilate_first_block`` every block of the stage
    has its dilation (DeepLab's and the ASTMT release's layout).

    Args:
        depth: 18, 26, 50 or 101 (26: bottlenecks [2, 2, 2, 2], ASTMT's SE-ResNet-26).
        output_stride: 32, 16 or 8.
        width: multiplies every width (64 at the stem); 1.0 is the paper's network, smaller values
            only make tests fast.
        se: squeeze-and-excitation (reduction 16) in every block (SE-ResNet).
        num_tasks, task_se, adapters, task_bn: ASTMT's task-specific SE, residual adapters on
            the 3x3 convolutions and task batch norm, all inside the blocks.
        stem_task_bn: task batch norm in the stem too; None (default): as ``task_bn``. The ASTMT
            release keeps the stem's batch norm shared (False) whatever its blocks use.
        stride_in_1x1: bottlenecks stride on their first 1x1 convolution, not on the 3x3
            (:class:`Bottleneck`); the ASTMT release's layout. Bottleneck depths only.
        dilate_first_block: the first block of a dilated stage takes the stage's dilation.

    Shapes: x (N, 3, H, W) -> [(N, C_k, ceil(H / s_k), ceil(W / s_k))] for k = 1..4, with
    ``channels`` [64, 128, 256, 512] x expansion x width and ``strides`` [4, 8, 16, 32] capped at
    ``output_stride``.
    """

    classifier_prefixes = ("fc.",)

    def __init__(
        self,
        depth: int = 50,
        output_stride: int = 32,
        width: float = 1.0,
        se: bool = False,
        num_tasks: int = 1,
        task_se: bool = False,
        adapters: bool = False,
        task_bn: bool = False,
        stem_task_bn: bool | None = None,
        stride_in_1x1: bool = False,
        dilate_first_block: bool = False,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet: depth must be one of {sorted(DEPTHS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"ResNet: output_stride must be 8, 16 or 32, got {output_stride}")
        if width <= 0:
            raise ValueError(f"ResNet: width must be > 0, got {width}")
        kind, layers = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError(
                f"ResNet: stride_in_1x1 needs bottleneck blocks; depth {depth} has basic blocks"
            )
        self.depth, self.output_stride = depth, output_stride
        opts = {
            "se": se,
            "num_tasks": num_tasks,
            "task_se": task_se,
            "adapters": adapters,
            "task_bn": task_bn,
        }
        if stride_in_1x1:
            opts["stride_in_1x1"] = True
        stem = max(int(64 * width), 1)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(stem, num_tasks, task_bn if stem_task_bn is None else stem_task_bn)
        self.relu = nn.ReLU()
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}[
            output_stride
        ]
        self.inplanes, self.dilation = stem, 1
        self.channels, self.strides = [], []
        stride_now = 4
        for i, n in enumerate(layers):
            planes = max(int(64 * width), 1) * 2**i
            stride = 1 if i == 0 else 2
            first = (
                self.dilation
            )  # torchvision: a newly dilated stage's first block keeps the old one
            if i > 0 and dilate[i - 1]:
                self.dilation *= stride
                stride = 1
            if dilate_first_block:
                first = self.dilation
            stride_now *= stride
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride, first, opts))
            self.channels.append(planes * block.expansion)
            self.strides.append(stride_now)
        del self.inplanes
        self.feature_stages = (1, 2, 3, 4)
        self.reset_parameters()

    def _make_layer(
        self, block, planes: int, blocks: int, stride: int, first_dilation: int, opts: dict
    ) -> TaskSequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = TaskSequential(
                PointwiseConv2d(self.inplanes, planes * block.expansion, stride=stride, bias=False),
                make_norm(planes * block.expansion, opts["num_tasks"], opts["task_bn"]),
            )
        mods = [
            block(self.inplanes, planes, stride, self.dilation, first_dilation, downsample, **opts)
        ]
        self.inplanes = planes * block.expansion
        mods += [
            block(self.inplanes, planes, 1, self.dilation, self.dilation, **opts)
            for _ in range(1, blocks)
        ]
        return TaskSequential(*mods)

    def reset_parameters(self) -> None:
        """He (fan-out) initialisation of convolutions, unit batch norms; adapters stay zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[nn.Module]:
        return [
            TaskSequential(self.conv1, self.bn1, self.relu, self.maxpool),
            self.layer1,
            self.layer2,
            self.layer3,
            self.layer4,
        ]

    def extra_repr(self) -> str:
        return f"depth={self.depth}, output_stride={self.output_stride}, channels={self.channels}"
