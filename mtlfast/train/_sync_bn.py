"""Batch norm whose training statistics are those of the whole data-parallel batch, on any device.

``torch.nn.SyncBatchNorm`` refuses CPU tensors (its statistics kernels are CUDA's), so CPU runs
over gloo, and the tests, use :class:`SyncBatchNorm` below; on CUDA,
:func:`convert_sync_batchnorm` picks torch's own, whose fused kernels are faster.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "is_sync_batchnorm"]


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


def is_sync_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm whose statistics are synchronised across ranks."""
    return isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm))


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every ``nn.BatchNorm{1,2,3}d`` replaced by a synchronised one sharing its
    parameters and buffers (torch's ``nn.SyncBatchNorm`` on CUDA, :class:`SyncBatchNorm`
    elsewhere); returns the module (a new one only when ``module`` itself is a batch norm).

    Task-conditioned norms (``mtlfast.nn.TaskBatchNorm2d``) and other norms are left alone:
    their statistics stay per rank (the trainer broadcasts rank 0's after each step).
    """
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
