"""Dense-prediction heads: DeepLab-v3+ (ASPP and decoder, optionally task-conditioned) and a simple head."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones._blocks import AtrousConv2d, AtrousResidualAdapter, TaskSequential, make_norm
from ..nn import TaskSE
from ..ops._layout import memory_format_of
from ..ops.resize import resize_bilinear

__all__ = ["ASPP", "DeepLabV3PlusDecoder", "SimpleHead"]


class _BlockSE(TaskSE):
    """The SE closing a decoder block: one per task, or one (``num_tasks`` 1) that every task uses."""

    def forward(
        self,
        x: torch.Tensor,
        task: int | torch.Tensor,
        residual: torch.Tensor | None = None,
        relu: bool = False,
    ) -> torch.Tensor:
        return super().forward(x, 0 if self.num_tasks == 1 else task, residual, relu)


def _conv_block(
    cin: int,
    cout: int,
    kernel: int,
    dilation: int = 1,
    *,
    separable: bool = False,
    num_tasks: int = 1,
    task_bn: bool = False,
    se: bool = False,
    task_se: bool = False,
    se_reduction: int = 16,
    adapters: bool = False,
) -> TaskSequential:
    """conv-BN-ReLU; ``separable``: depthwise 3x3-BN-ReLU6 then pointwise 1x1-BN-ReLU6 (the MobileNet decoder).

    ``se``: an SE block after the ReLU (shared, or per task with ``task_se``); ``adapters``: a
    zero-initialised per-task 1x1 convolution beside the convolution, before the batch norm.
    """
    pad = (kernel - 1) // 2 * dilation
    gate = [_BlockSE(cout, num_tasks if task_se else 1, se_reduction)] if se else []
    if separable and kernel > 1:
        if adapters:
            raise ValueError(
                "decoder adapters sit beside plain convolutions, not depthwise-separable ones"
            )
        return TaskSequential(
            nn.Conv2d(cin, cin, kernel, padding=pad, dilation=dilation, groups=cin, bias=False),
            make_norm(cin, num_tasks, task_bn),
            nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False),
            make_norm(cout, num_tasks, task_bn),
            nn.ReLU6(),
            *gate,
        )
    act = nn.ReLU6() if separable else nn.ReLU()
    if adapters:
        conv = AtrousResidualAdapter(cin, cout, num_tasks, dilation=dilation, kernel_size=kernel)
    else:
        conv = AtrousConv2d(cin, cout, kernel, dilation, bias=False)
    return TaskSequential(conv, make_norm(cout, num_tasks, task_bn), act, *gate)


class _SpatialMean(torch.autograd.Function):
    """``x.mean((2, 3), keepdim=True)`` whose gradient takes x's layout.

    The mean's own backward gives an NCHW gradient whatever x's layout. In the ASPP's pooling
    branch it reaches x first, so autograd added the four other branches' channels-last
    gradients into it (mixed layouts, 3.3 ms each on (4, 2048, 16, 16) against 0.3 dense, 2
    threads, the 2-core Zen 4 EPYC) and the ReLU before took the NCHW sum: ASTMT lost 90 ms a
    step there under channels-last.

    Shapes: x (N, C, H, W) -> (N, C, 1, 1).
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.shape, ctx.layout = x.shape, memory_format_of(x)

    @staticmethod
    def backward(ctx, grad):
        hw = ctx.shape[2] * ctx.shape[3]
        return (grad / hw).expand(ctx.shape).contiguous(memory_format=ctx.layout)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3): a 1x1 branch, three 3x3 atrous branches, image pooling.

    The five branches (``channels`` each) are concatenated and projected by conv1x1-BN-ReLU to
    ``channels``. DeepLab's dropout (0.1) after the projection is left out, as in the ASTMT release.
    The image-pooling branch has a batch norm on 1x1 maps: training needs more than one sample
    per task. ``se``, ``task_se``, ``adapters``: as :class:`DeepLabV3PlusDecoder`'s, on every
    branch and the projection (no adapter on the pooling branch, as in the ASTMT release).

    Shapes: x (N, C_in, H, W) -> (N, channels, H, W).
    """

    takes_task = True

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        *,
        separable: bool = False,
        num_tasks: int = 1,
        task_bn: bool = False,
        se: bool = False,
        task_se: bool = False,
        adapters: bool = False,
    ) -> None:
        super().__init__()
        opts = {
            "separable": separable,
            "num_tasks": num_tasks,
            "task_bn": task_bn,
            "se": se,
            "task_se": task_se,
        }
        self.branches = nn.ModuleList(
            [_conv_block(in_channels, channels, 1, adapters=adapters, **opts)]
            + [_conv_block(in_channels, channels, 3, r, adapters=adapters, **opts) for r in rates]
        )
        self.pool = _conv_block(in_channels, channels, 1, **opts)
        self.project = _conv_block(
            channels * (len(rates) + 2), channels, 1, adapters=adapters, **opts
        )

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        outs = [b(x, task) for b in self.branches]
        pooled = self.pool(_SpatialMean.apply(x), task)
        # dense in the branches' layout (a small map): with a stride-0 input torch.cat returns
        # NCHW whatever the others' layout, and the projection's backward then converted
        layout = memory_format_of(outs[0])
        outs.append(pooled.expand(-1, -1, *x.shape[-2:]).contiguous(memory_format=layout))
        return self.project(torch.cat(outs, 1), task)


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLab-v3+ (Chen et al. 2018): ASPP on the coarse features, a ``low_reduced``-channel (48)
    reduction of the low-level ones, concatenation at the low-level resolution, two 3x3 conv-BN-ReLU.

    ASTMT's options (its release's ``ASPPv3Plus``): ``se``: an SE block (reduction 16; 4 on the
    low-level reduction) after the ReLU of every block: the ASPP's five branches and projection,
    the reduction and the two 3x3 blocks; ``task_se``: one per task. ``task_bn``: task batch norm
    everywhere in the head. ``adapters``: a zero-initialised per-task 1x1 convolution beside every
    convolution but the image pooling's. ``separable``: depthwise-separable convolutions with
    ReLU6 (ASTMT appendix C, MobileNet).

    Shapes: low (N, C_low, H_l, W_l), high (N, C_high, H_h, W_h) -> (N, channels, H_l, W_l).
    """

    takes_task = True

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        channels: int = 256,
        low_reduced: int = 48,
        rates: tuple[int, ...] = (6, 12, 18),
        *,
        separable: bool = False,
        se: bool = False,
        num_tasks: int = 1,
        task_se: bool = False,
        task_bn: bool = False,
        adapters: bool = False,
    ) -> None:
        super().__init__()
        opts = {
            "separable": separable,
            "num_tasks": num_tasks,
            "task_bn": task_bn,
            "se": se,
            "task_se": task_se,
            "adapters": adapters,
        }
        self.aspp = ASPP(high_channels, channels, rates, **opts)
        self.reduce = _conv_block(low_channels, low_reduced, 1, se_reduction=4, **opts)
        self.fuse1 = _conv_block(channels + low_reduced, channels, 3, **opts)
        self.fuse2 = _conv_block(channels, channels, 3, **opts)

    def forward(
        self, low: torch.Tensor, high: torch.Tensor, task: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        high = self.aspp(high, task)
        low = self.reduce(low, task)
        high = resize_bilinear(high, low.shape[-2:])
        return self.fuse2(self.fuse1(torch.cat([high, low], 1), task), task)


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
    """Bilinear resize to ``size`` (align_corners=False); the tensor itself when already that size
    (:func:`mtlfast.ops.resize_bilinear`)."""
    return resize_bilinear(x, size)


def resize_prediction(x: torch.Tensor, size) -> torch.Tensor:
    """A prediction resized to the image (:func:`resize`), NCHW whatever x's layout.

    A channels-last network (``train.memory_format``) would otherwise hand the losses and
    metrics channels-last maps at image size, on which cross-entropy forward and backward took
    1.6x the NCHW time ((4, 21, 256, 256), 2 threads, this 2-core EPYC); converting x, 16 times
    smaller than the result at stride 4, costs less than converting the result or the losses'
    extra time. An NCHW x is not copied.

    Shapes: x (N, C, h, w) -> (N, C, size[0], size[1]), contiguous.
    """
    return resize_bilinear(x.contiguous(), size)


__all__ += ["resize", "resize_prediction"]
