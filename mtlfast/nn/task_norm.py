"""ASTMT's task-specific batch normalisation (Sec. 3.2): one BatchNorm2d per task, one pass."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.batch_norm_train import batch_norm
from ._task import check_task

__all__ = ["TaskBatchNorm2d"]


class TaskBatchNorm2d(nn.Module):
    """Normalises each sample with the batch norm of its task: T ``nn.BatchNorm2d`` in one layer.

    In training, each task present in the batch is normalised with the statistics of its own
    samples, and only its running statistics move; tasks absent from the batch keep theirs. In
    evaluation each sample uses its task's running statistics. ``eps`` and ``momentum`` (None: a
    cumulative average, counted per task) mean what they mean for ``nn.BatchNorm2d``.

    An int task runs ``F.batch_norm`` on that task's rows of parameters and statistics. A task
    vector runs every task at once without grouping or copying the batch: per-task sums by
    ``index_add`` over samples, then one affine pass with each sample's scale and shift. Beyond
    the range check of the task vector, which runs in eager mode only, it reads no task value
    back to the host, so it compiles into one graph.

    Args:
        channels: C.
        num_tasks: T >= 1.
        eps, momentum: as for ``nn.BatchNorm2d``.

    Shapes:
        x: (N, C, H, W); task: an int (the whole batch) or (N,) int64 (per sample).
        output: (N, C, H, W).

    Parameters ``weight``, ``bias`` and buffers ``running_mean``, ``running_var`` are (T, C),
    ``num_batches_tracked`` is (T,): row t holds task t's ``nn.BatchNorm2d`` state.
    """

    def __init__(
        self, channels: int, num_tasks: int, eps: float = 1e-5, momentum: float | None = 0.1
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"TaskBatchNorm2d: channels must be >= 1, got {channels}")
        if num_tasks < 1:
            raise ValueError(f"TaskBatchNorm2d: num_tasks must be >= 1, got {num_tasks}")
        if not eps > 0:
            raise ValueError(f"TaskBatchNorm2d: eps must be > 0, got {eps}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"TaskBatchNorm2d: momentum must be in [0, 1] or None, got {momentum}")
        self.channels = channels
        self.num_tasks = num_tasks
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_tasks, channels))
        self.bias = nn.Parameter(torch.zeros(num_tasks, channels))
        self.register_buffer("running_mean", torch.zeros(num_tasks, channels))
        self.register_buffer("running_var", torch.ones(num_tasks, channels))
        self.register_buffer("num_batches_tracked", torch.zeros(num_tasks, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"TaskBatchNorm2d: x must have shape (N, C={self.channels}, H, W), got {got}"
            )
        task = check_task("TaskBatchNorm2d", task, x, self.num_tasks)
        if isinstance(task, int):
            # batch_norm takes the cumulative average's factor as a float, read from the per-task
            # counter: a compiled graph cannot, so that case takes the per-sample path.
            if not (self.training and self.momentum is None):
                return self._one_task(x, task)
            task = torch.full((x.shape[0],), task, dtype=torch.int64, device=x.device)
        if self.training and x.shape[2] * x.shape[3] == 1 and not torch.compiler.is_compiling():
            alone = torch.bincount(task, minlength=self.num_tasks) == 1
            if bool(alone.any()):
                raise ValueError(
                    "TaskBatchNorm2d: expected more than 1 value per channel when training, but tasks "
                    f"{alone.nonzero().flatten().tolist()} have a single 1x1 sample"
                )
        return self._per_sample(x, task)

    def _one_task(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return batch_norm(x, *self._one_task_args(t), self.eps)

    def _one_task_args(
        self, t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool, float]:
        """``(running_mean, running_var, weight, bias, training, momentum)`` of task ``t`` as
        ``F.batch_norm`` takes them (rows of this layer's parameters and statistics), the task's
        ``num_batches_tracked`` advanced in training: call once per forward of an int task
        (with ``momentum`` not None in training)."""
        if self.training:
            self.num_batches_tracked[t] += 1
        factor = self.momentum if self.training else 0.0
        # Row views: batch_norm updates task t's running statistics in place.
        return (
            self.running_mean[t],
            self.running_var[t],
            self.weight[t],
            self.bias[t],
            self.training,
            factor,
        )

    def _per_sample(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        if not self.training:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            return torch.addcmul(
                shift[task][:, :, None, None], xa, scale[task][:, :, None, None]
            ).to(x.dtype)
        _, c, h, w = x.shape
        per_task = xa.new_zeros(self.num_tasks, c)
        # Counted by comparison: inductor (torch 2.13) fails to generate an index_add of ones at a
        # constant index, which an int task with momentum=None becomes under compilation.
        tasks = torch.arange(self.num_tasks, device=x.device)
        count = (task[:, None] == tasks).sum(0).to(acc) * (h * w)
        divisor = count.clamp_min(1)[:, None]
        mean = per_task.index_add(0, task, xa.sum((2, 3))) / divisor
        # Two passes (mean, then squared deviations) rather than E[x^2] - mean^2, which cancels.
        centred = xa - mean[task][:, :, None, None]
        var = per_task.index_add(0, task, centred.square().sum((2, 3))) / divisor
        self._update_running_stats(mean, var, count)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return torch.addcmul(
            self.bias[task][:, :, None, None], centred, scale[task][:, :, None, None]
        ).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        present = count > 0
        self.num_batches_tracked.add_(present.long())
        if self.momentum is None:
            factor = (1.0 / self.num_batches_tracked.clamp_min(1).to(mean.dtype))[:, None]
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1).clamp_min(1))[:, None]
        keep = ~present[:, None]
        for buffer, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
            new = buffer + factor * (batch.to(buffer.dtype) - buffer)
            buffer.copy_(torch.where(keep, buffer, new))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_tasks={self.num_tasks}, eps={self.eps}, momentum={self.momentum}"
