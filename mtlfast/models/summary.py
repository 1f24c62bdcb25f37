"""Parameter counts (total, shared, per task) and multiply-adds of a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.winograd_conv import _flop_formulas as _winograd_flop_formulas

__all__ = ["ModelSummary", "summary"]


@dataclass
class ModelSummary:
    """Sizes of a model at one input size.

    Attributes:
        params_total: every parameter, counted once.
        params_shared: parameters used by every task.
        params_per_task: task -> its own parameters (``model.parameter_split()``: parameters
            under a module dict entry named for the task, e.g. ``heads.<task>`` or a joint
            decoder's per-task layers, and 1/T of each stacked per-task tensor: task SE, task
            batch norm, adapters, distillation).
            ``params_shared + sum(params_per_task.values()) == params_total``.
        macs: multiply-adds of one eval-mode forward pass over all tasks (FlopCounterMode's
            FLOPs / 2), for the batch in ``input_size``. A convolution counts as the direct
            one whatever its algorithm (Winograd's, after :func:`mtlfast.nn.use_winograd` or
            the trainer, included), so a model's count does not change when it is trained.
            The fused custom ops (task SE, skip fusion) are not counted: they are elementwise
            and their small matrices are negligible against the convolutions.
        input_size: (N, 3, H, W).
    """

    params_total: int
    params_shared: int
    params_per_task: dict[str, int]
    macs: int
    input_size: tuple[int, ...]

    def __str__(self) -> str:
        rows = [
            (
                f"input {self.input_size}: {self.params_total / 1e6:.2f}M parameters, "
                f"{self.params_shared / 1e6:.2f}M shared, {self.macs / 1e9:.2f} GMACs"
            )
        ]
        rows += [f"  {t}: {n / 1e6:.3f}M own parameters" for t, n in self.params_per_task.items()]
        return "\n".join(rows)


def summary(model: nn.Module, input_size: Sequence[int]) -> ModelSummary:
    """Counts ``model``'s parameters and multiply-adds for an input of ``input_size`` ((H, W) or (N, 3, H, W)).

    The forward pass runs in eval mode under no_grad (``model.summary_forward`` when the model
    defines it, e.g. ASTMT's all-task pass) on zeros on the model's device; the mode is restored.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (1, 3, *size)
    if len(size) != 4:
        raise ValueError(
            f"summary: input_size must be (H, W) or (N, 3, H, W), got {tuple(input_size)}"
        )
    total = sum(p.numel() for p in model.parameters())
    if hasattr(model, "parameter_split"):
        shared, per_task = model.parameter_split()
    else:
        shared, per_task = total, {}
    param = next(model.parameters(), None)
    x = torch.zeros(size, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        # imported here: torch.utils.flop_counter imports Triton, 0.2 s that `import mtlfast` need not pay
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=_winograd_flop_formulas())
        with torch.no_grad(), counter:
            getattr(model, "summary_forward", model)(x)
    finally:
        model.train(was_training)
    return ModelSummary(total, shared, per_task, counter.get_total_flops() // 2, size)
