"""A dilated 'same' convolution as an undilated one over its polyphase components.

With dilation d, stride 1 and padding ``d * (k // 2)``, a k x k convolution's taps d pixels apart
on the map are 1 pixel apart within a d x d phase (the pixels ``(d*y + i, d*x + j)`` of one
``(i, j)``), and its padding is the phases' padding ``k // 2``: the convolution is the undilated
one over the d*d phases as a batch. A map the dilation does not divide is padded with zeros to a
multiple of it first (read as padding, as the dilated convolution reads them) and the output
cropped back.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def to_phases(t: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, H, W), H and W multiples of d -> (N*d*d, C, H/d, W/d): the d x d polyphase
    components as a batch, each sample's (i, j) component its pixels (d*y + i, d*x + j), in t's
    memory format (channels-last stays channels-last: converting after cost UberNet's conv5 at
    32x32 20% of its forward and backward)."""
    n, c, h, w = t.shape
    if _channels_last(t):
        v = t.permute(0, 2, 3, 1).reshape(n, h // d, d, w // d, d, c).permute(0, 2, 4, 1, 3, 5)
        return v.reshape(n * d * d, h // d, w // d, c).permute(0, 3, 1, 2)
    t = t.reshape(n, c, h // d, d, w // d, d).permute(0, 3, 5, 1, 2, 4)
    return t.reshape(n * d * d, c, h // d, w // d)


def from_phases(t: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of :func:`to_phases`, in t's memory format."""
    nd, c, h, w = t.shape
    if _channels_last(t):
        v = t.permute(0, 2, 3, 1).reshape(nd // (d * d), d, d, h, w, c).permute(0, 3, 1, 4, 2, 5)
        return v.reshape(nd // (d * d), h * d, w * d, c).permute(0, 3, 1, 2)
    t = t.reshape(nd // (d * d), d, d, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return t.reshape(nd // (d * d), c, h * d, w * d)


def phase_fill(h: int, w: int, d: int) -> tuple[int, int, int, int] | None:
    """``F.pad``'s (left, right, top, bottom) that makes an H x W map a multiple of d, or None
    where that would add more than half the pixels (the phases would mostly read padding)."""
    fill_h, fill_w = -h % d, -w % d
    if (h + fill_h) * (w + fill_w) > 1.5 * h * w:
        return None
    return 0, fill_w, 0, fill_h


def padded_phases(t: torch.Tensor, d: int, fill: tuple[int, int, int, int]) -> torch.Tensor:
    """t padded by ``fill`` (:func:`phase_fill`) and split into its phases."""
    return to_phases(F.pad(t, fill) if any(fill) else t, d)
