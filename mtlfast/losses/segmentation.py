"""Cross-entropy for semantic segmentation and human parts (ASTMT / MTI-Net ``SoftMaxwithLoss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._labeled import IGNORE, safe_mean, select_labeled, zero_loss

__all__ = ["cross_entropy_loss"]


def cross_entropy_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Softmax cross-entropy averaged over the non-ignored pixels of the labelled samples.

    Shapes: prediction (N, C, H, W) logits; target (N, H, W) or (N, 1, H, W) int64 class ids,
    ``ignore_index`` = ignore; labeled (N,) bool or None (all labelled). Returns a 0-dim tensor;
    a zero connected to ``prediction`` when no labelled, non-ignored pixel is left.
    """
    if prediction.dim() != 4:
        raise ValueError(f"prediction must be (N, C, H, W) logits, got {tuple(prediction.shape)}")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != prediction.shape[:1] + prediction.shape[2:]:
        raise ValueError(
            f"target must be (N, H, W) = {tuple(prediction.shape[:1] + prediction.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class ids, got {target.dtype}")
    prediction, target = select_labeled(prediction, target, labeled)
    if prediction.shape[0] == 0:
        return zero_loss(prediction)
    target = target.long()
    # an id out of range would stop aten with an IndexError (a device-side assert on CUDA)
    c = prediction.shape[1]
    if bool(((target < 0) | (target >= c)).logical_and_(target != ignore_index).any()):
        raise ValueError(
            f"target holds class ids outside [0, {c}) (C = prediction.shape[1]) other than "
            f"ignore_index = {ignore_index}"
        )
    total = F.cross_entropy(prediction, target, ignore_index=ignore_index, reduction="sum")
    return safe_mean(total, (target != ignore_index).sum())
