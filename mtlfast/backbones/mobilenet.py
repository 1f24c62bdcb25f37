"""MobileNetV2 (Sandler et al.) and SE-MobileNetV2, with dilation for output stride 8 or 16."""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import TaskSequential, make_norm, make_se, run_se
from .base import Backbone

__all__ = ["InvertedResidual", "MobileNetV2"]

#: (expansion t, channels c, repeats n, stride s), torchvision's inverted residual setting.
SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of 8, never below 90% of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn_act(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    num_tasks: int = 1,
    task_bn: bool = False,
) -> TaskSequential:
    """torchvision's Conv2dNormActivation with ReLU6: keys ``0.weight`` (conv), ``1.*`` (batch norm)."""
    pad = (kernel - 1) // 2 * dilation
    return TaskSequential(
        nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
        make_norm(cout, num_tasks, task_bn),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3 (stride, dilation), project 1x1; residual when shapes agree.

    The optional SE block gates the projected output before the residual addition, where
    SE-ResNet puts it; the ASTMT release's SE-MobileNetV2 is not public in enough detail to copy.

    Shapes: (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    takes_task = True

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        expand: int,
        dilation: int = 1,
        *,
        se: bool = False,
        num_tasks: int = 1,
        task_se: bool = False,
        task_bn: bool = False,
    ) -> None:
        super().__init__()
        hidden = round(cin * expand)
        self.out_channels = cout
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, num_tasks=num_tasks, task_bn=task_bn))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, dilation, hidden, num_tasks, task_bn),
            nn.Conv2d(hidden, cout, 1, bias=False),
            make_norm(cout, num_tasks, task_bn),
        ]
        self.conv = TaskSequential(*layers)
        self.se = make_se(cout, num_tasks, task_se) if se else None

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, task)
        residual = x if self.use_residual else None
        if self.se is not None:
            return run_se(self.se, out, task, residual, relu=False)
        return out + x if residual is not None else out


class MobileNetV2(Backbone):
    """MobileNetV2 without its last 1x1 convolution (features.18) and classifier, as DeepLab-v3+ uses it.

    Module names follow torchvision (``features.0.0.weight``, ``features.1.conv.0.0.weight``, ...).
    The features are the outputs at strides 4, 8, 16, 32 (features.3, .6, .13, .17: 24, 32, 96,
    320 channels at width 1). With ``output_stride`` 16 or 8 the later strides become 1 and the
    depthwise convolutions dilate (the first block of a dilated stage keeping the previous rate).

    Args:
        output_stride: 32, 16 or 8.
        width: torchvision's ``width_mult`` (channels rounded to multiples of 8).
        se: an SE block (reduction 16) in every inverted residual (SE-MobileNetV2, ASTMT appendix C).
        num_tasks, task_se, task_bn: ASTMT's task-specific SE and batch norm.

    Shapes: x (N, 3, H, W) -> 4 tensors (N, channels[k], ceil(H / strides[k]), ceil(W / strides[k])).
    """

    classifier_prefixes = ("classifier.", "features.18.")

    def __init__(
        self,
        output_stride: int = 32,
        width: float = 1.0,
        se: bool = False,
        num_tasks: int = 1,
        task_se: bool = False,
        task_bn: bool = False,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MobileNetV2: output_stride must be 8, 16 or 32, got {output_stride}")
        if width <= 0:
            raise ValueError(f"MobileNetV2: width must be > 0, got {width}")
        self.output_stride = output_stride
        opts = {"se": se, "num_tasks": num_tasks, "task_se": task_se, "task_bn": task_bn}
        cin = _divisible(32 * width)
        layers: list[nn.Module] = [_conv_bn_act(3, cin, 3, 2, num_tasks=num_tasks, task_bn=task_bn)]
        stride_now, nominal, dilation = 2, 2, 1
        ends: list[int] = []
        for t, c, n, s in SETTING:
            cout = _divisible(c * width)
            for i in range(n):
                stride = s if i == 0 else 1
                if stride > 1:
                    nominal *= stride
                    if nominal > 4:
                        ends.append(len(layers) - 1)  # the last block before a stride ends a stage
                first = dilation  # the block that loses its stride keeps the previous rate
                if stride > 1 and stride_now >= output_stride:
                    dilation *= stride
                    stride = 1
                stride_now *= stride
                layers.append(InvertedResidual(cin, cout, stride, t, first, **opts))
                cin = cout
        ends.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self._bounds = []
        start = 0
        for end in ends:  # features.3, .6, .13, .17 at width 1
            self._bounds.append((start, end + 1))
            start = end + 1
        self.channels = [self.features[stop - 1].out_channels for _, stop in self._bounds]
        self.strides = [min(4 * 2**k, output_stride) for k in range(4)]
        self.feature_stages = (0, 1, 2, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: He (fan-out) convolutions."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def stages(self) -> list[nn.Module]:
        return [TaskSequential(*self.features[a:b]) for a, b in self._bounds]

    def extra_repr(self) -> str:
        return f"output_stride={self.output_stride}, channels={self.channels}"
