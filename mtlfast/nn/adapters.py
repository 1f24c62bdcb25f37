"""ASTMT's task-specific parallel residual adapters (Sec. 3.2, Eq. 2) on a shared 3x3 convolution."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops._phases import from_phases, padded_phases, phase_fill
from ..ops.atrous_conv import _use_taps, atrous_conv2d
from ..ops.winograd_conv import (
    _dilated_phases,
    _format,
    _records,
    _winograd_backward,
    conv3x3,
    conv3x3_backward,
    winograd_conv3x3,
)
from ._task import check_task

__all__ = ["ResidualAdapter"]


def _merged(weight: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
    """``weight`` with the 1x1 ``adapter`` added to its centre tap, as one new tensor (adding a
    zero-padded adapter made two as large as the weight: 18 MiB at once for a layer4 3x3 of
    ASTMT's SE-ResNet, then its inference peak). Differentiable (a clone and an in-place add).

    Shapes: weight (C_out, C_in, k, k), k odd; adapter (C_out, C_in, 1, 1) -> (C_out, C_in, k, k).
    """
    k = weight.shape[-1] // 2
    merged = weight.clone()
    merged[:, :, k, k] += adapter[:, :, 0, 0]
    return merged


_MIN_PHASE_SIDE = 8  # see _phased


def _phased(x: torch.Tensor, stride: int, padding: int, dilation: int, k: int) -> bool:
    """Whether a 'same' dilated convolution runs over its dilation x dilation phases
    (:mod:`mtlfast.ops._phases`)."""
    if dilation == 1 or stride != 1 or padding != dilation * (k // 2):
        return False
    h, w = x.shape[-2:]
    # Phases under 8 px a side stay dilated: ASTMT's ASPP rate 6 on 16x16 maps gives 3x3 phases,
    # on which oneDNN's backward took 36.6 ms against the dilated one's 19.5 ((4, 2048, 16, 16)
    # -> 64, channels-last, 2 threads, 2-core Zen 4 EPYC), its training step 0.962x (7
    # alternating rounds), the step's peak the same (355.1 MiB): the dilated buffer is freed
    # before the peak there (at 512x512, 6x6 phases: 0.956x, 1044.6 MiB either way). ASTMT's
    # layer4 (8x8 phases at 256x256) took the same time either way and stays phased (where the
    # autotune measures Winograd's F(2x2, 3x3) faster over them, its forward is phased too).
    if min(-(-h // dilation), -(-w // dilation)) < _MIN_PHASE_SIDE:
        return False
    return phase_fill(h, w, dilation) is not None


class _MergedConv2d(torch.autograd.Function):
    """``conv2d(x, weight + centre(adapter))`` whose backward keeps x and the two parameters only.

    Plain autograd saves the merged weight, a tensor as large as the shared one, for every layer
    until backward (about 40 MiB over the ASTMT release's SE-ResNet-26 with adapters, five tasks);
    here backward rebuilds it. The adapter's gradient is the merged weight's at the centre tap.
    With ``create_graph`` the rebuilt weight and aten's ``convolution_backward`` (which has a
    derivative) record a graph, so the gradient is differentiable again. A dilated 'same'
    convolution whose maps divide into dilation x dilation phases back-propagates over the phases
    as a batch, undilated (:func:`_phased`): the same sums, without oneDNN's large buffer.

    Shapes: x (N, C_in, H, W); weight (C_out, C_in, k, k), k odd; adapter (C_out, C_in, 1, 1).
    """

    @staticmethod
    def forward(x, weight, adapter, stride, padding, dilation, winograd, recorded):
        # recorded: whether autograd records this call (its backward then follows), which the
        # Winograd op cannot see from in here
        merged = _merged(weight, adapter)
        if winograd and _winograd_geometry(weight, stride, padding, dilation):
            return conv3x3(x, merged, None, dilation, recorded)
        return F.conv2d(x, merged, None, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, adapter, stride, padding, dilation, winograd, _ = inputs
        ctx.save_for_backward(x, weight, adapter)
        ctx.options = (stride, padding, dilation)
        ctx.winograd = winograd

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, adapter = ctx.saved_tensors
        stride, padding, dilation = ctx.options
        need_x, need_w, need_a = ctx.needs_input_grad[:3]
        merged = _merged(weight, adapter)
        # under autocast the forward convolved in grad_out's dtype
        dtype = grad_out.dtype
        x_in, grad_in = x.to(dtype), grad_out
        # Winograd's backward has no derivative of its own: a create_graph backward takes aten's
        winograd = (
            ctx.winograd
            and not torch.is_grad_enabled()
            and _winograd_geometry(weight, stride, padding, dilation)
        )
        if winograd and dilation == 1:
            grad_x, grad_merged = conv3x3_backward(
                grad_out, x_in, merged.to(dtype), need_x, need_w or need_a, recorded=True
            )
            return _merged_grads(x, weight, grad_x, grad_merged, need_w, need_a)
        # a dilated one whose forward took Winograd over the phases: its adjoint, over them too
        plan = _dilated_phases(x_in, merged.to(dtype), dilation) if winograd else None
        if plan is not None and plan[1]:
            h, w = x.shape[-2:]
            grad_in = padded_phases(grad_in, dilation, phase_fill(h, w, dilation))
            grad_x, grad_merged, _ = _winograd_backward(
                grad_in.contiguous(), plan[0], merged.to(dtype), False, plan[1]
            )
            grad_x = from_phases(grad_x, dilation)[..., :h, :w]
            grad_x = grad_x.contiguous(memory_format=_format(x))
            return _merged_grads(x, weight, grad_x, grad_merged, need_w, need_a)
        # oneDNN's weight gradient of a dilated convolution takes a large buffer (81 MiB for
        # ASTMT's layer4, (4, 512, 16, 16) at dilation 2, then its training step's peak; 72 MiB
        # for its ASPP's rate 6 at 16x16); over the phases it is an undilated one: 9 and 10 MiB,
        # and no slower (rate 6, padded to 18x18: 72 against 84 ms; AVX2, 2 threads)
        phased = _phased(x, stride, padding, dilation, weight.shape[-1])
        if phased:
            h, w = x.shape[-2:]
            fill = phase_fill(h, w, dilation)
            x_in, grad_in = (padded_phases(t, dilation, fill) for t in (x_in, grad_in))
            padding, dilation = padding // dilation, 1
        grad_x, grad_merged, _ = torch.ops.aten.convolution_backward(
            grad_in,
            x_in,
            merged.to(dtype),
            None,
            [stride] * 2,
            [padding] * 2,
            [dilation] * 2,
            False,
            [0, 0],
            1,
            [need_x, need_w or need_a, False],
        )
        if grad_x is not None and phased:
            grad_x = from_phases(grad_x, ctx.options[2])[..., :h, :w]
            grad_x = grad_x.contiguous(memory_format=_format(x))
        return _merged_grads(x, weight, grad_x, grad_merged, need_w, need_a)


def _winograd_geometry(weight: torch.Tensor, stride: int, padding: int, dilation: int) -> bool:
    """A 3x3 'same' convolution (dilated ones too: :func:`mtlfast.ops.winograd_conv3x3`)."""
    return weight.shape[-1] == 3 and stride == 1 and padding == dilation


def _merged_grads(x, weight, grad_x, grad_merged, need_w, need_a):
    """_MergedConv2d.backward's return: x's gradient, and the shared weight's and the adapter's
    from the merged weight's (the adapter's is its centre tap)."""
    grad_w = grad_a = None
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    if grad_merged is not None:
        grad_merged = grad_merged.to(weight.dtype)
        if need_a:
            k = weight.shape[-1] // 2
            grad_a = grad_merged[:, :, k : k + 1, k : k + 1]
        if need_w:
            grad_w = grad_merged
    return grad_x, grad_w, grad_a, None, None, None, None, None


def merged_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    adapter: torch.Tensor,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    winograd: bool = False,
) -> torch.Tensor:
    """``conv2d(x, weight + adapter at the centre tap)``, the merged weight not kept for backward.
    With ``winograd``, a 3x3 stride-1 'same' one runs by :func:`mtlfast.ops.winograd_conv3x3`
    (a dilated one over its phases, where that pays; forward and backward; a ``create_graph``
    backward by aten).

    Shapes: x (N, C_in, H, W); weight (C_out, C_in, k, k), k odd; adapter (C_out, C_in, 1, 1);
    output (N, C_out, H', W') as ``F.conv2d`` gives with these options.

    A dilated 'same' convolution whose off-centre taps mostly read padding (DeepLab's ASPP rates
    at small maps) goes to :func:`mtlfast.ops.atrous_conv2d` with the merged weight, which keeps
    only its taps' C_out x C_in copies for backward.
    """
    k = weight.shape[-1]
    if stride == 1 and padding == dilation * (k // 2) and _use_taps(x, k, dilation):
        return atrous_conv2d(x, _merged(weight, adapter), dilation)
    recorded = _records(x, weight, adapter)
    return _MergedConv2d.apply(x, weight, adapter, stride, padding, dilation, winograd, recorded)


class ResidualAdapter(nn.Module):
    """A shared 3x3 convolution plus the 1x1 convolution of each sample's task: ``L(x) + RA_t(x)``.

    Both convolutions have no bias, the 3x3 one padding 1; they share the stride. The adapters
    start at zero, so the layer starts as the shared convolution alone.

    An int task runs one 3x3 convolution whose weight is the shared one with task t's adapter
    added to its centre tap: the two are linear in x and, with padding 1, the centre tap reads
    exactly the pixels the strided 1x1 convolution reads. The merged weight is not kept for
    backward, which rebuilds it (double backward included). A task vector runs the shared
    convolution on the batch and adds each sample's adapter as one batched matrix product over
    the gathered adapter weights, without grouping the batch; beyond the range check of the task
    vector, which runs in eager mode only, it reads no task value back to the host, so it
    compiles into one graph.

    Args:
        in_channels, out_channels: C_in, C_out.
        num_tasks: T >= 1.
        stride: of both convolutions.

    Shapes:
        x: (N, C_in, H, W); task: an int (the whole batch) or (N,) int64 (per sample).
        output: (N, C_out, ceil(H / stride), ceil(W / stride)).

    ``winograd`` (False; :func:`mtlfast.nn.use_winograd` sets it) runs a stride-1 layer's 3x3
    convolution by :func:`mtlfast.ops.winograd_conv3x3` (which falls back to ``F.conv2d`` where
    that does not pay).

    ``conv`` is the shared ``nn.Conv2d``; ``adapter_weight`` (T, C_out, C_in, 1, 1) stacks the
    adapters, row t being the weight of task t's ``nn.Conv2d(C_in, C_out, 1, bias=False)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_tasks: int, stride: int = 1
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("num_tasks", num_tasks),
            ("stride", stride),
        ):
            if value < 1:
                raise ValueError(f"ResidualAdapter: {name} must be >= 1, got {value}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_tasks = num_tasks
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.winograd = False  # mtlfast.nn.use_winograd sets it
        self.adapter_weight = nn.Parameter(torch.zeros(num_tasks, out_channels, in_channels, 1, 1))

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.zeros_(self.adapter_weight)

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"ResidualAdapter: x must have shape (N, C_in={self.in_channels}, H, W), got {got}"
            )
        task = check_task("ResidualAdapter", task, x, self.num_tasks)
        if isinstance(task, int):
            weight, adapter = self.conv.weight, self.adapter_weight[task]
            return merged_conv2d(x, weight, adapter, self.stride, winograd=self.winograd)
        if self.winograd and self.stride == 1:
            shared = winograd_conv3x3(x, self.conv.weight)
        else:
            shared = F.conv2d(x, self.conv.weight, stride=self.stride, padding=1)
        n, _, h, w = shared.shape
        sampled = x[:, :, :: self.stride, :: self.stride].reshape(n, self.in_channels, h * w)
        adapters = self.adapter_weight.flatten(2)[task]
        return torch.baddbmm(shared.reshape(n, self.out_channels, h * w), adapters, sampled).view(
            shared.shape
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"num_tasks={self.num_tasks}, stride={self.stride}"
        )
