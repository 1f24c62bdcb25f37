"""One step's dealings with a balancer (``mtlfast.balancing``): weights in, per-task gradients
out, the trunk's starting gradient back.

The engine knows a balancer by its protocol only (``tasks``, ``needs``, ``loss_weights``,
``shared_layer``, ``observe``, ``combine``, ``update``): it does not import the methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ._replay import no_autocast
from ._segments import _is_float_tensor

__all__ = ["BalanceRun"]

_PROTOCOL = ("tasks", "needs", "loss_weights", "update")


class BalanceRun:
    """A balancer's part in one :func:`mtlfast.engine.multi_branch_step`.

    Step keys (the engine's tasks: ``"semseg"``, ``"deep_supervision/scale_0/semseg"``, ...)
    belong to the balancer task that is the key or one of its '/'-separated components. Task t's
    loss is ``L_t = sum_k c_k loss_k`` over its keys (``c_k`` the step's ``weights``) and each key
    is weighted ``c_k * loss_weights()[t]``.

    ``needs == "layer"``: each key's branching-point gradient is carried to the balancer's shared
    layer W through the trunk's graph (:meth:`set_graph`: in recompute mode the last segment's,
    kept from the forward), summed per task, and handed to ``observe`` once the task's branches
    are done: only W-sized gradients of unfinished tasks are held. ``needs == "features"``: the
    branching-point gradients are summed per task and all kept; ``combine`` turns them into the
    gradient the trunk's backward starts from.
    """

    def __init__(self, balancer: Any, modules: Sequence[nn.Module], plan: Any) -> None:
        lacking = [a for a in _PROTOCOL if not hasattr(balancer, a)]
        if lacking:
            raise TypeError(
                f"balancer must follow mtlfast.balancing.Balancer's protocol; "
                f"{type(balancer).__name__} lacks {lacking}"
            )
        self.balancer = balancer
        self.tasks = tuple(balancer.tasks)
        self.needs = balancer.needs
        if self.needs not in ("none", "layer", "features"):
            raise ValueError(
                f"balancer.needs must be 'none', 'layer' or 'features', got {self.needs!r}"
            )
        self.hw = dict(balancer.loss_weights())
        self.device = plan.device
        self.params: list[torch.Tensor] = []
        if self.needs == "layer":
            self.params = list(balancer.shared_layer(modules))
        self._owners: dict[str, str] = {}
        self.grads: dict[
            str, list[Any]
        ] = {}  # task -> summed gradient pieces (W's or the representation's)
        self._outputs: list[torch.Tensor] | None = None
        self._device_types: set[str] = set()
        # which branches each task's keys come from, when every running head declares its tasks:
        # a task whose branches are all done is handed over at once ("layer")
        self._pending: dict[str, set[str]] | None = {}
        for branch in plan.branches:
            if branch.tasks is None:
                self._pending = None
                break
            for key in branch.tasks:
                self._pending.setdefault(self.owner(key), set()).add(branch.name)

    @property
    def wants_grads(self) -> bool:
        """Whether the engine must compute each task's gradient at the branching point."""
        return self.needs != "none"

    def owner(self, key: str) -> str:
        """The balancer task a step key belongs to."""
        found = self._owners.get(key)
        if found is not None:
            return found
        if key in self.tasks:
            found = key
        else:
            parts = [p for p in key.split("/") if p in self.tasks]
            if len(parts) != 1:
                raise ValueError(
                    f"task {key!r} of the step is not one of the balancer's tasks "
                    f"{list(self.tasks)} and has {'no' if not parts else 'several'} component(s) "
                    "among them: give the balancer every task the heads predict"
                )
            found = parts[0]
        self._owners[key] = found
        return found

    def weight(self, key: str, w: Any) -> Any:
        """The factor on ``key``'s loss: the step's weight times the balancer's."""
        hw = self.hw[self.owner(key)]
        if isinstance(hw, float):
            return w * hw if hw != 1.0 else w
        return hw.to(self.device) * w

    def group(self, weighted: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """A joint head's weighted losses summed per balancer task: one backward per task, not key."""
        sums: dict[str, torch.Tensor] = {}
        for key, loss in weighted:
            t = self.owner(key)
            sums[t] = loss if t not in sums else sums[t] + loss
        return list(sums.items())

    def set_graph(self, outputs: Any, device_types: set[str]) -> None:
        """The trunk output with its graph down to W (``needs == "layer"``)."""
        self._outputs = [t for t in tree_flatten(outputs)[0] if _is_float_tensor(t)]
        self._device_types = device_types

    def take(self, key: str, grad: Any) -> None:
        """One key's (or task's) gradient at the branching point, in the representation's structure."""
        if self.needs == "none":
            return
        t = self.owner(key)
        pieces = [g for g in tree_flatten(grad)[0] if _is_float_tensor(g)]
        if self.needs == "layer":
            pieces = self._to_layer(pieces)
        held = self.grads.get(t)
        # out of place: a piece may also be the caller's (keep_task_grads)
        self.grads[t] = pieces if held is None else [h + p for h, p in zip(held, pieces)]

    def _to_layer(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """grad_W of the key's weighted loss, from its gradient at the trunk output."""
        pairs = [(o, g) for o, g in zip(self._outputs, grads) if o.requires_grad]
        with no_autocast(self._device_types):
            out = torch.autograd.grad(
                [o for o, _ in pairs],
                self.params,
                [g for _, g in pairs],
                retain_graph=True,
                allow_unused=True,
            )
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, self.params)]

    def branch_done(self, name: str) -> None:
        """Hands the tasks all of whose branches are done to ``observe`` (``needs == "layer"``)."""
        if self.needs != "layer" or self._pending is None:
            return
        for t in list(self.grads):
            left = self._pending.get(t, set())
            left.discard(name)
            if not left:
                self.balancer.observe(t, self.grads.pop(t))

    def use_trunk(self, trunk: Any) -> None:
        """Recompute mode: W's gradients come through the last segment's graph, kept from the forward."""
        if self.needs != "layer":
            return
        kept = trunk.kept
        if kept is None:
            raise ValueError(
                f"{type(self.balancer).__name__} needs the graph of the trunk segment holding its "
                "layer, and in recompute mode only the last of two or more segments keeps its graph: "
                f"use segments >= 2 (got {len(trunk.segments)}) or strategy='naive'"
            )
        last = {id(p) for m in trunk.segments[-1] for p in m.parameters()}
        if any(id(p) not in last for p in self.params):
            raise ValueError(
                f"{type(self.balancer).__name__}'s layer {getattr(self.balancer, 'layer_name', '')!r} "
                f"is not in the last trunk segment ({len(trunk.segments[-1])} modules), the only one "
                "whose graph recompute mode keeps: choose a layer there, fewer segments, or "
                "strategy='naive'"
            )
        self.set_graph(kept[2], trunk.kept_device_types)

    def start_grads(
        self, grads: list[Any], floats: list[bool], losses: dict[str, torch.Tensor]
    ) -> list[Any]:
        """The gradient the trunk's backward starts from, one entry per representation tensor
        (``floats``: which are floating): ``combine``'s, or ``grads`` (the branches' sum)."""
        if self.needs != "features" or not self.grads:
            return grads
        combined = iter(self.balancer.combine(self.grads, losses))
        self.grads = {}
        return [next(combined) if f else None for f in floats]

    def hook_outputs(self, leaves: list[Any], losses: dict[str, torch.Tensor]) -> list[Any]:
        """Naive mode: hooks replacing the trunk output's gradient by ``combine``'s; their handles."""
        if self.needs != "features" or not self.grads:
            return []
        start = self.start_grads(list(leaves), [_is_float_tensor(t) for t in leaves], losses)
        return [
            leaf.register_hook(lambda _g, c=c: c)
            for leaf, c in zip(leaves, start)
            if c is not None and leaf.requires_grad
        ]

    def task_losses(self, result: Any, plan: Any) -> dict[str, torch.Tensor]:
        """task -> ``sum_k c_k loss_k`` over its keys that ran (detached)."""
        out: dict[str, torch.Tensor] = {}
        for key in result.ran:
            c = plan.weight(key)
            term = (
                result.losses[key] if isinstance(c, float) and c == 1.0 else result.losses[key] * c
            )
            t = self.owner(key)
            out[t] = term if t not in out else out[t] + term
        return out

    def finish(self, losses: dict[str, torch.Tensor]) -> None:
        """The step is done: unfinished hand-overs, then the balancer's update."""
        if self.needs == "layer":
            for t, g in self.grads.items():
                self.balancer.observe(t, g)
            self.grads = {}
        self._outputs = None
        self.balancer.update(losses)
