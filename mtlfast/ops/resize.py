"""``resize_bilinear``: bilinear resizing (align_corners=False) as two small matrix products.

Bilinear resizing is separable and linear: ``out = A_h @ x @ A_w^T`` with ``A_h`` (h, H) and
``A_w`` (w, W) the interpolation matrices that aten's ``upsample_bilinear2d`` applies implicitly
(two taps per row, the same weights and the same clamping at the borders). On the CPU aten's
kernel is scalar gather/scatter code: at MTI-Net's sizes its backward (a scatter-add of every
output pixel into four input pixels) costs 35-40 ms for a (4, 21, 64, 64) -> 256x256 prediction
and the forward 11-17 ms, against 4-8 ms each as two BLAS products (1 thread, this 2-core EPYC).
The products do more arithmetic (a dense row of H or W weights per output, not two), so they win
only while the contracted sides are short: past :data:`_MAX_IN` input or :data:`_MAX_OUT` output
pixels a side, aten is used.

Nothing is saved for the backward: the gradient is ``A_h^T @ grad @ A_w``, the adjoint. Results
equal ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` to float rounding (the
sums run in another order). On other devices, for other dtypes, for long sides and under
``use_backend("reference")`` (so that a release-style network can be timed with aten's own
kernel) the call is ``F.interpolate`` itself.

A channels-last x is contracted over its (N, H, W, C) storage (batched products over the rows
of the other side), so that a channels-last network (``train.memory_format``) pays no layout
conversion here: the result, and the gradient of x, come in x's layout, as aten's kernel gives.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from .backends import current_backend

__all__ = ["resize_bilinear"]

# Sides up to these lengths are contracted as dense products; longer ones go to aten. Measured
# with benchmarks/resize_crossover.py (1 thread, this 2-core EPYC, two runs on a busy machine):
# from inputs of 64 pixels a side to outputs of 256 the products win forward+backward (2.0-7.0x)
# and forward in all but one case of one run ((4, 21, 64, 64) -> 256: 1.57x, then 0.89x); from
# 128 to 256 the forward loses (0.79x, 0.87x), and a 256 -> 128 downsampling loses both ways.
_MAX_IN = 64
_MAX_OUT = 256
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): row o holds aten's two weights for output o (align_corners=False, no
    antialiasing): source ``(o + 0.5) * n_in / n_out - 0.5`` clamped at 0, its floor and the next
    index clamped at n_in - 1, weights ``1 - frac`` and ``frac``."""
    scale = n_in / n_out
    o = torch.arange(n_out, dtype=torch.float64)
    src = ((o + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((o.long(), i0), 1.0 - frac, accumulate=True)
    a.index_put_((o.long(), i1), frac, accumulate=True)
    return a.to(dtype=dtype, device=device)


def _apply(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """``a_h @ x @ a_w^T`` over the last two dims of x (N, C, H, W), contracting first the side
    whose product is cheaper (fewer multiply-adds in total)."""
    h_out, h_in = a_h.shape
    w_out, w_in = a_w.shape
    width_first = h_in * w_in * w_out + h_out * h_in * w_out
    height_first = h_out * h_in * w_in + h_out * w_in * w_out
    if width_first <= height_first:
        return torch.matmul(a_h, torch.matmul(x, a_w.t()))
    return torch.matmul(torch.matmul(a_h, x), a_w.t())


def _is_channels_last(x: torch.Tensor) -> bool:
    """x is dense channels-last and not also contiguous (C = 1, or 1x1 maps, are both)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _apply_channels_last(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """:func:`_apply` for a channels-last x, over its (N, H, W, C) storage: the height product
    contracts (N, H, W*C) rows, the width product (N*H, W, C) blocks, so neither x nor the result
    is copied to another layout. The result is channels-last."""
    n, c, h_in, w_in = x.shape
    h_out, w_out = a_h.shape[0], a_w.shape[0]
    nhwc = x.permute(0, 2, 3, 1)  # contiguous
    width_first = h_in * w_in * w_out + h_out * h_in * w_out
    height_first = h_out * h_in * w_in + h_out * w_in * w_out
    if width_first <= height_first:
        y = torch.matmul(a_w, nhwc)  # (N, H, w, C)
        out = torch.matmul(a_h, y.view(n, h_in, w_out * c)).view(n, h_out, w_out, c)
    else:
        y = torch.matmul(a_h, nhwc.view(n, h_in, w_in * c)).view(n, h_out, w_in, c)
        out = torch.matmul(a_w, y)  # (N, h, w, C)
    return out.permute(0, 3, 1, 2)


def _apply_any(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """:func:`_apply` in x's memory format: channels-last in, channels-last out. A tensor with
    channels innermost but not dense (a channel slice of a channels-last one: the gradient of a
    concatenation's part) is copied to channels-last, not to NCHW."""
    if not _is_channels_last(x) and not x.is_contiguous() and x.shape[1] > 1 and x.stride(1) == 1:
        x = x.contiguous(memory_format=torch.channels_last)
    return _apply_channels_last(x, a_h, a_w) if _is_channels_last(x) else _apply(x, a_h, a_w)


class _ResizeBilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        a_h = _matrix(x.shape[-2], size[0], x.dtype, x.device)
        a_w = _matrix(x.shape[-1], size[1], x.dtype, x.device)
        ctx.matrices = (a_h, a_w)  # cached constants, not activations: nothing else is kept
        ctx.channels_last = _is_channels_last(x)
        return _apply_any(x, a_h, a_w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a_h, a_w = ctx.matrices
        with torch.autocast(grad.device.type, enabled=False):
            out = _apply_any(grad.to(a_h.dtype), a_h.t(), a_w.t())
        # in x's layout, as the layers before it (and a leaf's .grad) take it: a copy only when
        # the gradient came in the other one, and then of the smaller side (upsampling's input)
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=fmt), None


def _use_products(x: torch.Tensor, size: tuple[int, int]) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and current_backend() != "reference"
        and max(x.shape[-2], x.shape[-1]) <= _MAX_IN
        and max(size) <= _MAX_OUT
        and x.numel() > 0
    )


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of x (N, C, H, W) to (N, C, size[0], size[1]), ``align_corners=False``.

    ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` to float rounding, computed
    as two matrix products on the CPU (see the module docstring); x itself when already that size.
    Under autocast the products run in x's dtype, as aten's kernel does. A channels-last x gives
    a channels-last result (and gradient), as aten's kernel does, without a copy to NCHW.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"resize_bilinear: x must be a 4-d tensor (N, C, H, W), got {got}")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"resize_bilinear: size must be two positive ints, got {tuple(size)}")
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if not _use_products(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    with torch.autocast("cpu", enabled=False):
        return _ResizeBilinear.apply(x, size)
