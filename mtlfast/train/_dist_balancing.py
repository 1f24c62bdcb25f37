"""A balancing method (``mtlfast.balancing``) fed the global batch's statistics on every rank.

The engine hands a balancer this rank's task losses and gradients; a method must instead see
those of the K ranks' global batch, so that it computes the same weights on every rank and
the ones one process would on the K-times batch. :class:`GlobalBalancer` stands between the
engine and the method, speaking the same protocol, and reduces what the method reads:

* losses (every method's ``update``, MGDA's loss normalisers): one all-reduce of T numbers;
* ``"layer"`` methods (GradNorm): the task gradients at the shared layer W, kept until the end
  of the step, then one all-reduce of T x |W| numbers (a task's gradient at W over the global
  batch is the average of the ranks');
* ``"features"`` methods (MGDA-UB, PCGrad, CAGrad): the gradients at the representation are the
  ranks' rows, so the global Gram matrix is the sum of the ranks' (one all-reduce of T x T
  numbers). The methods compute their coefficients from the Gram matrix alone; they are handed
  T-dimensional stand-ins whose Gram matrix is the global one, each with a second piece
  ``delta * e_t`` (delta = 2^-490: its square adds 1e-295 to the diagonal), so that the
  combination they return carries the coefficients ``delta * beta`` exactly. Each rank then
  combines its own rows' gradients with ``beta``.

Scaling: rank r's losses carry its share ``K d_r / D`` of the global batch
(:class:`mtlfast.train.distributed.DistributedStep`), so global = sum over ranks / K for losses
and layer gradients, / K^2 for the Gram matrix. Every rank must run every task that runs on
any rank (the step forces it with zero losses), so that the calls pair up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..balancing._base import combination, gram

__all__ = ["GlobalBalancer"]

_DELTA = 2.0**-490


class GlobalBalancer:
    """``balancer`` (an ``mtlfast.balancing.Balancer``) with every statistic it reads reduced over
    the ranks of ``group``; its state, weights and checkpoint are the wrapped method's."""

    def __init__(self, balancer: Any, device: torch.device, group=None) -> None:
        self.inner = balancer
        self.tasks = tuple(balancer.tasks)
        self.needs = balancer.needs
        self.device = device
        self.group = group
        self.world = dist.get_world_size(group)
        self._observed: dict[str, list[torch.Tensor]] = {}
        self._layer: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:  # layer_name, weights, ... of the method
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def loss_weights(self) -> dict[str, Any]:
        return self.inner.loss_weights()

    def shared_layer(self, shared) -> list[torch.Tensor]:
        self._layer = list(self.inner.shared_layer(shared))
        return self._layer

    # ------------------------------------------------------------------------------ reductions

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values, group=self.group)
        return values

    def global_losses(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """task -> the global batch's loss, for the tasks that ran on any rank."""
        t = len(self.tasks)
        vec = torch.zeros(2 * t, dtype=torch.float64, device=self.device)
        for i, name in enumerate(self.tasks):
            if name in losses:
                vec[i] = losses[name].detach().to(vec)
                vec[t + i] = 1.0
        vec = self._sum(vec)
        return {
            name: (vec[i] / self.world).float()
            for i, name in enumerate(self.tasks)
            if vec[t + i] > 0
        }

    def observe(self, task: str, grads: Sequence[torch.Tensor]) -> None:
        """Kept until :meth:`update`: the global gradient needs every rank's."""
        self._observed[task] = [g.detach() for g in grads]

    def _global_observations(self) -> None:
        """One all-reduce of every task's layer gradient (zeros where a rank has none), then the
        method's ``observe`` on the global ones, in task order."""
        observed, self._observed = self._observed, {}
        if not self._layer:
            return
        sizes = [p.numel() for p in self._layer]
        t = len(self.tasks)
        flat = torch.zeros(t * sum(sizes) + t, dtype=torch.float32, device=self.device)
        rows = flat[: t * sum(sizes)].view(t, -1)
        for i, name in enumerate(self.tasks):
            if name in observed:
                rows[i] = torch.cat([g.reshape(-1).float() for g in observed[name]])
                flat[t * sum(sizes) + i] = 1.0
        flat = self._sum(flat)
        for i, name in enumerate(self.tasks):
            if flat[t * sum(sizes) + i] > 0:
                pieces = (rows[i] / self.world).split(sizes)
                self.inner.observe(
                    name, [x.view_as(p).to(p.dtype) for x, p in zip(pieces, self._layer)]
                )

    def combine(
        self, grads: Mapping[str, Sequence[torch.Tensor]], losses: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """This rank's rows of the method's combination of the global batch's task gradients."""
        t = len(self.tasks)
        here = [i for i, name in enumerate(self.tasks) if name in grads]
        like = grads[self.tasks[here[0]]]
        full = [
            list(grads[name]) if name in grads else [torch.zeros_like(x) for x in like]
            for name in self.tasks
        ]
        local = gram(full)
        vec = torch.zeros(t * t + t, dtype=torch.float64, device=self.device)
        vec[: t * t] = torch.from_numpy(local.reshape(-1)).to(vec)
        vec[t * t + torch.tensor(here, device=self.device)] = 1.0
        vec = self._sum(vec).cpu()
        present = [i for i in range(t) if vec[t * t + i] > 0]
        m = (vec[: t * t].view(t, t).numpy() / self.world**2)[np.ix_(present, present)]
        names = [self.tasks[i] for i in present]
        out = self.inner.combine(_stand_ins(names, m), self.global_losses(losses))
        mine = [full[i] for i in present]
        if not np.isfinite(m).all():
            return combination(mine, np.ones(len(mine)))  # non-finite: the step is skipped
        beta = out[1].numpy() / _DELTA
        return combination(mine, beta)

    def update(self, losses: Mapping[str, torch.Tensor]) -> None:
        if self.needs == "layer":
            self._global_observations()
        self.inner.update(self.global_losses(losses))


def _stand_ins(names: list[str], m: np.ndarray) -> dict[str, list[torch.Tensor]]:
    """task -> [v_t, delta e_t] with ``V V^T = m``: the Gram matrix of the stand-ins is
    ``m + delta^2 I``, and a combination ``sum_t beta_t`` of them ends in ``delta * beta``.

    Shapes: m (T, T) symmetric positive semi-definite; each piece (T,) float64.
    """
    t = len(names)
    if np.isfinite(m).all():
        eigenvalues, q = np.linalg.eigh(m)
        v = q * np.sqrt(np.clip(eigenvalues, 0.0, None))
    else:
        v = m.copy()  # the method sees the non-finite matrix and takes its own way out
    eye = np.eye(t) * _DELTA
    return {
        n: [torch.from_numpy(v[i].copy()), torch.from_numpy(eye[i].copy())]
        for i, n in enumerate(names)
    }
