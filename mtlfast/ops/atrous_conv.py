"""``atrous_conv2d``: a dilated 'same' convolution that skips the taps that only read padding.

A k x k convolution with dilation d and padding ``d * (k // 2)`` reads, for the tap at offset
``(dy, dx)`` (multiples of d), the input pixel ``(y + dy, x + dx)``. When d is large against the
map, most of those pixels are the zero padding: DeepLab's ASPP at output stride 16 runs rates
6, 12 and 18 on the 16x16 features of a 256x256 image, where the rate-18 taps off the centre
read padding only (the convolution is a 1x1 convolution with the centre tap) and the rate-12
ones read image pixels on 4 of 16 rows or columns. aten still computes every tap everywhere,
and oneDNN's weight gradient of such a convolution takes a large buffer (72 MiB for ASTMT's
2048 -> 64 channels at batch 4).

Here each tap that reads any image pixel is a 1x1 convolution over the output window where it
does, added into that window; the centre tap covers the whole map. The result is the
convolution's to float rounding (the same products, summed in another order: the skipped ones
are products with zeros). The decomposition runs only where it pays, when the taps' windows
cover at most :data:`_MAX_COVER` of the k*k full maps (at 16x16: rate 12 0.25, rate 18 0.11,
rate 6 0.56, which stays one convolution; a 3x3 with dilation 2 at 16x16 0.77); otherwise,
under ``use_backend("reference")`` and off the CPU the call is ``F.conv2d`` itself (stride 1,
no groups: the only convolutions this function takes). In eager autograd a
``torch.autograd.Function`` (:class:`_Taps`) runs the taps and writes their gradients into one
gradient of x, in x's layout, and one of the weight (autograd over the taps as plain ops zeroed
and added a full-size gradient per tap, and turned a channels-last x's gradient NCHW: forward
and backward of ASTMT's rate 12, (4, 2048, 16, 16) -> 64 channels, 2 threads, on a 2-core Zen
5 EPYC, median of 16 alternating: NCHW 31.0 against 39.1 ms, channels-last 24.9 against
40.6); its backward is differentiable (``create_graph``, as ASTMT's adversarial term needs) and
takes autocast's dtypes. Under torch.compile, functorch transforms, dispatch modes and tensor
subclasses the same taps run as plain autograd ops. The tap weights are copied out of
``weight`` (C_out x C_in each), so a weight built on the fly (an adapter merged into it) is not
kept alive for backward.

Timed on a 2-core AVX2 EPYC (2 threads, (4, 2048, 16, 16) -> 64 channels, forward and backward,
median of 5): rate 18 0.160 -> 0.016 s, rate 12 0.193 -> 0.086 s; rate 6 0.150 s as one
convolution against 0.192 s in taps, hence the threshold.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from ._dispatch import _route
from ._layout import memory_format_of as _layout
from .backends import current_backend

__all__ = ["atrous_conv2d"]

# Decompose only when the taps' output windows add up to at most this share of k*k full maps.
_MAX_COVER = 0.4


def _window(offset: int, size: int) -> tuple[int, int]:
    """Output rows (or columns) [lo, hi) whose input row ``i + offset`` lies inside [0, size)."""
    return max(0, -offset), min(size, size - offset)


@functools.lru_cache(maxsize=256)
def _taps(k: int, dilation: int, h: int, w: int) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """(ky, kx, y0, y1, x0, x1) of every tap that reads an image pixel, with its output window."""
    taps = []
    for ky in range(k):
        y0, y1 = _window((ky - k // 2) * dilation, h)
        for kx in range(k):
            x0, x1 = _window((kx - k // 2) * dilation, w)
            if y1 > y0 and x1 > x0:
                taps.append((ky, kx, y0, y1, x0, x1))
    return tuple(taps)


@functools.lru_cache(maxsize=256)
def _cover(k: int, dilation: int, h: int, w: int) -> float:
    """The taps' output windows as a share of k*k full maps: the arithmetic the taps path does."""
    area = sum((y1 - y0) * (x1 - x0) for _, _, y0, y1, x0, x1 in _taps(k, dilation, h, w))
    return area / (k * k * h * w)


def _use_taps(x: torch.Tensor, k: int, dilation: int) -> bool:
    return (
        x.device.type == "cpu"
        and current_backend() != "reference"
        and k > 1
        and x.shape[-2] * x.shape[-1] > 0
        and _cover(k, dilation, x.shape[-2], x.shape[-1]) <= _MAX_COVER
    )


def atrous_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    dilation: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation)``, stride 1.

    Taps that read only padding are skipped where that saves most of the arithmetic (see the
    module docstring); the result equals the convolution to float rounding, in x's memory format.

    Shapes: x (N, C_in, H, W); weight (C_out, C_in, k, k), k odd; bias (C_out,) or None;
    output (N, C_out, H, W).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"atrous_conv2d: x must be a 4-d tensor (N, C_in, H, W), got {got}")
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 4
        or weight.shape[1] != x.shape[1]
        or weight.shape[2] != weight.shape[3]
        or weight.shape[2] % 2 == 0
    ):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"atrous_conv2d: weight must have shape (C_out, C_in={x.shape[1]}, k, k) with k odd, "
            f"got {got}"
        )
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"atrous_conv2d: dilation must be an int >= 1, got {dilation!r}")
    k = weight.shape[-1]
    if not _use_taps(x, k, dilation):
        return F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation)
    windows = _windows(k, dilation, *x.shape[-2:])
    # the tap weights copied out of ``weight`` (C_out x C_in each): a weight built on the fly
    # (an adapter merged into the shared one) is not kept for backward
    kernels = [weight[:, :, ky : ky + 1, kx : kx + 1].contiguous() for ky, kx, _, _ in windows]
    # plain eager tensors and modes (not torch.compile, functorch, dispatch or torch-function
    # modes, tensor subclasses: those see the taps as ordinary ops)
    if _route((x, weight, bias)) != "op":
        return _Taps.apply(x, weight, bias, windows, *kernels)
    return _taps_conv(x, bias, windows, kernels)


@functools.lru_cache(maxsize=256)
def _windows(k: int, dilation: int, h: int, w: int) -> tuple:
    """(ky, kx, reads, writes) of every tap reading an image pixel, the centre tap first:
    ``reads`` the (rows, columns) slices of x it reads, ``writes`` those of the output."""
    c = k // 2
    out = []
    for ky, kx, y0, y1, x0, x1 in _taps(k, dilation, h, w):
        dy, dx = (ky - c) * dilation, (kx - c) * dilation
        reads = (slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))
        out.append((ky, kx, reads, (slice(y0, y1), slice(x0, x1))))
    out.sort(key=lambda t: (t[0], t[1]) != (c, c))  # the centre reads and writes the whole map
    return tuple(out)


def _taps_conv(x, bias, windows, kernels) -> torch.Tensor:
    """The taps' 1x1 convolutions added into their output windows, the centre's over the whole
    map with the bias. Plain differentiable ops.

    Shapes: x (N, C_in, H, W); kernels[i] (C_out, C_in, 1, 1) -> (N, C_out, H, W).
    """
    out = F.conv2d(x, kernels[0], bias)
    for (_, _, reads, writes), tap in zip(windows[1:], kernels[1:]):
        out[:, :, writes[0], writes[1]] += F.conv2d(x[:, :, reads[0], reads[1]], tap)
    return out


class _Taps(torch.autograd.Function):
    """:func:`_taps_conv` whose backward writes every tap's gradients into one gradient of x
    (in x's layout) and one of the weight. Autograd over the composite gives each tap's slice of
    x and of the weight a full-size zero gradient of its own (a slice's backward) and sums them:
    at ASTMT's ASPP rate 12 ((4, 2048, 16, 16) -> 64) sixteen 8 and 4.5 MiB maps zeroed and
    added per call, and under channels-last NCHW ones, which turned x's whole gradient NCHW.
    Saves x and the tap copies, as the composite does. Under ``create_graph`` the backward is
    the same code in differentiable ops (aten's ``convolution_backward`` has a derivative).
    """

    @staticmethod
    def forward(x, weight, bias, windows, *kernels):
        with torch.no_grad():
            return _taps_conv(x, bias, windows, kernels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, windows, *kernels = inputs
        ctx.save_for_backward(x, *kernels)
        ctx.windows, ctx.weight_shape, ctx.has_bias = windows, weight.shape, bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, *kernels = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = None
        if need_w:
            grad_w = grad_out.new_zeros(ctx.weight_shape)
        for i, ((ky, kx, reads, writes), tap) in enumerate(zip(ctx.windows, kernels)):
            xs = x if i == 0 else x[:, :, reads[0], reads[1]]
            gs = grad_out if i == 0 else grad_out[:, :, writes[0], writes[1]]
            gx, gw, _ = torch.ops.aten.convolution_backward(
                gs, xs.to(gs.dtype), tap.to(gs.dtype), None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [need_x, need_w, False],
            )  # fmt: skip
            if need_x and i == 0:  # the centre: the whole map, in x's layout
                grad_x = gx
                if not grad_x.is_contiguous(memory_format=_layout(x)):
                    grad_x = grad_x.contiguous(memory_format=_layout(x))
            elif need_x:
                grad_x[:, :, reads[0], reads[1]] += gx
            if need_w:
                grad_w[:, :, ky, kx] = gw[:, :, 0, 0]
        grad_b = grad_out.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, *(None for _ in kernels)
