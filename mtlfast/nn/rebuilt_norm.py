"""Batch-norm outputs that autograd does not keep: rebuilt in backward from the batch norm's input.

In a block ``conv -> BN -> ReLU -> conv``, autograd keeps the batch norm's input (its own
backward needs it) and the ReLU's output (the ReLU's backward and the next convolution's need
it): two maps where one determines the other, since ``relu(bn(y)) = max((y - mean) * invstd *
weight + bias, 0)`` per channel. Under :func:`rebuild_norms` the ResNet blocks keep only the
batch norm's input (and its C statistics) and rebuild the output in backward when a node asks
for it, one elementwise pass (:func:`norm_rebuilt`): what a checkpoint would recompute, without
the convolutions. In ASTMT's SE-ResNet-26 at 256x256, batch 4, that is a third of what each
kept block saves (the ReLU outputs of its two reductions and its last batch norm's output, the
task SE's input): 60 MiB over layer2-4 of a task pass.

The mechanism is a pair of ``torch.autograd.graph.saved_tensors_hooks``: inside the context of
:func:`norm_rebuilt`'s second value, a saved tensor that is the batch norm's output is packed
as a recipe (the input, the statistics, the affine parameters) and unpacked by applying it. A
``create_graph`` backward rebuilds the output with autograd on (``F.batch_norm`` on the input,
the statistics recomputed), so second derivatives are those of the batch norm itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.batch_norm_train import batch_norm_with_stats
from ..profiling import _unpack as _profiling_unpack
from ._task import check_task
from .batch_norm import BatchNorm2d, batch_norm_args
from .task_norm import TaskBatchNorm2d

__all__ = ["norm_rebuilt", "rebuild_norms", "rebuilding_norms"]

_STATE = threading.local()


@contextlib.contextmanager
def rebuild_norms(enabled: bool = True) -> Iterator[None]:
    """Forwards run inside keep less for backward: mtlfast's ResNet blocks (and conv, batch
    norm, ReLU, next-layer sequences in its ``TaskSequential`` containers, such as the
    DeepLab decoder's blocks) do not keep their batch-norm outputs but rebuild them in backward
    from the batch norms' inputs, one elementwise pass each (:func:`norm_rebuilt`). The
    gradients are the same to float rounding; in ASTMT's SE-ResNet-26 a kept block saves a
    third less, for 1-2% of its forward and backward time. ``enabled=False`` turns it off
    inside. This thread only; ASTMT turns it on itself under the recompute strategy.

    Nothing is rebuilt without autograd, under ``torch.compile``, inside a non-reentrant
    checkpoint (whose recomputation must save what its forward saved) or under other
    saved-tensor hooks, and for batch norms other than ``nn.BatchNorm2d``, mtlfast's
    :class:`BatchNorm2d` and :class:`TaskBatchNorm2d` with one task for the batch.

    Example::

        with mtlfast.nn.rebuild_norms():
            losses = criterion(model(images), targets)
        losses.backward()
    """
    before = rebuilding_norms()
    _STATE.enabled = bool(enabled)
    try:
        yield
    finally:
        _STATE.enabled = before


def rebuilding_norms() -> bool:
    """Whether :func:`rebuild_norms` is on in this thread."""
    return getattr(_STATE, "enabled", False)


class _Recipe:
    """How to rebuild one batch norm's output (then ReLU) from its input ``source``.

    A ReLU's output is saved twice (by the ReLU and by the next layer), whose backwards run one
    after the other: the first unpack keeps what it rebuilt for the second (``packs`` counts the
    saves not yet unpacked)."""

    __slots__ = (
        "bias",
        "cached",
        "eps",
        "invstd",
        "mean",
        "packs",
        "relu",
        "running",
        "source",
        "weight",
    )

    def __init__(self, source, mean, invstd, weight, bias, eps, running, relu) -> None:
        self.source, self.mean, self.invstd = source, mean, invstd
        self.weight, self.bias, self.eps = weight, bias, eps
        self.running, self.relu = running, relu  # running: (mean, var) in eval mode, else None
        self.packs, self.cached = 0, None

    def take(self) -> torch.Tensor:
        """The output for one unpack."""
        self.packs -= 1
        out = self.cached if self.cached is not None else self.rebuild()
        # kept only between a backward's unpacks (a create_graph one rebuilds each time, for
        # each node's graph; a second backward through a retained graph rebuilds again)
        self.cached = out if self.packs > 0 and not torch.is_grad_enabled() else None
        return out

    def rebuild(self) -> torch.Tensor:
        if torch.is_grad_enabled():  # a create_graph backward: the batch norm's own graph
            mean, var = self.running if self.running is not None else (None, None)
            out = F.batch_norm(
                self.source, mean, var, self.weight, self.bias, mean is None, 0.0, self.eps
            )
            return torch.relu(out) if self.relu else out
        x = self.source
        scale = self.invstd if self.weight is None else self.invstd * self.weight.to(self.invstd)
        shift = -self.mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(shift)
        # x * scale + shift by the evaluation batch norm (mean 0, variance 1, eps 0: its factor
        # rsqrt(1) is exactly 1), one fused pass: 4.5x faster than addcmul's broadcast at
        # (4, 512, 32, 32) on 2 threads; the affine terms stay in the statistics' precision
        zero = torch.zeros_like(scale)
        out = F.batch_norm(x, zero, torch.ones_like(scale), scale, shift, False, 0.0, 0.0)
        return out.relu_() if self.relu else out


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


_NO_HOOKS = (lambda t: t, lambda t: t)


def _outer_hooks() -> tuple | None:
    """The saved-tensor hooks in force here, to chain ours to: none, or
    :func:`mtlfast.profiling.memory`'s counting pair. None (do not rebuild) under any other
    hooks: autograd calls only the innermost pair, and a non-reentrant checkpoint's, whose
    recomputation must save what its forward saved, would fail or keep more."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # a torch without the query: cannot tell
        return None
    hooks = top(False)
    if hooks is None:
        return _NO_HOOKS
    return hooks if hooks[1] is _profiling_unpack else None


def _saving(
    recipe: _Recipe, target: torch.Tensor | None, outer: tuple
) -> torch.autograd.graph.saved_tensors_hooks:
    """Hooks packing ``target`` (every saved tensor when None) as ``recipe``, the other saved
    tensors by ``outer``. Autograd keeps the pack hook with each saved tensor, so the hook holds
    ``target``'s key, never ``target``."""
    key = None if target is None else _key(target)
    outer_pack, outer_unpack = outer

    def pack(t: torch.Tensor):
        if key is None or _key(t) == key:
            recipe.packs += 1
            return recipe
        return outer_pack(t)

    def unpack(packed):
        return packed.take() if isinstance(packed, _Recipe) else outer_unpack(packed)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _with_stats(bn: nn.Module, y: torch.Tensor, task):
    """``bn(y, task)`` with what rebuilds it: ``(out, mean, invstd, weight, bias, running,
    eps)`` (``running`` the running statistics in eval mode, else None), or None for a layer or
    case this does not cover (then the caller runs ``bn`` itself)."""
    if isinstance(bn, TaskBatchNorm2d) and type(bn).forward is TaskBatchNorm2d.forward:
        if not isinstance(task, int) or (bn.training and bn.momentum is None):
            return None
        check_task("TaskBatchNorm2d", task, y, bn.num_tasks)
        running_mean, running_var, weight, bias, training, factor = bn._one_task_args(task)
        eps = bn.eps
    elif type(bn).forward in (nn.BatchNorm2d.forward, BatchNorm2d.forward):
        bn._check_input_dim(y)
        training, running_mean, running_var, factor = batch_norm_args(bn)
        weight, bias, eps = bn.weight, bn.bias, bn.eps
    else:
        return None
    if training:
        out, mean, invstd = batch_norm_with_stats(
            y, running_mean, running_var, weight, bias, factor, eps
        )
        return out, mean, invstd, weight, bias, None, eps
    out = F.batch_norm(y, running_mean, running_var, weight, bias, False, 0.0, eps)
    # the running statistics as they are now (an optimiser or a later forward may move them)
    stats = torch.float64 if y.dtype == torch.float64 else torch.float32
    mean, var = (
        running_mean.detach().to(stats, copy=True),
        running_var.detach().to(stats, copy=True),
    )
    return out, mean, torch.rsqrt(var + eps), weight, bias, (mean, var), eps


def norm_rebuilt(
    bn: nn.Module, y: torch.Tensor, task: int | torch.Tensor | None, relu: bool
) -> tuple[torch.Tensor, contextlib.AbstractContextManager] | None:
    """``bn(y)`` (then ReLU if ``relu``) whose output autograd does not keep, with the context
    in which the next layer must run so that its saves of the output are not kept either:
    ``out, keep = norm_rebuilt(bn, y, task, relu=True); with keep: z = conv(out)``. The ReLU's
    own save of its output is rebuilt too. Backward rebuilds the output from ``y`` (which the
    batch norm keeps) and the batch statistics (or, in eval mode, the running ones), to float
    rounding the same values (the gradients agree with the kept path's to rounding).

    None where this does not apply: outside :func:`rebuild_norms`, without autograd, under
    ``torch.compile``, inside a non-reentrant checkpoint or other saved-tensor hooks than
    :func:`mtlfast.profiling.memory`'s, and for other layers than ``nn.BatchNorm2d``, mtlfast's
    :class:`BatchNorm2d` and :class:`TaskBatchNorm2d` with an int task (momentum not None in
    training); the caller then runs the layers plainly.

    Shapes: y (N, C, H, W) -> out (N, C, H, W).
    """
    if not (
        rebuilding_norms()
        and torch.is_grad_enabled()
        and y.requires_grad
        and not torch.compiler.is_compiling()
    ):
        return None
    outer = _outer_hooks()
    if outer is None:
        return None
    if task is None:
        task = 0
    made = _with_stats(bn, y, task)
    if made is None:
        return None
    out, mean, invstd, weight, bias, running, eps = made
    recipe = _Recipe(y, mean, invstd, weight, bias, eps, running, relu)
    if relu:
        with _saving(recipe, None, outer):  # the ReLU saves its output, the map to rebuild
            out = torch.relu(out)
    return out, _saving(recipe, out, outer)
