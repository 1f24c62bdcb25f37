"""ASTMT's task-specific squeeze-and-excitation modulation (Sec. 3.1), one SE block per task."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import task_se
from ._task import check_task

__all__ = ["TaskSE"]


class TaskSE(nn.Module):
    """Gates the channels of each sample with the squeeze-and-excitation block of its task.

    ``g = sigmoid(w2[t] @ relu(w1[t] @ mean_hw(x) + b1[t]) + b2[t])``, ``y = x * g (+ residual)``,
    then ReLU if asked: T plain SE blocks (Linear, ReLU, Linear, sigmoid; Hu et al.), one per
    task, run by :func:`mtlfast.ops.task_se` in one batched pass whatever the mix of tasks.

    Args:
        channels: C.
        num_tasks: T >= 1.
        reduction: the hidden width is ``R = max(C // reduction, 1)``. The SE paper and the ASTMT
            release (``nn.Linear(C, C // reduction)``) use ``C // reduction``; the floor at 1
            changes nothing for C >= reduction and keeps narrow layers (C < reduction) usable,
            where the release's block would have no hidden unit.

    Shapes:
        x, residual: (N, C, H, W); task: an int (the whole batch) or (N,) int64 (per sample).
        output: (N, C, H, W).

    Parameters, stacked over tasks: ``w1`` (T, R, C), ``b1`` (T, R), ``w2`` (T, C, R), ``b2`` (T, C),
    task t's slice being the weights of its two ``nn.Linear`` layers.
    """

    def __init__(self, channels: int, num_tasks: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"TaskSE: channels must be >= 1, got {channels}")
        if num_tasks < 1:
            raise ValueError(f"TaskSE: num_tasks must be >= 1, got {num_tasks}")
        if reduction < 1:
            raise ValueError(f"TaskSE: reduction must be >= 1, got {reduction}")
        self.channels = channels
        self.num_tasks = num_tasks
        self.reduction = reduction
        self.hidden = max(channels // reduction, 1)
        t, r, c = num_tasks, self.hidden, channels
        self.w1 = nn.Parameter(torch.empty(t, r, c))
        self.b1 = nn.Parameter(torch.empty(t, r))
        self.w2 = nn.Parameter(torch.empty(t, c, r))
        self.b2 = nn.Parameter(torch.empty(t, c))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per task: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for fan_in, params in (
            (self.channels, (self.w1, self.b1)),
            (self.hidden, (self.w2, self.b2)),
        ):
            bound = 1.0 / math.sqrt(fan_in)
            for p in params:
                nn.init.uniform_(p, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        task: int | torch.Tensor,
        residual: torch.Tensor | None = None,
        relu: bool = False,
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"TaskSE: x must have shape (N, C={self.channels}, H, W), got {got}")
        # The op checks the range of a task tensor inside itself, where compilation does not look.
        task = check_task("TaskSE", task, x, self.num_tasks, check_range=False)
        if isinstance(task, int):
            task = torch.full((x.shape[0],), task, dtype=torch.int64, device=x.device)
        return task_se(x, task, self.w1, self.b1, self.w2, self.b2, residual=residual, relu=relu)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_tasks={self.num_tasks}, reduction={self.reduction}, hidden={self.hidden}"
