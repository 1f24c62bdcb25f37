"""Selecting the labelled samples of a batch (UberNet Eq. 4) and the zero loss of an empty one."""

from __future__ import annotations

import torch

IGNORE = 255


def select_labeled(
    prediction: torch.Tensor, target: torch.Tensor, labeled: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``prediction`` and ``target`` whose ``labeled`` flag is set (all rows without one).

    fp16 / bf16 predictions come back as float32.

    Shapes: prediction (N, ...), target (N, ...), labeled (N,) bool or None; returns (M, ...) each.
    """
    if prediction.dim() == 0 or target.dim() == 0 or prediction.shape[0] != target.shape[0]:
        raise ValueError(
            f"prediction and target need the same batch size (N, ...), got prediction "
            f"{tuple(prediction.shape)} and target {tuple(target.shape)}"
        )
    if prediction.dtype in (torch.float16, torch.bfloat16):
        # Sums over whole batches of pixels lose too much in 16 bits; the gradient flows back
        # in the prediction's own dtype.
        prediction = prediction.float()
    if labeled is None:
        return prediction, target
    labeled = torch.as_tensor(labeled, device=prediction.device)
    if labeled.dtype != torch.bool or labeled.shape != (prediction.shape[0],):
        raise ValueError(
            f"labeled must be a bool tensor of shape (N,) = ({prediction.shape[0]},), got "
            f"{labeled.dtype} {tuple(labeled.shape)}"
        )
    if bool(labeled.all()):
        return prediction, target
    return prediction[labeled], target[labeled.to(target.device)]


def zero_loss(prediction: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero whose graph reaches ``prediction`` (its gradient is zero, never NaN).

    Summing an empty slice rather than multiplying by zero keeps inf/NaN in the prediction out of
    both the value and the gradient.
    """
    return prediction.reshape(-1)[:0].sum()


def safe_mean(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """``total / count``, or ``total`` itself (a zero over no elements) when ``count`` is 0."""
    if isinstance(count, torch.Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)
