"""UberNet's training procedure (Kokkinos, CVPR 2017, Sec. 3): the loss of Eq. 4 on partially
labelled batches, applied by asynchronous per-task SGD (Table 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...engine import StepResult, multi_branch_step
from ..async_sgd import SHARED, AsyncSGD, task_parameter_groups
from .base import Procedure

__all__ = ["UberNetAsyncProcedure"]


class UberNetAsyncProcedure(Procedure):
    """The engine's step (Eq. 4, lazy evaluation of unlabelled branches) with each task's loss
    summed over its labelled samples rather than averaged, then :class:`AsyncSGD`: the shared
    trunk's group counts every sample, each task's group the samples labelled for it, and a
    group is updated when its count reaches its effective batch size (the paper: 30 for the
    trunk, 10 for task parameters).

    A task's loss function averages over its labelled rows; multiplying it by their number K_t
    gives the sum over samples of Table 3 exactly when each sample contributes equally to the
    average (the same number of valid pixels), and up to that weighting otherwise. The
    trainer's gradient clipping, if set, acts on these summed gradients. The reported total is
    the plain ``sum_t w_t loss_t``.

    Args:
        model: a model of the :class:`mtlfast.models.MultiTaskModel` protocol; its groups are
            :func:`mtlfast.train.task_parameter_groups`.
        optimizer: the optimiser of its parameters (hooks are registered on it).
        shared_batch: B_0 of the shared parameters (30 in the paper).
        task_batch: B_t of every task's parameters (10 in the paper).
        batch_sizes: task -> B_t overriding ``task_batch`` (e.g. 2 for detection).
    """

    name = "ubernet_async"
    #: trains on several ranks (mtlfast.train.distributed): counters advance by every rank's samples
    distributed = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        shared_batch: int = 30,
        task_batch: int = 10,
        batch_sizes: Mapping[str, int] | None = None,
    ) -> None:
        groups = task_parameter_groups(model)
        unknown = [t for t in (batch_sizes or {}) if t not in model.tasks]
        if unknown:
            raise ValueError(
                f"UberNetAsyncProcedure: batch_sizes names tasks {unknown} not in {model.tasks}"
            )
        sizes = {
            g: (shared_batch if g == SHARED else (batch_sizes or {}).get(g, task_batch))
            for g in groups
        }
        self.model = model
        self.async_sgd = AsyncSGD(optimizer, groups, sizes)

    def counts(self, batch: dict, tasks) -> dict[str, int]:
        """Samples per group behind this batch's gradients: all of them for the trunk, the
        labelled ones for each task."""
        n = batch["image"].shape[0]
        flags = batch.get("labeled", {})
        out = {SHARED: n} if SHARED in self.async_sgd.groups else {}
        for t in tasks:
            if t in self.async_sgd.groups:
                out[t] = int(flags[t].sum()) if t in flags else n
        return out

    def train_backward(self, trainer: Any, batch: dict) -> StepResult:
        tc = trainer.config.train
        (trunk, heads), targets, loss_fns, labeled, weights = trainer._engine_inputs(batch)
        n = batch["image"].shape[0]
        flags = batch.get("labeled", {})
        tasks = list(self.model.tasks)
        per_task = {t: (int(flags[t].sum()) if t in flags else n) for t in tasks}

        def samples(key: str) -> int:
            owner = [part for part in key.split("/") if part in per_task]
            return per_task[owner[0]] if owner else n

        parallel = getattr(trainer, "parallel", None)
        if parallel is not None:  # several ranks: this rank's share of the step, global counts
            heads, loss_fns, labeled, weights = parallel.inputs
            per_task.update(parallel.labelled)
            n = parallel.global_batch
        summed = {k: w * samples(k) for k, w in weights.items()}
        result = multi_branch_step(
            trunk,
            heads,
            batch["image"],
            targets,
            loss_fns,
            labeled=labeled,
            weights=summed,
            strategy=tc.strategy,
            segments=trainer._segments(trunk),
        )
        counts = self.counts(batch, tasks)
        if parallel is not None:
            counts = {g: n if g == SHARED else per_task.get(g, c) for g, c in counts.items()}
        self.async_sgd.observe(counts)
        terms = [result.losses[k].float() * float(weights.get(k, 1.0)) for k in result.ran]
        if terms:
            result.total = sum(terms[1:], terms[0])
        return result

    def state_dict(self) -> dict:
        return {"async_sgd": self.async_sgd.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.async_sgd.load_state_dict(state["async_sgd"])
