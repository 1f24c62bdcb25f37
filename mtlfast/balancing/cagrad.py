"""CAGrad (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021): the update that maximises the worst task's
improvement within a ball around the average gradient, through its dual on the simplex."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ._base import Balancer, combination, gram

__all__ = ["CAGrad", "cagrad_dual_weights"]

RESCALES = (0, 1, 2)


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def cagrad_dual_weights(
    m: np.ndarray, c: float, max_iter: int = 1000, tol: float = 1e-10
) -> np.ndarray:
    """w in the simplex minimising CAGrad's dual ``F(w) = g_w . g_0 + c ||g_w||``.

    ``g_w = sum_t w_t g_t``, ``g_0`` the average gradient, ``c = alpha ||g_0||``; the objective
    is the authors' code's (``x A b + c sqrt(x A x + 1e-8)``), solved there with SciPy's SLSQP,
    here by accelerated projected gradient (FISTA with backtracking, restarted whenever the
    objective rises), which reaches the same minimum in a fraction of SLSQP's time. Stops when
    the Frank-Wolfe gap ``grad.w - min(grad)``, an upper bound on ``F(w) - min F``, is below
    ``tol`` times ``|F(w)|``, or after ``max_iter`` iterations.

    Shapes: m (T, T) Gram matrix; returns (T,) float64 summing to 1.
    """
    t = m.shape[0]
    b = np.full(t, 1.0 / t)
    mb = m @ b

    def value(w: np.ndarray) -> float:
        return float(w @ mb + c * np.sqrt(max(w @ m @ w, 0.0) + 1e-8))

    def grad(w: np.ndarray) -> np.ndarray:
        return mb + c * (m @ w) / np.sqrt(max(w @ m @ w, 0.0) + 1e-8)

    w = b.copy()
    f = value(w)
    y, theta = w.copy(), 1.0
    # a first guess of the gradient's Lipschitz constant: the linear part's; backtracking raises
    # it where needed and every accepted step lowers it again, so steps stay as long as allowed
    lip = max(float(np.abs(m).sum(1).max()), 1e-300)
    for _ in range(max_iter):
        gy, fy = grad(y), value(y)
        while True:  # backtracking: the quadratic model at y must bound F at the candidate
            cand = _project_simplex(y - gy / lip)
            d = cand - y
            fc = value(cand)
            if fc <= fy + gy @ d + 0.5 * lip * (d @ d) + 1e-15 * abs(fy) or lip > 1e300:
                break
            lip *= 2.0
        if fc > f:  # momentum overshot: restart from the best point, a plain gradient step
            if np.array_equal(y, w):
                break
            y, theta = w.copy(), 1.0
            continue
        theta_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * theta**2))
        y = cand + (theta - 1.0) / theta_next * (cand - w)
        w, f, theta = cand, fc, theta_next
        lip *= 0.5
        gw = grad(w)
        if gw @ w - gw.min() <= tol * max(abs(f), 1e-300):  # Frank-Wolfe gap >= F(w) - min F
            break
    return w


class CAGrad(Balancer):
    """CAGrad on the tasks' gradients at the shared representation (the engine computes them
    without a backward per task through the trunk; needs all T at once).

    ``d = g_0 + (c / ||g_w||) g_w`` with ``g_0`` the average gradient, ``c = alpha ||g_0||`` and
    w the dual's solution (:func:`cagrad_dual_weights`), then rescaled as the authors' code:
    ``rescale`` 0 none, 1 ``d / (1 + alpha^2)`` (default), 2 ``d / (1 + alpha)``. As there, the
    shared gradient has the scale of the average task gradient, while each task's own
    parameters get their task's plain gradient.

    Args:
        tasks: the task names.
        alpha: the radius factor (the paper's c; 0.5 in the authors' experiments; 0 is the
            average gradient).
        rescale: 0, 1 or 2 (above).

    ``weights``: the last step's coefficients ``beta`` of ``d = sum_k beta_k g_k`` (1/T each
    before the first step).
    """

    needs = "features"

    def __init__(self, tasks: Sequence[str], alpha: float = 0.5, rescale: int = 1) -> None:
        super().__init__(tasks)
        if not alpha >= 0:
            raise ValueError(f"alpha must be non-negative, got {alpha!r}")
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
        self.alpha, self.rescale = float(alpha), rescale
        t = self.num_tasks
        self.register_buffer("last_weights", torch.full((t,), 1.0 / t, dtype=torch.float64))

    def _weights(self) -> torch.Tensor:
        return self.last_weights

    def coefficients(self, m: np.ndarray) -> np.ndarray:
        """beta with ``d = sum_k beta_k g_k``, from the Gram matrix ``m`` (T, T)."""
        t = m.shape[0]
        b = np.full(t, 1.0 / t)
        c = self.alpha * np.sqrt(max(b @ m @ b, 0.0) + 1e-8)
        w = cagrad_dual_weights(m, c) if self.alpha > 0 else b
        gw_norm = np.sqrt(max(w @ m @ w, 0.0))
        beta = b + c / (gw_norm + 1e-8) * w
        return beta / {0: 1.0, 1: 1.0 + self.alpha**2, 2: 1.0 + self.alpha}[self.rescale]

    def combine(
        self, grads: Mapping[str, Sequence[torch.Tensor]], losses: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        idx = self._present(list(grads))
        g = [grads[self.tasks[i]] for i in idx]
        m = gram(g)
        if not np.isfinite(m).all():
            return combination(g, np.ones(len(g)))
        beta = self.coefficients(m)
        self.last_weights.zero_()
        self.last_weights[torch.tensor(idx)] = torch.from_numpy(beta).to(self.last_weights)
        return combination(g, beta)
