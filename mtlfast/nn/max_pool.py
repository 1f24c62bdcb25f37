"""``MaxPool2d``: ``nn.MaxPool2d`` computed by :func:`mtlfast.ops.max_pool2d` where it can be."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.max_pool import max_pool2d


def _one(v) -> bool:
    return v == 1 if isinstance(v, int) else tuple(v) == (1, 1)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, no state) whose 4-d NCHW forward with dilation 1, floor
    mode and no returned indices is :func:`mtlfast.ops.max_pool2d`: the same values and gradients
    as aten's, several times faster on the CPU (see that op), an uint8 window offset kept per
    output for backward instead of an int64 index. Other inputs and options take
    ``nn.MaxPool2d.forward``.

    Shapes: input (N, C, H, W) -> (N, C, H_out, W_out), as ``nn.MaxPool2d``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.dim() == 4
            and _one(self.dilation)
            and not self.ceil_mode
            and not self.return_indices
        ):
            return max_pool2d(input, self.kernel_size, self.stride, self.padding)
        return super().forward(input)
