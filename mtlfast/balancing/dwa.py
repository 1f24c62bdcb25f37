"""Dynamic weight averaging (Liu, Johns & Davison, MTAN, CVPR 2019): weights from the rate at
which each task's loss fell over the last two periods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._base import Balancer, _finite

__all__ = ["DWA"]


class DWA(Balancer):
    """``w_t = T exp(r_t / tau) / sum_j exp(r_j / tau)``, ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``.

    ``Lbar_t(k)`` is task t's mean loss over period k (an epoch in the paper; ``period`` steps
    here, so set it to the steps of an epoch to follow the paper). The weights are 1 for the first
    two periods and sum to T afterwards. A task with no loss in one of the two periods gets
    ``r_t = 1``.

    Args:
        tasks: the task names.
        temperature: tau (the paper's 2).
        period: steps per averaging period, at least 1.

    State: the current weights, the last two periods' means and the running sums.
    """

    needs = "none"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0, period: int = 1) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        self.temperature, self.period = float(temperature), period
        t = self.num_tasks
        f64 = torch.float64
        self.register_buffer("task_weights", torch.ones(t, dtype=f64))
        self.register_buffer("means", torch.full((2, t), float("nan"), dtype=f64))  # k-2, k-1
        self.register_buffer("sums", torch.zeros(t, dtype=f64))
        self.register_buffer("counts", torch.zeros(t, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _weights(self) -> torch.Tensor:
        return self.task_weights

    def update(self, losses: Mapping[str, torch.Tensor]) -> None:
        idx = self._present(list(losses))
        if not idx or not _finite([losses[self.tasks[i]] for i in idx]):
            return
        with torch.no_grad():
            index = torch.tensor(idx, device=self.sums.device)
            values = torch.stack([losses[self.tasks[i]].detach().to(self.sums) for i in idx])
            self.sums.index_add_(0, index, values)
            self.counts[index] += 1
            self.steps += 1
            if int(self.steps) % self.period:
                return
            mean = torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), float("nan"))
            self.means.copy_(torch.stack([self.means[1], mean]))
            self.sums.zero_()
            self.counts.zero_()
            ratio = self.means[1] / self.means[0]
            if torch.isnan(self.means[0]).all():
                return  # one period seen: weights stay 1
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
            self.task_weights.copy_(self.num_tasks * torch.softmax(ratio / self.temperature, 0))
