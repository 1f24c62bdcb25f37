"""The procedure a config names, built for the trainer's model and optimiser."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .astmt import ASTMTProcedure
from .base import Procedure
from .ubernet import UberNetAsyncProcedure

__all__ = ["PROCEDURES", "build_procedure"]

#: config ``procedure.name`` -> what it builds (None: the trainer's own engine step)
PROCEDURES: dict[str, type[Procedure] | None] = {
    "standard": None,
    "astmt": ASTMTProcedure,
    "ubernet_async": UberNetAsyncProcedure,
}


def build_procedure(
    config: Any, model: nn.Module, optimizer: torch.optim.Optimizer
) -> Procedure | None:
    """``config.procedure`` (name and options) for ``model`` trained by ``optimizer``; None for
    "standard". Call it before building the learning-rate schedule: procedures may add
    parameter groups to the optimiser."""
    name, options = config.procedure.name, dict(config.procedure.options)
    if name not in PROCEDURES:
        raise ValueError(f"procedure.name must be one of {sorted(PROCEDURES)}, got {name!r}")
    cls = PROCEDURES[name]
    if cls is None:
        if options:
            raise ValueError(
                f"procedure.options: the standard procedure takes none, got {sorted(options)}"
            )
        return None
    if config.train.precision == "fp16":
        raise ValueError(
            f"procedure {name!r} runs its own backward: train.precision fp16 (the gradient scaler) is not supported; use bf16"
        )
    if cls is ASTMTProcedure:
        options.setdefault("max_steps", config.train.max_steps)
        options.setdefault("grad_clip", config.train.grad_clip)
    try:
        return cls(model, optimizer, **options)
    except TypeError as e:  # an option the procedure does not take, or a model it cannot train
        raise ValueError(f"procedure.options ({name}): {e}") from None
