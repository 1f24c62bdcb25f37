"""The per-sample task argument shared by the task-conditioned layers."""

from __future__ import annotations

import torch

__all__ = ["check_task"]


def check_task(
    layer: str, task: object, x: torch.Tensor, num_tasks: int, *, check_range: bool = True
) -> int | torch.Tensor:
    """``task`` validated against ``x`` (N, ...): an int in [0, T), or an (N,) int64 tensor on x's device.

    The range of a tensor is checked in eager mode only: it reads the values, which a graph
    compiled with ``fullgraph=True`` cannot do; there an out-of-range index fails in the indexing.
    """
    if isinstance(task, bool) or not isinstance(task, (int, torch.Tensor)):
        raise TypeError(
            f"{layer}: task must be an int or an (N,) int64 tensor, got {type(task).__name__}"
        )
    if isinstance(task, int):
        if not 0 <= task < num_tasks:
            raise ValueError(f"{layer}: task must lie in [0, {num_tasks}), got {task}")
        return task
    n = x.shape[0]
    if task.dtype != torch.int64:
        raise TypeError(f"{layer}: task must be an int64 tensor of task indices, got {task.dtype}")
    if task.dim() != 1 or task.shape[0] != n:
        raise ValueError(
            f"{layer}: task must be an int or have shape (N,) = ({n},), got {tuple(task.shape)}"
        )
    if task.device != x.device:
        raise ValueError(f"{layer}: task is on {task.device} but x is on {x.device}")
    if check_range and n and not torch.compiler.is_compiling():
        low, high = int(task.min()), int(task.max())
        if low < 0 or high >= num_tasks:
            raise ValueError(
                f"{layer}: task indices must lie in [0, {num_tasks}), got values in [{low}, {high}]"
            )
    return task
