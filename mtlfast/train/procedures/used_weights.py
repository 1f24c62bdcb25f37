"""ASTMT appendix: "update only the weights that were used" by the tasks of a step."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...models.base import _stacked_parameters

__all__ = ["UsedWeightsOnly"]


class UsedWeightsOnly:
    """Optimiser hooks after which a step has moved only the parameters of the tasks that ran.

    torch's optimisers apply momentum and weight decay to every parameter with a gradient (ASTMT
    appendix: "This behaviour is not desired when using generic and task-specific weights ...
    This behaviour is avoided by ... updating only the weights that were used"). A parameter
    of one task alone (a head) has no gradient when its task did not run, once gradients are
    zeroed with ``set_to_none=True``, and torch's optimisers already skip it. What is left are
    the stacked per-task tensors (task SE, task batch norm, residual adapters: row t is task
    t's), which carry a gradient whenever any task ran: before the step these hooks save the
    rows of the tasks not in :attr:`used` (the values and the optimiser state of the same
    shape, e.g. SGD's momentum, Adam's moments), after it they put them back (fresh state rows
    at zero). Exact for SGD; Adam's per-tensor step count, which sets its bias correction, is
    shared by the rows.

    The release traces the graph of each task's loss and sets the gradient of every unused
    parameter to None (``make_closure``); its per-task modules are separate parameters.

    Args:
        optimizer: the optimiser whose steps are restricted (hooks are registered on it).
        model: the model; its stacked tensors with ``num_tasks`` rows are found by type.
        num_tasks: T.

    Set :attr:`used` (task indices; None: all) before each ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, num_tasks: int) -> None:
        self.optimizer = optimizer
        self.num_tasks = num_tasks
        self.stacked = [p for m in model.modules() for p in _stacked_parameters(m, num_tasks)]
        self.used: set[int] | None = None
        self._saved: list = []
        self._handles = [
            optimizer.register_step_pre_hook(self._save),
            optimizer.register_step_post_hook(self._restore),
        ]

    def set_used(self, tasks: Iterable[int] | None) -> None:
        """The task indices whose rows the next step may move (None: all)."""
        self.used = None if tasks is None else {int(t) for t in tasks}

    def remove(self) -> None:
        """Unregisters the hooks."""
        for h in self._handles:
            h.remove()

    def _unused(self) -> list[int]:
        if self.used is None:
            return []
        return [t for t in range(self.num_tasks) if t not in self.used]

    @torch.no_grad()
    def _save(self, optimizer, args, kwargs) -> None:
        self._saved = []
        unused = self._unused()
        if not unused or not self.stacked:
            return
        for p in self.stacked:
            if p.grad is None:
                continue  # skipped by the optimiser anyway
            idx = torch.tensor(unused, device=p.device)
            state = optimizer.state.get(p, {})
            rows = {
                k: v.index_select(0, idx)
                for k, v in state.items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape
            }
            self._saved.append((p, idx, p.index_select(0, idx), rows))

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        for p, idx, values, rows in self._saved:
            p.index_copy_(0, idx, values)
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    if k in rows:
                        v.index_copy_(0, idx, rows[k])
                    else:  # state the step created: as if these rows had never been stepped
                        v.index_fill_(0, idx, 0)
        self._saved = []
