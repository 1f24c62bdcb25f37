"""Argument checks shared by the ops: each error names the op, the argument and what was expected."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "check_same", "check_tensor", "shape_str"]

#: The dtypes every op takes: float8 and other exotic floating dtypes are refused up front.
FLOAT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))


def shape_str(t: torch.Tensor | tuple) -> str:
    """``(2, 3, 4)`` for a tensor's or a tuple's shape."""
    dims = t.shape if isinstance(t, torch.Tensor) else t
    return "(" + ", ".join(str(int(s)) for s in dims) + ")"


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dims: str | None = None,
    ndim: int | None = None,
    floating: bool = True,
) -> torch.Tensor:
    """``t`` must be a tensor (of a dtype in FLOAT_DTYPES unless ``floating=False``) of rank ``ndim``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must have shape {dims or f'of rank {ndim}'}, got {shape_str(t)}"
        )
    return t


def check_same(
    op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True
) -> None:
    """``t`` must be on ``ref``'s device and, with ``dtype=True``, have its dtype."""
    if t.device != ref.device:
        raise ValueError(
            f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on the same device"
        )
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
