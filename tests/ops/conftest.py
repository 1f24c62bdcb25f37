"""Inputs in every layout the ops must accept."""

import torch

LAYOUTS = ("contiguous", "channels_last", "outer_strided", "inner_strided")


def make(shape, dtype, layout, device="cpu", scale=1.0):
    """Random tensor of ``shape`` (..., C, H, W) laid out as ``layout`` names."""
    *outer, c, h, w = shape

    def randn(*size):
        return (torch.randn(size, device=device, dtype=torch.float64) * scale).to(dtype)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "channels_last":
        return randn(*outer, h, w, c).movedim(-1, -3)
    if layout == "outer_strided":
        # Every other entry of the first outer dim, the two leading dims stored swapped.
        t = randn(outer[1], outer[0] * 2, *outer[2:], c, h, w).transpose(0, 1)[::2]
        return t
    if layout == "inner_strided":
        return randn(*outer, c, h, w * 2)[..., ::2]
    raise ValueError(layout)
