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


def to_phases(t: torch.Tensor, d: int) -> torch.Tensor:
    """(N, C, H, W), H and W multiples of d -> (N*d*d, C, H/d, W/d): the d x d polyphase
    components as a batch, each sample's (i, j) component its pixels (d*y + i, d*x + j)."""
    n, c, h, w = t.shape
    t = t.reshape(n, c, h // d, d, w // d, d).permute(0, 3, 5, 1, 2, 4)
    return t.reshape(n * d * d, c, h // d, w // d)


def from_phases(t: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of :func:`to_phases`."""
    nd, c, h, w = t.shape
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
