"""The canonical memory layout the compiled and Triton kernels take.

A kernel sees each tensor as outer dims with arbitrary strides around a dense inner block
(the trailing ``inner`` dims, e.g. C, H, W), laid out in the same order in every tensor of the
call: then the op is elementwise over a flat run of ``prod(inner sizes)`` elements. Contiguous
and channels-last tensors, and slices along the outer dims, already qualify and are never
copied; anything else is copied once into the layout.
"""

from __future__ import annotations

import torch

__all__ = [
    "empty_in_order",
    "inner_order",
    "is_dense_in_order",
    "memory_format_of",
    "to_inner_order",
]


def is_dense_in_order(t: torch.Tensor, order: tuple[int, ...], inner: int = 3) -> bool:
    """True when the last ``inner`` dims of ``t`` are dense, outermost to innermost in ``order``."""
    base = t.dim() - inner
    expected = 1
    for d in reversed(order):
        size, stride = t.shape[base + d], t.stride(base + d)
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def inner_order(t: torch.Tensor, inner: int = 3) -> tuple[int, ...] | None:
    """Order of the inner dims (outermost first) if they form a dense block, else None."""
    base = t.dim() - inner
    order = tuple(sorted(range(inner), key=lambda d: (-t.stride(base + d), d)))
    return order if is_dense_in_order(t, order, inner) else None


def empty_in_order(
    shape: torch.Size | tuple[int, ...], order: tuple[int, ...], like: torch.Tensor, inner: int = 3
) -> torch.Tensor:
    """Uninitialised tensor of ``shape``: outer dims contiguous, inner block dense in ``order``."""
    base = len(shape) - inner
    perm = list(range(base)) + [base + d for d in order]
    physical = [shape[p] for p in perm]
    storage = torch.empty(physical, dtype=like.dtype, device=like.device)
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return storage.permute(inverse)


def to_inner_order(t: torch.Tensor, order: tuple[int, ...], inner: int = 3) -> torch.Tensor:
    """``t`` itself when it already has the layout, else a copy in it."""
    if is_dense_in_order(t, order, inner):
        return t
    out = empty_in_order(t.shape, order, t, inner)
    out.copy_(t)
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a dense channels-last x that is not also contiguous (C = 1 or 1x1 maps
    are both), else contiguous_format: the layout a gradient or output of x should take."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
