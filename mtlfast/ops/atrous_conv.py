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
no groups: the only convolutions this function takes). Plain autograd ops: gradients, double backward and autocast are
those of the 1x1 convolutions and the slices. The tap weights are copied out of ``weight``
(C_out x C_in each), so a weight built on the fly (an adapter merged into it) is not kept alive
for backward.

Timed on a 2-core AVX2 EPYC (2 threads, (4, 2048, 16, 16) -> 64 channels, forward and backward,
median of 5): rate 18 0.160 -> 0.016 s, rate 12 0.193 -> 0.086 s; rate 6 0.150 s as one
convolution against 0.192 s in taps, hence the threshold.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

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
    c = k // 2
    # the centre tap reads every pixel: its 1x1 convolution is the whole map and takes the bias
    out = F.conv2d(x, weight[:, :, c : c + 1, c : c + 1].contiguous(), bias)
    for ky, kx, y0, y1, x0, x1 in _taps(k, dilation, *x.shape[-2:]):
        if ky == c and kx == c:
            continue
        dy, dx = (ky - c) * dilation, (kx - c) * dilation
        tap = weight[:, :, ky : ky + 1, kx : kx + 1].contiguous()
        part = F.conv2d(x[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx], tap)
        out[:, :, y0:y1, x0:x1] += part
    return out
