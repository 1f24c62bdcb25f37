"""Batch norm whose training statistics are those of the whole data-parallel batch, on any device.

``torch.nn.SyncBatchNorm`` refuses CPU tensors (its statistics kernels are CUDA's), so CPU runs
over gloo, and the tests, use :class:`SyncBatchNorm` below; on CUDA,
:func:`convert_sync_batchnorm` picks torch's own, whose fused kernels are faster. ASTMT's task
batch norm has no torch counterpart: :class:`SyncTaskBatchNorm2d` serves every device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import TaskBatchNorm2d
from ..nn._task import check_task

__all__ = ["SyncBatchNorm", "SyncTaskBatchNorm2d", "convert_sync_batchnorm", "is_sync_batchnorm"]


def _gather_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """(2C+1,) per rank -> (K, 2C+1): every rank's count, mean and sum of squared deviations."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(parts, stats, group=group)
        return torch.stack(parts)
    out = stats.new_empty(world, stats.numel())
    dist.all_gather_into_tensor(out, stats, group=group)
    return out


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every rank's rows (an empty local batch included).

    Forward: one all_gather of each rank's (count, mean, M2), combined with Chan's parallel
    formula (no cancellation of E[x^2] - E[x]^2); backward: one all_reduce of the per-channel
    sums of dy and dy * x_hat. Statistics in float32 whatever the input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        n_local = x.numel() // c if c else 0
        if n_local > 0:
            var, mean = torch.var_mean(xf, dim=dims, correction=0)
            m2 = var * n_local
        else:
            mean = m2 = xf.new_zeros(c)
        stats = torch.cat([xf.new_full((1,), float(n_local)), mean, m2])
        every = _gather_stats(stats, group)
        counts, means, m2s = every[:, :1], every[:, 1 : 1 + c], every[:, 1 + c :]
        n = counts.sum()
        if float(n) <= 1:
            raise ValueError(
                f"SyncBatchNorm: expected more than 1 value per channel when training, got {int(n)}"
            )
        mean_all = (counts * means).sum(0) / n
        var_all = (m2s + counts * (means - mean_all) ** 2).sum(0) / n
        invstd = torch.rsqrt(var_all + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(
                    mean_all.to(running_mean.dtype), alpha=momentum
                )
                unbiased = var_all * (n / (n - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean_all * scale if bias is None else bias.float() - mean_all * scale
        out = (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)
        ctx.save_for_backward(x, weight, mean_all, invstd, n)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, n = ctx.saved_tensors
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        dy = grad_out.float()
        xhat = (x.float() - mean.view(shape)) * invstd.view(shape)
        if x.numel() > 0:
            sum_dy = dy.sum(dims)
            sum_dy_xhat = (dy * xhat).sum(dims)
        else:
            sum_dy = sum_dy_xhat = dy.new_zeros(c)
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # the same on every rank: the graphs are the same
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            mean_dy, mean_dy_xhat = (both / n).split(c)
            gain = invstd if weight is None else invstd * weight.float()
            grad_x = (
                (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * gain.view(shape)
            ).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """``nn.BatchNorm{1,2,3}d`` whose training statistics span every rank of ``process_group``
    (default: the world), on any device and backend (gloo on CPU, nccl on CUDA).

    Outside training, or without an initialised process group of more than one rank, it is
    plain batch norm. A rank with no rows still takes part in the collectives (its count is 0),
    so a head that runs on no sample of one rank's batch does not hang the others. The running
    statistics move by the global mean and unbiased variance, as one process's batch norm over
    the concatenated batch would. A subclass of torch's ``_BatchNorm``: the memory engine's
    segment replay freezes its statistics on recomputation like any batch norm.

    Shapes: (N, C, ...) -> same.
    """

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        synced = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        if not synced:
            return super().forward(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        tracking = self.track_running_stats and self.running_mean is not None
        if tracking:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.eps,
            momentum,
            group,
        )


class SyncTaskBatchNorm2d(TaskBatchNorm2d):
    """:class:`mtlfast.nn.TaskBatchNorm2d` whose training statistics span every rank of
    ``process_group`` (default: the world): each task's samples are normalised by the statistics
    of that task's samples on all ranks, as one process's task batch norm over the concatenated
    batch would.

    An int task runs :class:`SyncBatchNorm`'s function on the task's rows of the parameters and
    running statistics (views, so its in-place update lands in the (T, C) buffers); a task vector
    runs it once per task present on any rank, on that task's samples. Which tasks those are
    takes one all-reduce of the (T,) sample counts per call: a task absent from every rank must
    neither run (no statistics to pool) nor count a batch, as in one process, and one present
    elsewhere must run here on no row so that the ranks issue the same collectives in the same
    order (iterating over all T tasks instead would cost a collective per absent task and still
    not tell absent from present). ``num_batches_tracked`` and ``momentum`` (None: a cumulative
    average, per task) move as the task batch norm's. Outside training, or without an
    initialised process group of more than one rank, it is plain :class:`TaskBatchNorm2d`. The
    same parameters, buffers and state-dict keys as the task batch norm, of which it is a
    subclass: checkpoints load either way, and the recomputation of
    :func:`mtlfast.models._common.recomputed` and of the memory engine's segment replay puts
    its running statistics back as it does the task batch norm's. Eager mode only (it reads the
    counts on the host).

    Shapes: x (N, C, H, W); task an int or (N,) int64 -> (N, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_tasks: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        *,
        process_group=None,
    ) -> None:
        super().__init__(channels, num_tasks, eps, momentum)
        self.process_group = process_group

    def _synced_group(self):
        """The process group to pool the statistics over, or None for plain task batch norm."""
        group = self.process_group or dist.group.WORLD
        if (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        ):
            return group
        return None

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        group = self._synced_group()
        if group is None:
            return super().forward(x, task)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"TaskBatchNorm2d: x must have shape (N, C={self.channels}, H, W), got {got}"
            )
        task = check_task("TaskBatchNorm2d", task, x, self.num_tasks)
        if isinstance(task, int):
            # every rank runs the same task's pass (on no row where it has none)
            return self._synced_task(x, task, group)
        return self._synced_tasks(x, task, group)

    def _synced_task(self, x: torch.Tensor, t: int, group) -> torch.Tensor:
        self.num_batches_tracked[t] += 1
        momentum = self.momentum
        if momentum is None:  # cumulative average over task t's batches
            momentum = 1.0 / float(self.num_batches_tracked[t])
        return _SyncBatchNormFunction.apply(
            x,
            self.weight[t],
            self.bias[t],
            self.running_mean[t],
            self.running_var[t],
            self.eps,
            momentum,
            group,
        )

    def _synced_tasks(self, x: torch.Tensor, task: torch.Tensor, group) -> torch.Tensor:
        local = torch.bincount(task, minlength=self.num_tasks)
        counts = local.clone()
        dist.all_reduce(counts, group=group)
        counts, local = counts.tolist(), local.tolist()
        if x.shape[2] * x.shape[3] == 1 and 1 in counts:
            alone = [t for t, c in enumerate(counts) if c == 1]
            raise ValueError(
                "TaskBatchNorm2d: expected more than 1 value per channel when training, but tasks "
                f"{alone} have a single 1x1 sample on all ranks together"
            )
        present = [t for t, c in enumerate(counts) if c > 0]
        if not present:  # no sample on any rank, so none here
            return super().forward(x, task)
        # ASTMT's stacked passes come in task order: then each task's samples are a slice
        ordered = bool((task[1:] >= task[:-1]).all())
        order = None if ordered else torch.argsort(task, stable=True)
        rows = x if order is None else x.index_select(0, order)
        pieces = rows.split(local)
        outs = [self._synced_task(pieces[t], t, group) for t in present]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if order is not None:
            out = out.index_select(0, torch.argsort(order))
        if x.is_contiguous(memory_format=torch.channels_last):  # as the task batch norm keeps it
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def is_sync_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm whose statistics are synchronised across ranks."""
    return isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm, SyncTaskBatchNorm2d))


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every ``nn.BatchNorm{1,2,3}d`` replaced by a synchronised one sharing its
    parameters and buffers (torch's ``nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm`
    elsewhere) and every ``mtlfast.nn.TaskBatchNorm2d`` by a :class:`SyncTaskBatchNorm2d`
    (likewise sharing them; the same state-dict keys); returns the module (a new one only when
    ``module`` itself is a batch norm).

    Other norms are left alone: their statistics stay per rank (the trainer broadcasts rank 0's
    after each step).
    """
    if isinstance(module, TaskBatchNorm2d) and not is_sync_batchnorm(module):
        task_bn = SyncTaskBatchNorm2d(
            module.channels,
            module.num_tasks,
            module.eps,
            module.momentum,
            process_group=process_group,
        )
        task_bn.weight, task_bn.bias = module.weight, module.bias
        task_bn.running_mean = module.running_mean
        task_bn.running_var = module.running_var
        task_bn.num_batches_tracked = module.num_batches_tracked
        task_bn.training = module.training
        return task_bn
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not (
        is_sync_batchnorm(module)
    ):
        on_cuda = any(t.is_cuda for t in (*module.parameters(), *module.buffers()))
        cls = nn.SyncBatchNorm if on_cuda else SyncBatchNorm
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group,
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module._modules[name] = new
    return module
