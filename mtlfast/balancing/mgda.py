"""MGDA-UB (Sener & Koltun, NeurIPS 2018): the min-norm convex combination of the tasks'
gradients at the shared representation, found by Frank-Wolfe (their Alg. 2, with away steps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ._base import Balancer, combination, gram

__all__ = ["MGDA", "min_norm_weights"]

NORMALIZERS = ("none", "l2", "loss", "loss+")


def min_norm_weights(m: np.ndarray, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """alpha in the simplex minimising ``||sum_t alpha_t g_t||^2``, from the Gram matrix ``m``.

    Frank-Wolfe as in Sener & Koltun's Alg. 2 (alpha starts at 1/T; each iteration moves towards
    the vertex t minimising ``(M alpha)_t`` with an exact line search), with away steps
    (Lacoste-Julien & Jaggi, NeurIPS 2015): when moving away from the support's worst vertex
    promises more, it does that instead. Plain Frank-Wolfe zig-zags towards a minimum on a face of
    the simplex (O(1/k): 0.4% above the minimum after the authors' 250 iterations on a 3-task
    example); with away steps it converges linearly. Stops after ``max_iter`` iterations or when
    the duality gap ``alpha M alpha - min_t (M alpha)_t``, which bounds the distance to the
    minimum, is below ``tol`` times the squared norm. The same first step as Alg. 2: exact for
    two tasks.

    Shapes: m (T, T) symmetric positive semi-definite; returns (T,) float64, summing to 1.
    """
    t = m.shape[0]
    alpha = np.full(t, 1.0 / t)
    if t == 1:
        return alpha
    for _ in range(max_iter):
        m_alpha = m @ alpha
        norm2 = float(alpha @ m_alpha)
        k = int(np.argmin(m_alpha))
        gap = norm2 - float(m_alpha[k])
        if gap <= tol * norm2 or gap <= 1e-300:
            break
        support = np.nonzero(alpha > 0)[0]
        a = int(support[np.argmax(m_alpha[support])])
        if gap >= float(m_alpha[a]) - norm2 or alpha[a] >= 1.0:  # towards vertex k
            d = -alpha.copy()
            d[k] += 1.0
            step_max = 1.0
        else:  # away from vertex a
            d = alpha.copy()
            d[a] -= 1.0
            step_max = alpha[a] / (1.0 - alpha[a])
        curvature = float(d @ m @ d)
        slope = float(d @ m_alpha)  # half the directional derivative of ||.||^2
        step = step_max if curvature <= 0 else min(max(-slope / curvature, 0.0), step_max)
        alpha = alpha + step * d
        alpha = np.maximum(alpha, 0.0)
        alpha /= alpha.sum()
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
        max_iter, tol: Frank-Wolfe's limits (:func:`min_norm_weights`).

    ``weights``: the last step's coefficients (1/T each before the first step).
    """

    needs = "features"

    def __init__(
        self,
        tasks: Sequence[str],
        normalize: str = "none",
        max_iter: int = 1000,
        tol: float = 1e-10,
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
