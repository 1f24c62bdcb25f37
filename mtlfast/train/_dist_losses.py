"""What makes K ranks' losses add up to the loss of one process on the K-times batch.

Each task loss of :mod:`mtlfast.losses` is a sum over the labelled samples' valid pixels divided
by a count of them (its *denominator*). Rank r's loss, weighted by ``K * d_r / D`` (its share
of the global denominator ``D = sum_r d_r``), has a gradient whose average over the ranks is the
gradient of the loss over the whole global batch: exact, ignored pixels and unevenly labelled
ranks included. The saliency loss also balances positives by the batch's negative fraction; it
is given the global fraction. A loss this module does not know is weighted by the rank's share
of labelled samples (exact when every labelled sample has the same number of valid pixels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..losses import (
    balanced_bce_loss,
    cross_entropy_loss,
    depth_loss,
    edge_loss,
    normals_loss,
    saliency_loss,
)

__all__ = ["denominator", "global_saliency", "is_saliency", "zero_loss"]


def _unwrap(fn: Callable) -> tuple[Callable, dict]:
    if isinstance(fn, functools.partial) and not fn.args:
        return fn.func, dict(fn.keywords)
    return fn, {}


def denominator(fn: Callable, target: Any, rows: int) -> float:
    """The count ``fn`` divides its sum by, for ``target``'s ``rows`` labelled samples.

    Shapes: target (rows, ...) (the labelled rows only).
    """
    base, kw = _unwrap(fn)
    if rows == 0:
        return 0.0
    if base is cross_entropy_loss:
        return float((target != kw.get("ignore_index", 255)).sum())
    if base is normals_loss:
        return float((target != 0).any(dim=1).sum())
    if base is depth_loss and not kw.get("gradient_weight"):
        return float((target > 0).sum())
    if base in (edge_loss, saliency_loss) or (
        base is balanced_bce_loss and kw.get("pos_weight") is not None
    ):
        return float(target.numel())
    return float(rows)


def is_saliency(fn: Callable) -> bool:
    """Whether ``fn`` balances by the batch's own negative fraction (the saliency loss)."""
    base, kw = _unwrap(fn)
    return base is saliency_loss or (base is balanced_bce_loss and kw.get("pos_weight") is None)


def saliency_counts(target: torch.Tensor, ignore_index: int = 255) -> tuple[float, float]:
    """(negative pixels, valid pixels) of labelled saliency targets."""
    valid = target != ignore_index
    negative = valid & (target < 0.5)
    return float(negative.sum()), float(valid.sum())


def global_saliency(fn: Callable, negative: float, valid: float) -> Callable:
    """``fn`` with its positive weight fixed to the global batch's negative fraction."""
    _, kw = _unwrap(fn)
    kw.pop("pos_weight", None)
    return functools.partial(balanced_bce_loss, pos_weight=negative / max(valid, 1.0), **kw)


def zero_loss(prediction: Any, target: Any) -> torch.Tensor:
    """A 0-dim zero reaching every floating tensor of ``prediction``: the loss of a task run only so
    that its head's collectives (synchronised batch norm) pair up with the other ranks'."""
    leaves = [
        t
        for t in tree_flatten(prediction)[0]
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    total = leaves[0].reshape(-1)[:0].sum()
    for t in leaves[1:]:
        total = total + t.reshape(-1)[:0].sum()
    return total.float()
