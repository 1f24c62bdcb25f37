"""Dense-prediction heads: DeepLab-v3+ (ASPP and decoder, optionally task-conditioned) and a simple head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..backbones._blocks import TaskSequential, make_norm, make_se

__all__ = ["ASPP", "DeepLabV3PlusDecoder", "SimpleHead"]


def _conv_block(cin: int, cout: int, kernel: int, dilation: int = 1, *, separable: bool = False,
                num_tasks: int = 1, task_bn: bool = False) -> TaskSequential:
    """conv-BN-ReLU; ``separable``: depthwise 3x3-BN-ReLU6 then pointwise 1x1-BN-ReLU6 (the MobileNet decoder)."""
    pad = (kernel - 1) // 2 * dilation
    if separable and kernel > 1:
        return TaskSequential(
            nn.Conv2d(cin, cin, kernel, padding=pad, dilation=dilation, groups=cin, bias=False),
            make_norm(cin, num_tasks, task_bn), nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False), make_norm(cout, num_tasks, task_bn), nn.ReLU6())
    act = nn.ReLU6() if separable else nn.ReLU()
    return TaskSequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                          make_norm(cout, num_tasks, task_bn), act)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): a 1x1 branch, three 3x3 atrous branches, image pooling.

    The five branches (``channels`` each) are concatenated and projected by conv1x1-BN-ReLU to
    ``channels``. DeepLab's dropout (0.1) after the projection is left out, as in the ASTMT release.
    The image-pooling branch has a batch norm on 1x1 maps: training needs more than one sample
    per task.

    Shapes: x (N, C_in, H, W) -> (N, channels, H, W).
    """

    takes_task = True

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (6, 12, 18), *,
                 separable: bool = False, num_tasks: int = 1, task_bn: bool = False) -> None:
        super().__init__()
        opts = {"separable": separable, "num_tasks": num_tasks, "task_bn": task_bn}
        self.branches = nn.ModuleList([_conv_block(in_channels, channels, 1, **opts)]
                                      + [_conv_block(in_channels, channels, 3, r, **opts) for r in rates])
        self.pool = _conv_block(in_channels, channels, 1, **opts)
        self.project = _conv_block(channels * (len(rates) + 2), channels, 1, **opts)

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        outs = [b(x, task) for b in self.branches]
        pooled = self.pool(x.mean((2, 3), keepdim=True), task)
        outs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1), task)


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLab-v3+ (Chen et al. 2018): ASPP on the coarse features, a 48-channel reduction of the
    low-level ones, concatenation at the low-level resolution, two 3x3 conv-BN-ReLU.

    ``se``: an SE block (reduction 16) after each of the two 3x3 blocks, as in ASTMT's decoder
    (Fig. 3); ``task_se``: one per task. ``task_bn``: task batch norm everywhere in the head.
    ``separable``: depthwise-separable convolutions with ReLU6 (ASTMT appendix C, MobileNet).

    Shapes: low (N, C_low, H_l, W_l), high (N, C_high, H_h, W_h) -> (N, channels, H_l, W_l).
    """

    takes_task = True

    def __init__(self, low_channels: int, high_channels: int, channels: int = 256, low_reduced: int = 48,
                 rates: tuple[int, ...] = (6, 12, 18), *, separable: bool = False, se: bool = False,
                 num_tasks: int = 1, task_se: bool = False, task_bn: bool = False) -> None:
        super().__init__()
        opts = {"separable": separable, "num_tasks": num_tasks, "task_bn": task_bn}
        self.aspp = ASPP(high_channels, channels, rates, **opts)
        self.reduce = _conv_block(low_channels, low_reduced, 1, **opts)
        self.fuse1 = _conv_block(channels + low_reduced, channels, 3, **opts)
        self.fuse2 = _conv_block(channels, channels, 3, **opts)
        self.se1 = make_se(channels, num_tasks, task_se) if se else None
        self.se2 = make_se(channels, num_tasks, task_se) if se else None

    @staticmethod
    def _gate(se, x: torch.Tensor, task) -> torch.Tensor:
        if se is None:
            return x
        return se(x, 0 if (se.num_tasks == 1 or task is None) else task)

    def forward(self, low: torch.Tensor, high: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        high = self.aspp(high, task)
        low = self.reduce(low, task)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self._gate(self.se1, self.fuse1(torch.cat([high, low], 1), task), task)
        return self._gate(self.se2, self.fuse2(x, task), task)


class SimpleHead(nn.Module):
    """conv3x3-BN-ReLU then a 1x1 classifier on the coarsest features.

    Shapes: x (N, C_in, H, W) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 256) -> None:
        super().__init__()
        self.block = _conv_block(in_channels, channels, 3)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(x))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to ``size`` (align_corners=False); the tensor itself when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


__all__ += ["resize"]
