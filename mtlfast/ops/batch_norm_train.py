"""``batch_norm``: ``F.batch_norm`` with the training mode's batch statistics computed fast on CPU.

aten's CPU batch norm in training mode is slow in two places: the statistics of NCHW inputs, and
both directions on channels-last inputs with few channels (HRNet's), whose backward takes five
times the NCHW one. It was 6-15% of the models' training steps. Against aten on a 2-core Xeon
(AVX512, 2 threads, torch 2.13; ``benchmarks/bench_norm_pool.py``, median of 15 alternating):
(4, 256, 64, 64) NCHW forward 3.4 against 7.1 ms, with backward 9.4 against 11.8; HRNet's
channels-last (4, 18, 64, 64) forward and backward 1.18 against 3.24 ms. The channels-last
backward is a kernel here too; the NCHW backward stays aten's (as fast or faster there: (4,
2048, 16, 16) 0.8 ms against this kernel's 1.4).

Statistics: NCHW channel by channel, the mean then the squared deviations (two passes over the
channel, the second from cache); channels-last in one pass of sums of ``x - pivot`` and their
squares, the pivot being each channel's first value (so the variance cancels no more than the
data's spread around it), with chunk sums added in a fixed order (no dependence on the thread
count). Partial sums run in the input's dtype for at most a few thousand values per lane, then
in double. Results agree with aten's to float rounding (about 1e-6 relative in float32), not
bit for bit. Running statistics are updated as ``F.batch_norm`` does (unbiased variance,
``momentum`` the factor of the new value).

Eval mode (running statistics), inputs other than 4-d float32/float64 NCHW or channels-last
(other layouts are copied), inputs under 65536 values (where the op's Python overhead outweighs
the kernels' savings), other devices, ``use_backend("reference")``, ``torch.compile`` (whose inductor
generates its own fused batch norm) and builds without the extension take ``F.batch_norm``. A ``create_graph`` backward is aten's, which has a derivative.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import _extension
from .backends import current_backend

__all__ = ["batch_norm", "batch_norm_with_stats"]

OP = "batch_norm"


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


# Smallest input for the kernels: below it the custom op's Python overhead (about 0.15 ms a call
# with its backward) outweighs what they save; measured HRNet-18's (4, 144, 8, 8) channels-last
# layers 0.34 against aten's 0.17 ms, forward and backward, its (4, 36, 32, 32) ones 0.56
# against 0.96.
_MIN_NUMEL = 1 << 16


_train = torch.library.custom_op(
    "mtlfast::batch_norm_train",
    lambda x, weight, bias, eps: _extension.kernels(OP).batch_norm_train(x, weight, bias, eps),
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
)


@_train.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    stats = tuple(x.new_empty((c,)) for _ in range(3))
    return (torch.empty_like(x, memory_format=_layout(x)), *stats)


_train_backward = torch.library.custom_op(
    "mtlfast::batch_norm_train_backward",
    lambda grad, x, weight, mean, invstd: _extension.kernels(OP).batch_norm_train_backward(
        grad, x, weight, mean, invstd
    ),
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor grad, Tensor x, Tensor? weight, Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)",
)


@_train_backward.register_fake
def _(grad, x, weight, mean, invstd):
    c = x.shape[1]
    return torch.empty_like(x, memory_format=_layout(x)), x.new_empty((c,)), x.new_empty((c,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    _, mean, invstd, var = output
    ctx.eps, ctx.has_weight, ctx.has_bias = eps, weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, invstd, var)
    ctx.save_for_backward(x, weight, mean, invstd)


def _backward(ctx, grad, _mean, _invstd, _var):
    x, weight, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or not _channels_last(x):
        # create_graph (aten's has a derivative), and NCHW, where aten's is as fast
        mask = [need_x, need_w and ctx.has_weight, need_b and ctx.has_bias]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
    else:
        gx, gw, gb = _train_backward(grad, x, weight, mean, invstd)
    return (
        gx if need_x else None,
        gw if need_w and ctx.has_weight else None,
        gb if need_b and ctx.has_bias else None,
        None,
    )


_train.register_autograd(_backward, setup_context=_setup_context)


def _use_kernel(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and all(p is None or (p.dtype == x.dtype and p.device == x.device) for p in params)
        # under torch.compile aten's op, which inductor lowers (and fuses) itself
        and not torch.compiler.is_compiling()
        and current_backend() != "reference"
        and x.numel() >= _MIN_NUMEL
        and _extension.has_extension()
    )


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` with the same arguments and results (to float rounding): in training mode
    on CPU the batch statistics and the normalisation are the C++ kernels' (see the module
    docstring); running statistics, when given, are updated in place as ``F.batch_norm`` does.

    Shapes: x (N, C, H, W); running_mean, running_var, weight, bias (C,) or None; output as x,
    in x's memory format.
    """
    if not training or not isinstance(x, torch.Tensor) or not _use_kernel(x, weight, bias):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    out, _, _ = _kernel_train(x, running_mean, running_var, weight, bias, momentum, eps)
    return out


def _kernel_train(x, running_mean, running_var, weight, bias, momentum, eps):
    """The kernels' training-mode batch norm: (out, mean, invstd), running statistics updated."""
    c, count = x.shape[1], _count(x)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},), got {tuple(t.shape)}")
    out, mean, invstd, var = _train(x, weight, bias, eps)
    _update_running(running_mean, running_var, mean, var, count, momentum)
    return out, mean, invstd


def _count(x: torch.Tensor) -> int:
    """The values per channel of a training-mode batch norm's input, checked to be more than one."""
    count = x.numel() // max(x.shape[1], 1) if x.dim() > 1 else 0
    if count <= 1:
        raise ValueError(
            f"{OP}: expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    return count


def _update_running(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (count / (count - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def batch_norm_with_stats(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_norm` in training mode, also returning the batch statistics it normalised
    with: ``(out, mean, invstd)``, ``out = (x - mean) * invstd * weight + bias`` per channel
    (``invstd = 1 / sqrt(var + eps)``, the biased variance). The statistics carry no gradient;
    ``out``'s gradient is the batch norm's. The C++ kernels where :func:`batch_norm` uses them,
    else aten's ``native_batch_norm`` (what ``F.batch_norm`` runs on the CPU).

    Shapes: x (N, C, H, W); running_mean, running_var, weight, bias (C,) or None; out as x,
    mean and invstd (C,) in float32 (float64 for float64 x).
    """
    if not _use_kernel(x, weight, bias):
        _count(x)
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        return out, mean.detach(), invstd.detach()
    return _kernel_train(x, running_mean, running_var, weight, bias, momentum, eps)
