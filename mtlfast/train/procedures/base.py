"""What a training procedure is to the trainer: the gradients of one step, and its own state."""

from __future__ import annotations

from typing import Any

import torch

from ...engine import StepResult

__all__ = ["Procedure"]


class Procedure:
    """How a training step computes its gradients, when paper's procedure differs from the
    default (the memory engine's summed loss over the tasks, then one optimiser step).

    The trainer builds one from ``config.procedure`` after its optimiser and before its
    learning-rate schedule (so a procedure may add parameter groups, e.g. a discriminator's, or
    hooks on the optimiser), calls :meth:`train_backward` inside its step in place of the engine,
    and then clips, steps the optimiser and zeroes the gradients as usual. :meth:`state_dict`
    rides in the trainer's checkpoints.
    """

    name = "standard"

    def train_backward(self, trainer: Any, batch: dict) -> StepResult:
        """Forward and backward of one step on ``batch`` (on the trainer's device), leaving the
        gradients in ``.grad``; returns what the engine's step returns."""
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        """Modules the procedure trains besides the model (their parameters are in the optimiser)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
