"""MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm convex combination of the tasks'
gradients at the shared representation, found by Frank-Wolfe (their Alg. 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ._base import Balancer, combination, gram

__all__ = ["MGDA", "min_norm_weights"]

NORMALIZERS = ("none", "l2", "loss", "loss+")


def _line_search(v1v1: float, v1v2: float, v2v2: float) -> float:
    """argmin over gamma in [0, 1] of ||gamma v1 + (1 - gamma) v2||^2 (Sener & Koltun Alg. 1)."""
    if v1v2 >= v1v1:
        return 1.0
    if v1v2 >= v2v2:
        return 0.0
    return (v2v2 - v1v2) / (v1v1 + v2v2 - 2.0 * v1v2)


def min_norm_weights(m: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """alpha in the simplex minimising ``||sum_t alpha_t g_t||^2``, from the Gram matrix ``m``.

    Frank-Wolfe as in Sener & Koltun's Alg. 2: alpha starts at 1/T; each iteration moves towards
    the vertex t minimising ``(M alpha)_t`` with the exact line search of Alg. 1, and stops after
    ``max_iter`` iterations or when alpha moves by less than ``tol`` (L1). Exact in one
    iteration for two tasks.

    Shapes: m (T, T) symmetric positive semi-definite; returns (T,) float64, summing to 1.
    """
    t = m.shape[0]
    alpha = np.full(t, 1.0 / t)
    if t == 1:
        return alpha
    for _ in range(max_iter):
        m_alpha = m @ alpha
        k = int(np.argmin(m_alpha))
        gamma = _line_search(float(alpha @ m_alpha), float(m_alpha[k]), float(m[k, k]))
        new = gamma * alpha
        new[k] += 1.0 - gamma
        moved = np.abs(new - alpha).sum()
        alpha = new
        if moved < tol:
            break
    return alpha


class MGDA(Balancer):
    """MGDA-UB: the shared representation's gradient is ``sum_t alpha_t g_t`` with alpha the
    min-norm point of the gradients' convex hull (its negative is a descent direction for every
    task, or zero at a Pareto-stationary point).

    ``g_t`` is task t's gradient at the branching point (the "upper bound" of MGDA-UB: the
    representation Z instead of the shared parameters), which the engine already computes: no
    backward per task through the trunk. Needs all T of them at once. Each task's own parameters
    get their task's plain gradient (Alg. 2 updates them with it).

    Args:
        tasks: the task names.
        normalize: the gradients' normalisation before the min-norm problem, as in Sener &
            Koltun's code: "none" (default; the paper's algorithm), "l2" (``g_t / ||g_t||``),
            "loss" (``g_t / L_t``) or "loss+" (``g_t / (L_t ||g_t||)``); the weights then
            include the normaliser (``weights[t] = alpha_t / n_t``).
        max_iter, tol: Frank-Wolfe's limits (their code's 250 and 1e-5).

    ``weights``: the last step's coefficients (1/T each before the first step).
    """

    needs = "features"

    def __init__(
        self,
        tasks: Sequence[str],
        normalize: str = "none",
        max_iter: int = 250,
        tol: float = 1e-5,
    ) -> None:
        super().__init__(tasks)
        if normalize not in NORMALIZERS:
            raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol!r}")
        self.normalize, self.max_iter, self.tol = normalize, max_iter, float(tol)
        t = self.num_tasks
        self.register_buffer("last_weights", torch.full((t,), 1.0 / t, dtype=torch.float64))

    def _weights(self) -> torch.Tensor:
        return self.last_weights

    def combine(
        self, grads: Mapping[str, Sequence[torch.Tensor]], losses: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        idx = self._present(list(grads))
        names = [self.tasks[i] for i in idx]
        g = [grads[t] for t in names]
        m = gram(g)
        if not np.isfinite(m).all():
            return combination(
                g, np.ones(len(g))
            )  # non-finite in, non-finite out: the caller skips
        if self.normalize == "none":
            scale = np.ones(len(g))
        else:
            norms = np.sqrt(np.maximum(np.diag(m), 0.0))
            loss = np.array([float(losses[t]) for t in names])
            scale = {"l2": norms, "loss": loss, "loss+": loss * norms}[self.normalize]
            scale = np.where(scale > 0, scale, 1.0)  # a zero gradient stays zero
        alpha = min_norm_weights(m / np.outer(scale, scale), self.max_iter, self.tol)
        beta = alpha / scale
        self.last_weights.zero_()
        self.last_weights[torch.tensor(idx)] = torch.from_numpy(beta).to(self.last_weights)
        return combination(g, beta)
