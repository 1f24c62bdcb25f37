"""L1 depth loss on valid pixels, with ASTMT's optional Sobel gradient-consistency term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._labeled import safe_mean, select_labeled, zero_loss

__all__ = ["depth_gradient_loss", "depth_loss"]


def _sobel(x: torch.Tensor) -> torch.Tensor:
    """Sobel responses (ASTMT ``ImGrad``), y then x, without padding.

    Shapes: x (N, 1, H, W) -> (N, 2, H-2, W-2).
    """
    fx = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=x.dtype, device=x.device)
    fy = torch.tensor([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=x.dtype, device=x.device)
    return F.conv2d(x, torch.stack([fy, fx])[:, None])


def depth_gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``|Gy(p) - Gy(t)| + |Gx(p) - Gx(t)|`` with Sobel ``G``.

    Only pixels whose whole 3x3 neighbourhood lies inside the image and is valid (target > 0)
    count, so invalid holes and the border never produce spurious gradients.

    Shapes: prediction, target (N, 1, H, W); returns a 0-dim tensor (0 when no pixel counts).
    """
    valid = (target > 0).to(prediction.dtype)
    if target.shape[-1] < 3 or target.shape[-2] < 3:
        return zero_loss(prediction)
    full = F.avg_pool2d(valid, 3, stride=1) > 1 - 1e-6
    target = target.to(prediction.dtype) * valid
    diff = (_sobel(prediction) - _sobel(target)).abs().sum(1, keepdim=True)
    return safe_mean(torch.where(full, diff, 0.0).sum(), full.sum())


def depth_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    gradient_weight: float = 0.0,
) -> torch.Tensor:
    """Mean ``|prediction - target|`` over valid pixels (target > 0, metres), plus
    ``gradient_weight *`` :func:`depth_gradient_loss` (ASTMT's ``DepthLoss`` uses 1; MTI-Net 0).

    Shapes: prediction, target (N, 1, H, W); labeled (N,) bool or None. Returns a 0-dim tensor.
    """
    if prediction.shape != target.shape or prediction.dim() != 4 or prediction.shape[1] != 1:
        raise ValueError(
            f"prediction and target must both be (N, 1, H, W), got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}"
        )
    prediction, target = select_labeled(prediction, target, labeled)
    if prediction.shape[0] == 0:
        return zero_loss(prediction)
    valid = target > 0
    loss = safe_mean(torch.where(valid, (prediction - target).abs(), 0.0).sum(), valid.sum())
    if gradient_weight:
        loss = loss + gradient_weight * depth_gradient_loss(prediction, target)
    return loss
