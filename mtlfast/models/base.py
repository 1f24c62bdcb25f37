"""What every mtlfast model shares: a backbone, per-task heads, a trunk view, parameter attribution."""

from __future__ import annotations

import torch
from torch import nn

from .trunk import build_trunk

__all__ = ["MultiTaskModel"]


class MultiTaskModel(nn.Module):
    """A backbone (run as :attr:`trunk`) and one head per task (:attr:`heads`).

    ``forward(x)`` runs ``trunk`` and then every head on its output, exactly what
    :func:`mtlfast.engine.multi_branch_step` does with ``(model.trunk, model.heads)``. A head
    returns its task's prediction, or in training mode (deep supervision) a dict whose keys
    are the task and ``"<task>/<what>"``; the model's output merges them into one dict.

    Parameter attribution (used by :func:`mtlfast.models.summary`): parameters under
    ``heads.<task>`` belong to that task, everything else is shared; :meth:`parameter_split`
    may refine it (ASTMT's stacked per-task tensors).

    Attributes: tasks (list), out_channels (task -> C_t), backbone, heads (nn.ModuleDict), scales.
    Shapes: x (N, 3, H, W) -> {task: (N, C_t, H, W), ...}.
    """

    backbone: nn.Module
    heads: nn.ModuleDict
    scales: tuple[float, ...] = (1.0,)

    @property
    def trunk(self) -> nn.Sequential:
        """An nn.Sequential over the backbone's layers (a view, built on each access): image ->
        (image, per-scale features...), see :mod:`mtlfast.models.trunk`."""
        return build_trunk(self.backbone, self.scales)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: x must have shape (N, 3, H, W), got {got}")
        rep = self.trunk(x)
        out: dict[str, torch.Tensor] = {}
        for task, head in self.heads.items():
            pred = head(rep)
            out.update(pred if isinstance(pred, dict) else {task: pred})
        return out

    def parameter_split(self) -> tuple[int, dict[str, int]]:
        """(shared parameter count, task -> count of its own parameters)."""
        per_task = {t: 0 for t in self.tasks}
        shared = 0
        for name, p in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "heads" and parts[1] in per_task:
                per_task[parts[1]] += p.numel()
            else:
                shared += p.numel()
        return shared, per_task
