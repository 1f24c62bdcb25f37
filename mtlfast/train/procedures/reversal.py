"""Gradient reversal (Ganin et al., JMLR 2016) and its weight schedule, for ASTMT's adversarial term."""

from __future__ import annotations

import math

import torch

__all__ = ["ganin_weight", "reverse_gradient"]


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * -ctx.weight, None


def reverse_gradient(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The identity forward; backward multiplies the gradient by ``-weight``.

    What precedes it then ascends the loss of what follows (ASTMT Fig. 4: "the gradient of the
    discriminator is reversed (negated) ... lambda controls the amount of negative gradient that
    flows back to the network"). It is differentiable again (double backprop through it works).

    Shapes: any; the output has x's shape.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"reverse_gradient: x must be a tensor, got {type(x).__name__}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"reverse_gradient: weight must be finite and >= 0, got {weight}")
    return _Reverse.apply(x, float(weight))


def ganin_weight(progress: float, gamma: float = 10.0, maximum: float = 1.0) -> float:
    """Ganin et al.'s reversal weight ``maximum * (2 / (1 + exp(-gamma * p)) - 1)`` at training
    progress ``p`` in [0, 1]: 0 at the start, rising to ``maximum`` (0.9999 of it at p = 1 with
    gamma 10), so the discriminator learns before the network is pushed to fool it."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"ganin_weight: progress must lie in [0, 1], got {progress}")
    return maximum * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)
