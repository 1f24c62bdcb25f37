"""Fixed task weights: the loss ``sum_t w_t L_t`` with constant ``w_t`` (1 unless given)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._base import Balancer

__all__ = ["Fixed"]


class Fixed(Balancer):
    """Constant weights: what training does without a balancing method.

    Args:
        tasks: the task names.
        weights: task -> w_t (finite, non-negative); 1 for a task not named.

    ``loss_weights()`` gives Python floats, so an engine step with ``Fixed`` multiplies each loss
    exactly as ``multi_branch_step(weights=...)`` does: the same gradients bit for bit.
    """

    needs = "none"

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = [t for t in weights if t not in self.tasks]
        if unknown:
            raise ValueError(
                f"weights has task {unknown[0]!r}, not one of tasks {list(self.tasks)}"
            )
        values = []
        for t in self.tasks:
            w = weights.get(t, 1.0)
            if (
                isinstance(w, bool)
                or not isinstance(w, (int, float))
                or not w >= 0
                or w == float("inf")
            ):
                raise ValueError(f"weights[{t!r}] must be a finite non-negative number, got {w!r}")
            values.append(float(w))
        self.register_buffer("task_weights", torch.tensor(values, dtype=torch.float64))

    def _weights(self) -> torch.Tensor:
        return self.task_weights

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        return dict(zip(self.tasks, self.task_weights.tolist()))
