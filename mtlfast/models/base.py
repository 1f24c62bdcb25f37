"""The protocol every mtlfast model implements: tasks, trunk, heads, expand, engine_branches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..nn import MultiModalDistillation, ResidualAdapter, TaskBatchNorm2d, TaskSE
from ._checks import check_images
from .trunk import build_trunk

__all__ = ["MultiTaskModel"]

# Modules whose own parameters stack one row per task along dim 0: all of them (None) or those named.
_STACKED: tuple[tuple[type[nn.Module], tuple[str, ...] | None], ...] = (
    (TaskSE, None),
    (TaskBatchNorm2d, None),
    (ResidualAdapter, ("adapter_weight",)),
    (MultiModalDistillation, None),
)


def _stacked_parameters(module: nn.Module, num_tasks: int) -> list[nn.Parameter]:
    """``module``'s per-task stacked parameters when it stacks ``num_tasks`` > 1 rows, else none.

    A stacked module with one row is a shared one (e.g. ASTMT's SE without task modulation).
    """
    if num_tasks < 2 or getattr(module, "num_tasks", None) != num_tasks:
        return []
    for cls, names in _STACKED:
        if isinstance(module, cls):
            return [
                p for n, p in module.named_parameters(recurse=False) if names is None or n in names
            ]
    return []


class MultiTaskModel(nn.Module):
    """The base of every mtlfast model: one way in for a trainer, the engine and a user's own loop.

    The protocol:

    - ``tasks``: the final task names (list), in the order of ``out_channels``.
    - ``out_channels``: task -> C_t, the channels of its prediction.
    - ``trunk``: an nn.Sequential (a view over the model's own layers, built on each access),
      image -> shared representation; ``heads``: a mapping name -> module, representation ->
      the task's prediction or a dict key -> prediction (a joint decoder, or deep supervision;
      such a head lists its keys in a ``tasks`` attribute).
    - ``forward(x)``: dict key -> prediction for all tasks; in training mode models with deep
      supervision add keys ``"<task>/<what>"`` (UberNet) or ``"deep_supervision/<level>/<task>"``
      (MTI-Net, PAD-Net).
    - ``expand(mapping)``: a task -> value dict (targets, loss functions, weights, labeled
      masks) extended to every key the forward returns in the current mode.
    - ``engine_branches()``: ``(trunk, heads)`` for :func:`mtlfast.engine.multi_branch_step`;
      ``(self.trunk, self.heads)`` unless the model has no task-independent trunk (ASTMT).
    - ``engine_segments``: the trunk segments the trainer's recompute step uses when the config
      sets none (``train.segments``); None leaves the engine's ``round(sqrt(L))``.

    One training step, any model::

        step = multi_branch_step(*model.engine_branches(), images, model.expand(targets),
                                 model.expand(loss_fns), labeled=model.expand(labeled),
                                 weights=model.expand(weights))

    gives the gradients of ``sum_k weights[k] * loss_fns[k](model(images)[k], targets[k])`` over
    the expanded keys k (the labelled rows of each), ASTMT's being the sum of its T single-task
    passes.

    Parameter attribution (:meth:`parameter_split`, used by :func:`mtlfast.models.summary`): a
    parameter under an ``nn.ModuleDict`` entry keyed by a task name (``heads.<task>``, a joint
    decoder's per-task layers) belongs to that task; stacked per-task tensors (task SE, task
    batch norm, residual adapters, distillation, with one row per task) give each task 1/T;
    everything else is shared.

    Shapes: x (N, 3, H, W) -> {key: (N, C_t, H, W), ...}.
    """

    tasks: list[str]
    out_channels: dict[str, int]
    backbone: nn.Module
    heads: nn.ModuleDict
    scales: tuple[float, ...] = (1.0,)
    engine_segments: int | None = None

    @property
    def trunk(self) -> nn.Sequential:
        """An nn.Sequential over the backbone's layers (a view, built on each access): image ->
        (image, per-scale features...), see :mod:`mtlfast.models.trunk`."""
        return build_trunk(self.backbone, self.scales)

    def engine_branches(self) -> tuple[nn.Sequential, Mapping[str, nn.Module]]:
        """``(trunk, heads)``, the first two arguments of :func:`mtlfast.engine.multi_branch_step`."""
        return self.trunk, self.heads

    def _output_keys(self) -> list[str]:
        """Every key the forward returns in the current mode: each head's ``tasks``, else its name."""
        keys: list[str] = []
        for name, head in self.heads.items():
            keys += list(getattr(head, "tasks", None) or (name,))
        return keys

    def expand(self, mapping: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """``mapping`` (task -> value: targets, loss functions, weights, labeled masks) extended to
        every key the forward returns in the current mode: a deep-supervision key gets its task's
        value. Keys already in ``mapping`` are kept as given, a key whose task is missing stays
        missing; None stays None. Without deep supervision, a copy of ``mapping``.
        """
        if mapping is None:
            return None
        out = dict(mapping)
        tasks = set(self.tasks)
        for key in self._output_keys():
            if key in out:
                continue
            # task names hold no '/', so a key's task is the one component that is a task
            owner = [part for part in key.split("/") if part in tasks]
            if len(owner) == 1 and owner[0] in mapping:
                out[key] = mapping[owner[0]]
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x, type(self).__name__)
        rep = self.trunk(x)
        out: dict[str, torch.Tensor] = {}
        for task, head in self.heads.items():
            pred = head(rep)
            out.update(pred if isinstance(pred, dict) else {task: pred})
        return out

    def parameter_split(self) -> tuple[int, dict[str, int]]:
        """(shared parameter count, task -> count of its own parameters); they add up to the total."""
        tasks = list(self.tasks)
        t = len(tasks)
        per_task = {name: 0 for name in tasks}
        owner: dict[int, str] = {}
        stacked: set[int] = set()
        for module in self.modules():
            if isinstance(module, nn.ModuleDict):
                for key, child in module.items():
                    if key in per_task:
                        for p in child.parameters():
                            owner.setdefault(id(p), key)
            stacked |= {id(p) for p in _stacked_parameters(module, t)}
        shared = 0
        for p in self.parameters():
            if id(p) in owner:
                per_task[owner[id(p)]] += p.numel()
            elif id(p) in stacked:
                for name in tasks:
                    per_task[name] += p.numel() // t
            else:
                shared += p.numel()
        return shared, per_task
