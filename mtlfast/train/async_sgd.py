"""UberNet's asynchronous SGD (Kokkinos, CVPR 2017, Sec. 3, Eq. 5-9 and Table 3) around any optimiser."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["AsyncSGD", "task_parameter_groups"]

SHARED = "shared"


def task_parameter_groups(
    model: nn.Module, tasks: Sequence[str] | None = None
) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``model`` as ``{"shared": [...], task: [...], ...}``.

    A parameter under an ``nn.ModuleDict`` entry keyed by a task name (``heads.<task>``, a joint
    decoder's per-task layers) is that task's (UberNet's w_t); everything else is the shared
    trunk's (w_0), stacked per-task tensors (task SE rows) included. ``tasks``: default
    ``model.tasks``. Tasks without parameters of their own get no group.
    """
    tasks = list(getattr(model, "tasks", []) if tasks is None else tasks)
    owner: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, nn.ModuleDict):
            for key, child in module.items():
                if key in tasks:
                    for p in child.parameters():
                        owner.setdefault(id(p), key)
    groups: dict[str, list[nn.Parameter]] = {SHARED: []}
    groups.update({t: [] for t in tasks})
    for p in model.parameters():
        if p.requires_grad:
            groups[owner.get(id(p), SHARED)].append(p)
    return {name: ps for name, ps in groups.items() if ps}


class AsyncSGD:
    """Table 3's asynchronous updates: one gradient accumulator and one sample counter per
    parameter group, a group updated only when its counter reaches its effective batch size B_p.

    UberNet trains on a union of datasets, each labelled for some tasks. Plain SGD averages a
    task's gradient over the whole minibatch (Eq. 8: ``(1/B) sum_i delta_{t,i} grad``), so a
    task labelled on few samples gets small, noisy updates. Here each group p (the shared trunk
    and each task's parameters) adds the gradients of the samples that concern it to its
    accumulator ``dw_p`` and counts them in ``c_p``; once ``c_p`` reaches ``B_p`` the group is
    updated with ``dw_p / c_p`` (Eq. 9: the mean over B_p of its own samples) by the wrapped
    optimiser, whose weight decay and momentum then act on that group's steps only, and
    ``c_p, dw_p`` reset. With plain SGD (no momentum, weight decay lambda) this is Table 3's
    ``w_p <- w_p - lr (lambda w_p + dw_p / B_p)``. The paper: B_p = 10 for task parameters, 30
    for the shared trunk (2 for detection).

    Table 3 streams single samples, so ``c_p`` meets ``B_p`` exactly. With minibatches a counter
    can pass ``B_p`` within a batch: the group is then updated after that batch with the mean
    over the ``c_p >= B_p`` samples it has seen (no per-sample gradient is kept to split the batch).

    The gradients given must be sums over the batch's samples (``sum_i sum_t delta_{t,i}
    gamma_t grad L_t``), not means: weight a task's batch-averaged loss by the number of its
    labelled samples, as :class:`mtlfast.train.procedures.UberNetAsyncProcedure` does.

    Use::

        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        asgd = AsyncSGD(opt, task_parameter_groups(model), {"shared": 30, "semseg": 10, ...})
        ...
        loss.backward()                      # summed over samples
        asgd.step({"shared": n, "semseg": k_semseg, ...})   # labelled samples per group
        opt.zero_grad(set_to_none=True)

    ``step(counts)`` is ``observe(counts)`` then ``optimizer.step()``: the work happens in hooks
    on the wrapped optimiser, so a loop (or a ``GradScaler``) that calls ``optimizer.step()``
    itself only needs ``observe(counts)`` before it. Learning-rate schedulers act on the wrapped
    optimiser as usual. ``state_dict()`` holds the counters and accumulators for checkpoints.

    Args:
        optimizer: any torch optimiser holding every grouped parameter.
        groups: name -> parameters (disjoint), e.g. :func:`task_parameter_groups`.
        batch_sizes: name -> B_p >= 1, for every group; or an int for all.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: Mapping[str, Iterable[nn.Parameter]],
        batch_sizes: Mapping[str, int] | int,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"AsyncSGD: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.groups = {name: list(ps) for name, ps in groups.items()}
        if not self.groups:
            raise ValueError("AsyncSGD: groups is empty")
        if isinstance(batch_sizes, int):
            batch_sizes = dict.fromkeys(self.groups, batch_sizes)
        missing = [g for g in self.groups if g not in batch_sizes]
        if missing:
            raise ValueError(f"AsyncSGD: batch_sizes has no B_p for groups {missing}")
        bad = {
            g: b
            for g, b in batch_sizes.items()
            if isinstance(b, bool) or not isinstance(b, int) or b < 1
        }
        if bad:
            raise ValueError(f"AsyncSGD: batch_sizes must be ints >= 1, got {bad}")
        self.batch_sizes = {g: int(batch_sizes[g]) for g in self.groups}
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        seen: dict[int, str] = {}
        for name, ps in self.groups.items():
            for p in ps:
                if id(p) in seen:
                    raise ValueError(
                        f"AsyncSGD: a parameter is in groups {seen[id(p)]!r} and {name!r}"
                    )
                if id(p) not in in_optimizer:
                    raise ValueError(
                        f"AsyncSGD: a parameter of group {name!r} is not in the optimizer"
                    )
                seen[id(p)] = name
        self.counters = dict.fromkeys(self.groups, 0)
        self.accumulators: dict[str, list[torch.Tensor | None]] = {
            g: [None] * len(ps) for g, ps in self.groups.items()
        }
        self.updated: list[str] = []  # the groups the last step updated
        self._pending: dict[str, int] | None = None
        self._due: list[str] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def observe(self, counts: Mapping[str, int]) -> None:
        """How many samples lie behind the gradients now in ``.grad``, per group: the batch size
        for "shared", each task's labelled samples for its group (missing: 0). The next
        ``optimizer.step()`` consumes them."""
        unknown = [g for g in counts if g not in self.groups]
        if unknown:
            raise ValueError(
                f"AsyncSGD.observe: unknown groups {unknown}; groups are {list(self.groups)}"
            )
        bad = {g: c for g, c in counts.items() if int(c) < 0}
        if bad:
            raise ValueError(f"AsyncSGD.observe: counts must be >= 0, got {bad}")
        self._pending = {g: int(c) for g, c in counts.items()}

    def step(self, counts: Mapping[str, int]) -> list[str]:
        """``observe(counts)``, then the wrapped optimiser's step; returns the groups updated."""
        self.observe(counts)
        self.optimizer.step()
        return list(self.updated)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def remove(self) -> None:
        """Unregisters the hooks: the optimiser steps synchronously again."""
        for h in self._handles:
            h.remove()

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._pending is None:
            raise RuntimeError(
                "AsyncSGD: call observe(counts) (or AsyncSGD.step(counts)) before optimizer.step(): "
                "the counters need the samples behind the gradients"
            )
        counts, self._pending = self._pending, None
        self._due = []
        for name, params in self.groups.items():
            acc = self.accumulators[name]
            for k, p in enumerate(params):
                if p.grad is not None:
                    if acc[k] is None:
                        acc[k] = p.grad.detach().clone()
                    else:
                        acc[k].add_(p.grad)
            self.counters[name] += counts.get(name, 0)
            due = self.counters[name] >= self.batch_sizes[name]
            if due:
                self._due.append(name)
            for k, p in enumerate(params):
                # a group that is not due has no gradient this step: the optimiser skips it,
                # momentum and weight decay included
                p.grad = acc[k] / self.counters[name] if due and acc[k] is not None else None

    def _after_step(self, optimizer, args, kwargs) -> None:
        for name in self._due:
            self.counters[name] = 0
            self.accumulators[name] = [None] * len(self.groups[name])
        self.updated, self._due = self._due, []

    def state_dict(self) -> dict:
        """Counters and accumulators (None where nothing accumulated), by group name."""
        return {
            "counters": dict(self.counters),
            "accumulators": {g: list(acc) for g, acc in self.accumulators.items()},
            "batch_sizes": dict(self.batch_sizes),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["counters"]) != set(self.groups):
            raise ValueError(
                f"AsyncSGD.load_state_dict: groups {sorted(state['counters'])} do not match {sorted(self.groups)}"
            )
        self.counters = {g: int(c) for g, c in state["counters"].items()}
        for g, acc in state["accumulators"].items():
            params = self.groups[g]
            if len(acc) != len(params):
                raise ValueError(
                    f"AsyncSGD.load_state_dict: group {g!r} has {len(params)} parameters, the state {len(acc)}"
                )
            self.accumulators[g] = [
                None if a is None else a.to(device=p.device, dtype=p.dtype)
                for a, p in zip(acc, params)
            ]
