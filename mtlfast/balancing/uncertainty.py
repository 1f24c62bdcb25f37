"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): each task's weight is learned as
the inverse of its homoscedastic noise variance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._base import Balancer, _finite

__all__ = ["Uncertainty"]


class Uncertainty(Balancer):
    """``L = sum_t exp(-s_t) L_t + s_t`` with learned log-variances ``s_t = log sigma_t^2``.

    The weights ``w_t = exp(-s_t)`` multiply the losses in the network's backward; the ``s_t``
    are updated by their own Adam optimiser (as the GradNorm paper does for this baseline: Adam,
    learning rate 0.025, Sec. 5.5) from the exact gradient ``dL/ds_t = 1 - exp(-s_t) L_t``, which
    needs the losses only. Kendall et al.'s regression form ``L_t / (2 sigma_t^2) + log sigma_t``
    is this one halved: the same optimum for ``s_t``, and with ``w_t`` starting at 1 (``s_t = 0``)
    the network starts where fixed weights do (Kendall's would start at 1/2).

    Args:
        tasks: the task names.
        lr: the learning rate of the ``s_t``'s Adam (betas (0.9, 0.999)).
        init: the initial ``s_t`` (0: weights 1).

    State: ``log_vars`` (T,), its optimiser's moments.
    """

    needs = "none"

    def __init__(self, tasks: Sequence[str], lr: float = 0.025, init: float = 0.0) -> None:
        super().__init__(tasks)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))
        self.optimizer = torch.optim.Adam([self.log_vars], lr=lr)

    def _weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars)

    def update(self, losses: Mapping[str, torch.Tensor]) -> None:
        idx = self._present(list(losses))
        if not idx or not _finite([losses[self.tasks[i]] for i in idx]):
            return
        with torch.no_grad():
            s = self.log_vars
            values = torch.stack([losses[self.tasks[i]].detach().to(s) for i in idx])
            grad = torch.zeros_like(s)
            index = torch.tensor(idx, device=s.device)
            grad[index] = 1.0 - torch.exp(-s[index]) * values
            s.grad = grad
        self.optimizer.step()
        self.log_vars.grad = None

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
