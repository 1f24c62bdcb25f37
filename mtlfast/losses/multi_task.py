"""Per-task loss callables and their weighted sum (ASTMT / MTI-Net loss weights)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .binary import edge_loss, saliency_loss
from .depth import depth_loss
from .normals import normals_loss
from .segmentation import cross_entropy_loss

__all__ = ["NYUD_WEIGHTS", "PASCAL_WEIGHTS", "TASK_LOSSES", "MultiTaskLoss", "for_task"]

LossFn = Callable[..., torch.Tensor]

#: ASTMT (appendix; release ``LOSS_MULT``) and MTI-Net ``configs/pascal/*.yml``.
PASCAL_WEIGHTS: dict[str, float] = {
    "edge": 50.0,
    "semseg": 1.0,
    "parts": 2.0,
    "normals": 10.0,
    "saliency": 5.0,
}
#: MTI-Net ``configs/nyud/hrnet18/mti_net+edges_normals.yml`` (semseg and depth alone: 1 and 1).
NYUD_WEIGHTS: dict[str, float] = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}

#: task -> ``loss(prediction, target, labeled=None) -> 0-dim tensor``.
TASK_LOSSES: dict[str, LossFn] = {
    "semseg": cross_entropy_loss,
    "parts": cross_entropy_loss,
    "saliency": saliency_loss,
    "normals": normals_loss,
    "edge": edge_loss,
    "depth": depth_loss,
}


def for_task(task: str, **options) -> LossFn:
    """The loss of ``task`` as ``fn(prediction, target, labeled=None) -> 0-dim tensor``, with
    ``options`` bound (``pos_weight`` for edge, ``gradient_weight`` for depth, ...). Usable as a
    ``loss_fns`` entry of :func:`mtlfast.engine.multi_branch_step`."""
    if task not in TASK_LOSSES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_LOSSES)}")
    fn = TASK_LOSSES[task]
    return functools.partial(fn, **options) if options else fn


class MultiTaskLoss(nn.Module):
    """``sum_t weights[t] * loss_t``, each ``loss_t`` averaged over the samples labelled for t
    (UberNet Eq. 4); a task with no labelled sample adds a zero still connected to its prediction.

    Args:
        weights: task -> weight; its keys are the tasks. Defaults to :data:`PASCAL_WEIGHTS`.
        losses: task -> loss callable overriding :func:`for_task` (e.g. ``for_task("depth",
            gradient_weight=1.0)`` for ASTMT's depth loss).

    Shapes: ``forward(predictions, targets, labeled=None)`` takes dicts task -> tensor as the
    task losses expect ((N, ...) each) and labeled task -> (N,) bool (missing: all labelled);
    returns ``(total, losses)``: a 0-dim tensor and task -> 0-dim unweighted loss.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        losses: Mapping[str, LossFn] | None = None,
    ) -> None:
        super().__init__()
        self.weights = dict(PASCAL_WEIGHTS if weights is None else weights)
        losses = dict(losses or {})
        unknown = set(losses) - set(self.weights)
        if unknown:
            raise ValueError(f"losses given for tasks without a weight: {sorted(unknown)}")
        self.losses = {t: losses[t] if t in losses else for_task(t) for t in self.weights}

    @property
    def tasks(self) -> list[str]:
        return list(self.weights)

    def forward(
        self,
        predictions: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        labeled: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labeled = labeled or {}
        missing = [t for t in self.weights if t not in predictions or t not in targets]
        if missing:
            raise ValueError(f"tasks {missing} lack a prediction or a target")
        losses = {
            t: self.losses[t](predictions[t], targets[t], labeled.get(t)) for t in self.weights
        }
        total = None
        for t, loss in losses.items():
            term = self.weights[t] * loss
            total = term if total is None else total + term
        return total, losses
