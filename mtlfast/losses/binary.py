"""Weighted binary cross-entropy for edges and saliency (``BalancedCrossEntropyLoss`` of the
ASTMT / MTI-Net releases), with ignored pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._labeled import IGNORE, select_labeled, zero_loss

__all__ = ["balanced_bce_loss", "edge_loss", "saliency_loss"]


def balanced_bce_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    pos_weight: float | None = None,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """``(w * sum_pos BCE + (1 - w) * sum_neg BCE) / #pixels`` over the labelled samples.

    ``w = pos_weight`` when given; otherwise ``w`` = fraction of negatives among the batch's
    non-ignored pixels (HED-style balancing per batch). Ignored pixels add nothing but are
    counted in ``#pixels`` (= M*H*W for M labelled samples, the releases' ``size_average``), so
    ignoring pixels never rescales the others.

    Shapes: prediction (N, 1, H, W) logits; target (N, 1, H, W) float, 1 = positive (>= 0.5),
    0 = negative, ``ignore_index`` = ignored; labeled (N,) bool or None. Returns a 0-dim tensor.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction (logits) and target must have the same shape (N, 1, H, W), got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    prediction, target = select_labeled(prediction, target, labeled)
    if prediction.shape[0] == 0:
        return zero_loss(prediction)
    valid = target != ignore_index
    positive = (target >= 0.5) & valid
    negative = valid & ~positive
    labels = positive.to(prediction.dtype)
    bce = F.binary_cross_entropy_with_logits(prediction, labels, reduction="none")
    loss_pos = torch.where(positive, bce, 0.0).sum()
    loss_neg = torch.where(negative, bce, 0.0).sum()
    if pos_weight is None:
        n_valid = valid.sum()
        w = negative.sum().to(bce.dtype) / n_valid.clamp(min=1).to(bce.dtype)
    else:
        w = float(pos_weight)
    return (w * loss_pos + (1 - w) * loss_neg) / target.numel()


def edge_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    pos_weight: float = 0.95,
) -> torch.Tensor:
    """Edge detection: BCE with positives weighted ``pos_weight`` (0.95) and negatives 0.05.

    Shapes: as :func:`balanced_bce_loss`.
    """
    return balanced_bce_loss(prediction, target, labeled, pos_weight=pos_weight)


def saliency_loss(
    prediction: torch.Tensor, target: torch.Tensor, labeled: torch.Tensor | None = None
) -> torch.Tensor:
    """Saliency: BCE balanced by the positive fraction of the (labelled part of the) batch.

    Shapes: as :func:`balanced_bce_loss`.
    """
    return balanced_bce_loss(prediction, target, labeled, pos_weight=None)
