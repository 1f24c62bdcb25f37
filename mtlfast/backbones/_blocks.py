"""Building blocks shared by the backbones: task-aware containers, norms, SE, atrous adapters."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import ResidualAdapter, TaskBatchNorm2d, TaskSE
from ..nn._task import check_task
from ..nn.adapters import merged_conv2d
from ..nn.rebuilt_norm import norm_rebuilt, rebuilding_norms
from ..ops import atrous_conv2d, current_backend
from ..ops._layout import memory_format_of

__all__ = [
    "AtrousConv2d",
    "AtrousResidualAdapter",
    "TaskSequential",
    "call",
    "make_norm",
    "make_se",
    "norm",
    "norm_for_next",
    "relu",
    "run_se",
    "takes_task",
]


def takes_task(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes ``(x, task)``: the task-conditioned layers and containers."""
    return isinstance(module, (TaskBatchNorm2d, TaskSE, ResidualAdapter)) or getattr(
        module, "takes_task", False
    )


def call(module: nn.Module, x: torch.Tensor, task: int | torch.Tensor | None) -> torch.Tensor:
    """``module(x, task)`` for a task-conditioned module (task None meaning task 0), else ``module(x)``."""
    if takes_task(module):
        return module(x, 0 if task is None else task)
    return module(x)


def _in_place_ok(y: torch.Tensor) -> bool:
    """Whether a block may overwrite ``y``, a map it made itself: only in inference (autograd
    off: nothing saved ``y`` for backward) and for float32/64 (a lower precision would round the
    normalisation twice); not while compiling (the storage checks are eager-only, and a compiled
    graph plans its own buffers)."""
    return (
        not torch.is_grad_enabled()
        and y.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )


def norm(bn: nn.Module, y: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
    """``call(bn, y, task)`` for a batch norm; in inference with ``bn`` in eval mode, applied in
    place to ``y``, a map the caller made and reads no more (the releases' in-place layers): its
    running statistics' affine map ``y * scale + shift``, which aten's evaluation kernel computes
    too, one map fewer alive (ASTMT's inference peak, at 256x256 batch 4, was three 16 MiB maps
    of a layer1 block at once). A per-sample task vector, batch statistics or another module:
    ``call``.

    Shapes: y (N, C, H, W) -> (N, C, H, W), ``y`` itself when done in place.
    """
    if bn.training or not _in_place_ok(y):
        return call(bn, y, task)
    if isinstance(bn, TaskBatchNorm2d) and isinstance(task, int):
        mean, var = bn.running_mean[task], bn.running_var[task]
        weight, bias = bn.weight[task], bn.bias[task]
    elif isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
        mean, var, weight, bias = bn.running_mean, bn.running_var, bn.weight, bn.bias
    else:
        return call(bn, y, task)
    scale = torch.rsqrt(var.to(y.dtype) + bn.eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return y.mul_(scale[:, None, None]).add_(shift[:, None, None])


def norm_for_next(
    bn: nn.Module, y: torch.Tensor, task: int | torch.Tensor | None, with_relu: bool = False
) -> tuple[torch.Tensor, contextlib.AbstractContextManager]:
    """``relu(norm(bn, y, task))`` (without the ReLU unless ``with_relu``) and the context in
    which the layer that reads it runs: under :func:`mtlfast.nn.rebuilt_norm.rebuild_norms`
    (with autograd) the output is rebuilt in backward from ``y`` rather than kept
    (:func:`~mtlfast.nn.rebuilt_norm.norm_rebuilt`); otherwise :func:`norm`, :func:`relu` and
    no context.

    Shapes: y (N, C, H, W) -> (N, C, H, W)."""
    made = norm_rebuilt(bn, y, task, with_relu)
    if made is not None:
        return made
    out = norm(bn, y, task)
    return (relu(out) if with_relu else out), contextlib.nullcontext()


def relu(y: torch.Tensor) -> torch.Tensor:
    """``torch.relu(y)``, in place in inference (:func:`norm`'s conditions: ``y`` the caller's own)."""
    return y.relu_() if _in_place_ok(y) else torch.relu(y)


class TaskSequential(nn.Sequential):
    """nn.Sequential whose forward passes an optional ``task`` to the children that take one.

    In inference a batch norm or ReLU child whose input its previous child made (not the
    container's input, nor a view of it) runs in place (:func:`norm`, :func:`relu`). With
    autograd under :func:`mtlfast.nn.rebuilt_norm.rebuild_norms`, a batch norm followed by a
    ``nn.ReLU`` and another child (a decoder block's SE) has its output rebuilt in backward
    (:func:`norm_for_next`, the third child running in its context).

    Shapes: x (N, C, H, W); task None, an int or (N,) int64; output as the last child's.
    """

    takes_task = True

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        given = x.untyped_storage().data_ptr() if _in_place_ok(x) else None
        children = list(self)
        rebuild = torch.is_grad_enabled() and rebuilding_norms()
        i = 0
        while i < len(children):
            module = children[i]
            own = given is not None and i > 0 and x.untyped_storage().data_ptr() != given
            is_norm = isinstance(module, (nn.BatchNorm2d, TaskBatchNorm2d))
            if rebuild and is_norm and i + 2 < len(children) and type(children[i + 1]) is nn.ReLU:
                x, keep = norm_for_next(module, x, task, with_relu=True)
                with keep:
                    x = call(children[i + 2], x, task)
                i += 3
                continue
            if own and is_norm:
                x = norm(module, x, task)
            elif own and isinstance(module, nn.ReLU):
                x = relu(x)
            else:
                x = call(module, x, task)
            i += 1
        return x


def make_norm(channels: int, num_tasks: int = 1, task_bn: bool = False) -> nn.Module:
    """``nn.BatchNorm2d(channels)``, or a :class:`TaskBatchNorm2d` over ``num_tasks`` when ``task_bn``."""
    return TaskBatchNorm2d(channels, num_tasks) if task_bn else nn.BatchNorm2d(channels)


def make_se(
    channels: int, num_tasks: int = 1, task_se: bool = False, reduction: int = 16
) -> TaskSE:
    """A squeeze-and-excitation block: shared (one TaskSE task, used by every task) or one per task."""
    return TaskSE(channels, num_tasks if task_se else 1, reduction)


def run_se(
    se: TaskSE,
    x: torch.Tensor,
    task: int | torch.Tensor | None,
    residual: torch.Tensor,
    relu: bool = True,
) -> torch.Tensor:
    """``relu(se(x) + residual)`` with the SE of ``task`` (the shared one when the SE has one task)."""
    if se.num_tasks == 1 or task is None:
        task = 0
    return se(x, task, residual=residual, relu=relu)


class _Subsample(torch.autograd.Function):
    """``x[..., ::sy, ::sx]`` whose gradient takes x's layout.

    The slice's own backward scatters into an NCHW zero map whatever x's layout; under
    channels-last autograd then adds it to x's other, channels-last gradient, a mixed-layout
    addition 6.7 ms against 0.5 ms dense ((4, 256, 64, 64), 2 threads, the 2-core Zen 4 EPYC):
    ASTMT's stride-2 first blocks took 70 ms a step in them.

    Shapes: x (N, C, H, W) -> (N, C, ceil(H / sy), ceil(W / sx)), a view.
    """

    @staticmethod
    def forward(x: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
        return x[..., ::sy, ::sx]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.sy, ctx.sx = inputs
        ctx.shape, ctx.layout = x.shape, memory_format_of(x)

    @staticmethod
    def backward(ctx, grad):
        grad_x = torch.empty(
            ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout
        ).zero_()
        grad_x[..., :: ctx.sy, :: ctx.sx] = grad
        return grad_x, None, None


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (no padding, no groups) whose stride subsamples the input first:
    ``conv1x1(x[:, :, ::s, ::s])``, the same products and sums as the strided convolution.

    Why: on the CPU aten's (oneDNN's) input gradient of a strided convolution is slow. For the
    1x1 stride-2 convolutions of a ResNet's first blocks (ASTMT's SE-ResNet puts its stride
    there, and every ResNet's projection shortcut) forward and backward at (4, 256, 64, 64) took
    35 ms against 12 ms this way (256 -> 128 channels; 49 against 23 ms to 512), on a 2-core
    Xeon with 2 threads: the slice's backward scatters into a zero map, which costs less than
    oneDNN's strided backward-data. Stride 1, other devices and ``use_backend("reference")``
    call ``nn.Conv2d`` itself.

    Shapes: as ``nn.Conv2d``'s; its parameters and state-dict keys are ``nn.Conv2d``'s.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sy, sx = self.stride
        if (sy, sx) == (1, 1) or x.device.type != "cpu" or current_backend() == "reference":
            return super().forward(x)
        return F.conv2d(_Subsample.apply(x, sy, sx), self.weight, self.bias)


class AtrousConv2d(nn.Conv2d):
    """``nn.Conv2d`` (stride 1, 'same' padding, dilation d, no groups) through
    :func:`mtlfast.ops.atrous_conv2d`, which skips the taps that read padding only where the
    dilation is large against the map (DeepLab's ASPP rates and VGG's fc6 at small maps).

    Shapes: as ``nn.Conv2d``'s; its parameters and state-dict keys are ``nn.Conv2d``'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        pad = dilation * (kernel_size // 2)
        super().__init__(
            in_channels, out_channels, kernel_size, padding=pad, dilation=dilation, bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return atrous_conv2d(x, self.weight, self.dilation[0], self.bias)


class AtrousResidualAdapter(ResidualAdapter):
    """:class:`mtlfast.nn.ResidualAdapter` on a dilated 3x3 (or a 1x1) convolution.

    With dilation 1 and ``kernel_size`` 3 it is the parent layer. With dilation d the shared
    convolution is ``conv3x3(x, dilation=d, padding=d)``; the adapter is still a 1x1 convolution,
    which reads the same pixel as the centre tap, so an int task still folds it into the centre
    tap (the merged weight, as the parent's, not kept for backward). ``kernel_size`` 1 puts a
    task's 1x1 adapter beside a shared 1x1 convolution (the ASTMT release's decoder adapters);
    an int task then adds the two weights. DeepLab's dilated stages have stride 1, the only case
    the per-sample path needs beyond the parent's. With ``winograd`` (:func:`mtlfast.nn.use_winograd`)
    an int task's dilated 3x3 convolution runs by Winograd over its phases where that pays
    (:func:`mtlfast.ops.winograd_conv3x3`). Where the dilation is large against the map
    (the ASPP's rates 12 and 18 at 16x16), :func:`mtlfast.ops.atrous_conv2d` skips the taps that
    read padding only.

    Shapes: as :class:`mtlfast.nn.ResidualAdapter`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_tasks: int,
        stride: int = 1,
        dilation: int = 1,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(in_channels, out_channels, num_tasks, stride)
        if dilation < 1:
            raise ValueError(f"AtrousResidualAdapter: dilation must be >= 1, got {dilation}")
        if kernel_size not in (1, 3):
            raise ValueError(
                f"AtrousResidualAdapter: kernel_size must be 1 or 3, got {kernel_size}"
            )
        self.dilation, self.kernel_size = dilation, kernel_size
        self.padding = dilation * (kernel_size // 2)
        if dilation > 1 or kernel_size != 3:
            self.conv = nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=self.padding,
                dilation=dilation,
                bias=False,
            )

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if self.dilation == 1 and self.kernel_size == 3:
            return super().forward(x, task)
        task = check_task("AtrousResidualAdapter", task, x, self.num_tasks)
        opts = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        if isinstance(task, int):
            return merged_conv2d(
                x, self.conv.weight, self.adapter_weight[task], **opts, winograd=self.winograd
            )
        if self.stride == 1:
            shared = atrous_conv2d(x, self.conv.weight, self.dilation)
        else:
            shared = F.conv2d(x, self.conv.weight, **opts)
        n, _, h, w = shared.shape
        sampled = x[:, :, :: self.stride, :: self.stride].reshape(n, self.in_channels, h * w)
        adapters = self.adapter_weight.flatten(2)[task]
        return torch.baddbmm(shared.reshape(n, self.out_channels, h * w), adapters, sampled).view(
            shared.shape
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dilation={self.dilation}, kernel_size={self.kernel_size}"
