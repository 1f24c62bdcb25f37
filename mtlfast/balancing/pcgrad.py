"""PCGrad (Yu et al., NeurIPS 2020): each task's gradient is projected off the normal plane of
every other task's gradient it conflicts with, then they are summed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ._base import Balancer, combination, gram

__all__ = ["PCGrad", "pcgrad_coefficients"]


def pcgrad_coefficients(m: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """PCGrad's sum ``sum_i g_i^PC`` as ``sum_k beta_k g_k``, from the Gram matrix alone.

    Yu et al.'s Alg. 1: ``g_i^PC = g_i``; for each other task j in ``orders[i]``, if
    ``g_i^PC . g_j < 0``, ``g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j`` (g_j the original).
    Every ``g_i^PC`` stays in the span of the g_k, so it is tracked by its coefficients
    ``C[i]`` and its dot products are ``C[i] @ M``: no gradient-sized work but the final sum.

    Shapes: m (T, T); orders[i] a permutation of the tasks other than i; returns (T,).
    """
    t = m.shape[0]
    c = np.eye(t)
    for i in range(t):
        for j in orders[i]:
            dot = float(c[i] @ m[:, j])
            if dot < 0 and m[j, j] > 0:
                c[i, j] -= dot / m[j, j]
    return c.sum(0)


def random_orders(t: int, seed: int, step: int) -> list[list[int]]:
    """For each task i, the other tasks in a random order, drawn from (seed, step) alone."""
    rng = np.random.default_rng([seed, step])
    return [[int(j) for j in rng.permutation([j for j in range(t) if j != i])] for i in range(t)]


class PCGrad(Balancer):
    """PCGrad on the tasks' gradients at the shared representation (as LibMTL's ``rep_grad``
    mode; the paper projects the shared parameters' gradients), which the engine computes
    without a backward per task through the trunk. Needs all T of them at once; each task's own
    parameters get their task's gradient, which no other task's touches.

    Args:
        tasks: the task names.
        seed: the random orders of the projections are drawn from (seed, step count), so a
            resumed run draws what the uninterrupted one would.

    ``weights``: the last step's coefficients ``beta`` of ``sum_k beta_k g_k`` (1 when no pair
    conflicts; 1 each before the first step). State: ``steps``, ``last_weights``.
    """

    needs = "features"

    def __init__(self, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self.register_buffer("last_weights", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _weights(self) -> torch.Tensor:
        return self.last_weights

    def combine(
        self, grads: Mapping[str, Sequence[torch.Tensor]], losses: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        idx = self._present(list(grads))
        g = [grads[self.tasks[i]] for i in idx]
        m = gram(g)
        orders = random_orders(len(g), self.seed, int(self.steps))
        self.steps += 1
        if not np.isfinite(m).all():
            return combination(g, np.ones(len(g)))
        beta = pcgrad_coefficients(m, orders)
        self.last_weights.zero_()
        self.last_weights[torch.tensor(idx)] = torch.from_numpy(beta).to(self.last_weights)
        return combination(g, beta)
