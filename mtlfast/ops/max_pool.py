"""``max_pool2d``: max pooling of NCHW maps, ``F.max_pool2d`` (dilation 1, floor mode) made fast.

aten's CPU max pooling of a contiguous NCHW tensor visits each output's window in scalar code:
on a 2-core Xeon (AVX512, 2 threads) the ResNet stem's 3x3 stride-2 pooling of (4, 64, 128, 128)
took 27 ms forward and VGG-16's of (4, 64, 256, 256) 119 ms, several times aten's own
channels-last kernel, and it keeps an int64 index per output for backward (8 bytes where the
value takes 4). The C++ kernel here pools each plane separably, vector lanes over columns: each
input row's maxima over the window's columns, then each output row's maximum over the window's
rows of those (7.8 and 25 ms on the same shapes; with backward 9.2 against 26 ms and 42 against
101; ``benchmarks/bench_norm_pool.py``). For backward it keeps each maximum's position in its window as one
uint8 (1/8 of aten's indices); ties and NaN go where aten sends them (the first maximum in
row-major window order, the last NaN), so values and gradients equal aten's exactly.

Channels-last inputs (aten's vectorised kernel is fast there), other dtypes than float32 and
float64, dilation, ``ceil_mode``, windows of more than 255 positions, other devices,
``use_backend("reference")``, ``torch.compile`` (inductor lowers aten's op itself) and builds
without the extension take ``F.max_pool2d``. A
``create_graph`` backward is a scatter-add of plain PyTorch, so double backward works.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import _extension
from .backends import current_backend

__all__ = ["max_pool2d"]

OP = "max_pool2d"


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{OP}: {name} must be an int or a pair of ints, got {value!r}")


_pool = torch.library.custom_op(
    "mtlfast::max_pool2d",
    lambda x, kernel, stride, padding: _extension.kernels(OP).max_pool2d(
        x, kernel, stride, padding
    ),
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor x, int[] kernel, int[] stride, int[] padding) -> (Tensor, Tensor)",
)


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


@_pool.register_fake
def _(x, kernel, stride, padding):
    n, c, h, w = x.shape
    shape = (n, c) + tuple(_out_size(v, *a) for v, a in zip((h, w), zip(kernel, stride, padding)))
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


_pool_backward = torch.library.custom_op(
    "mtlfast::max_pool2d_backward",
    lambda grad, offsets, input_size, kernel, stride, padding: _extension.kernels(
        OP
    ).max_pool2d_backward(grad, offsets, input_size, kernel, stride, padding),
    mutates_args=(),
    device_types="cpu",
    schema=(
        "(Tensor grad, Tensor offsets, int[] input_size, int[] kernel, int[] stride,"
        " int[] padding) -> Tensor"
    ),
)


@_pool_backward.register_fake
def _(grad, offsets, input_size, kernel, stride, padding):
    return grad.new_empty((*grad.shape[:2], *input_size))


def _flat_indices(offsets: torch.Tensor, width: int, kernel, stride, padding) -> torch.Tensor:
    """Each output's input pixel, y * W + x, from its window offset: aten's pooling indices."""
    oh, ow = offsets.shape[-2:]
    off = offsets.long()
    y = torch.arange(oh, device=off.device).view(-1, 1) * stride[0] - padding[0]
    x = torch.arange(ow, device=off.device).view(1, -1) * stride[1] - padding[1]
    return (y + off // kernel[1]) * width + (x + off % kernel[1])


def _setup_context(ctx, inputs, output) -> None:
    x, kernel, stride, padding = inputs
    ctx.geometry = (list(x.shape[-2:]), list(kernel), list(stride), list(padding))
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad, _grad_offsets):
    (offsets,) = ctx.saved_tensors
    size, kernel, stride, padding = ctx.geometry
    if torch.is_grad_enabled():  # create_graph: a scatter-add, whose derivative is a gather
        n, c = grad.shape[:2]
        index = _flat_indices(offsets, size[1], kernel, stride, padding).reshape(n * c, -1)
        grad_x = grad.new_zeros((n * c, size[0] * size[1]))
        grad_x = grad_x.scatter_add(1, index, grad.reshape(n * c, -1))
        return grad_x.view(n, c, *size), None, None, None
    return (
        _pool_backward(grad.contiguous(), offsets, size, kernel, stride, padding),
        None,
        None,
        None,
    )


_pool.register_autograd(_backward, setup_context=_setup_context)


def _use_kernel(x: torch.Tensor, kernel, stride, padding) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        # under torch.compile aten's op, which inductor lowers (and fuses) itself
        and not torch.compiler.is_compiling()
        and current_backend() != "reference"
        and not (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        and kernel[0] * kernel[1] <= 255
        and x.numel() > 0
        and _extension.has_extension()
    )


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, ``ceil_mode=False``), exactly.

    ``kernel_size``, ``stride`` (default: ``kernel_size``) and ``padding`` are ints or (rows,
    columns) pairs; padding at most half the kernel, as aten requires.

    Shapes: x (N, C, H, W) -> (N, C, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{OP}: x must be a 4-d tensor (N, C, H, W), got {got}")
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(
            f"{OP}: kernel_size and stride must be positive and padding non-negative, got "
            f"kernel_size={kernel}, stride={stride}, padding={padding}"
        )
    if 2 * padding[0] > kernel[0] or 2 * padding[1] > kernel[1]:
        raise ValueError(
            f"{OP}: padding must be at most half of kernel_size, got {padding} for {kernel}"
        )
    if x.shape[2] + 2 * padding[0] < kernel[0] or x.shape[3] + 2 * padding[1] < kernel[1]:
        raise ValueError(
            f"{OP}: the padded input {(x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1])} "
            f"is smaller than kernel_size {kernel}"
        )
    if not _use_kernel(x, kernel, stride, padding):
        return F.max_pool2d(x, kernel, stride, padding)
    return _pool(x, list(kernel), list(stride), list(padding))[0]
