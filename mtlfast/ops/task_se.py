"""``task_se``: task-conditioned squeeze-and-excitation with one task index per sample (ASTMT).

The two memory-heavy passes over x (the pooling and the gating with residual and ReLU) and the
two of the backward are fused kernels; the tiny per-task linear layers between them run in
PyTorch, grouped by task, except on the cpu backend, whose kernels run the whole op (layers
included) in one call each way, a cache-sized group of samples at a time so that x is read from
memory once. The backward recomputes the gate and the ReLU mask; only the inputs and
the pooled means (N, C) are saved for it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ._checks import FLOAT_DTYPES, check_same, check_tensor, shape_str
from ._dispatch import (
    autograd_function,
    choose,
    kernel,
    register_kernel,
    remember_backend,
    remembered_backend,
    runs_directly,
)
from ._layout import memory_format_of as _format

__all__ = ["task_se"]

OP = "task_se"


def _well_formed(x, task, w1, b1, w2, b2, residual) -> bool:
    """What _check requires, tested in one go (a third of its time): the common case's fast path."""
    if not all(isinstance(t, torch.Tensor) for t in (x, task, w1, b1, w2, b2)):
        return False
    xs = x.shape
    if (
        len(xs) != 4
        or task.dtype != torch.int64
        or task.shape != xs[:1]
        or x.dtype not in FLOAT_DTYPES
    ):
        return False
    t, r, c = w1.shape if w1.dim() == 3 else (0, 0, -1)
    if (
        c != xs[1]
        or c < 1
        or r < 1
        or b1.shape != (t, r)
        or w2.shape != (t, c, r)
        or b2.shape != (t, c)
    ):
        return False
    device = x.device
    if task.device != device or not all(
        p.dtype in FLOAT_DTYPES and p.device == device for p in (w1, b1, w2, b2)
    ):
        return False
    return residual is None or (
        isinstance(residual, torch.Tensor)
        and residual.shape == xs
        and residual.dtype == x.dtype
        and residual.device == device
    )


def _check(x, task, w1, b1, w2, b2, residual) -> None:
    if _well_formed(x, task, w1, b1, w2, b2, residual):
        return
    check_tensor(OP, "x", x, dims="(N, C, H, W)", ndim=4)
    check_tensor(OP, "task", task, dims=f"(N,) = ({x.shape[0]},)", ndim=1, floating=False)
    if task.dtype != torch.int64:
        raise TypeError(f"{OP}: task must be an int64 tensor of task indices, got {task.dtype}")
    n, c = x.shape[:2]
    if c < 1:
        raise ValueError(f"{OP}: x must have C >= 1 channels, got shape {shape_str(x)}")
    if task.shape[0] != n:
        raise ValueError(
            f"{OP}: task must have shape (N,) = ({n},) to match x {shape_str(x)}, got {shape_str(task)}"
        )
    check_same(OP, "task", task, "x", x, dtype=False)
    check_tensor(OP, "w1", w1, dims="(T, R, C)", ndim=3)
    t, r = w1.shape[:2]
    if r < 1:
        # R = 0 would make every gate sigmoid(b2): a layer that squeezes to nothing is a mistake.
        raise ValueError(
            f"{OP}: w1 must have shape (T, R, C) with R >= 1 hidden units, got {shape_str(w1)}"
        )
    for name, p, expected in (
        ("w1", w1, (t, r, c)),
        ("b1", b1, (t, r)),
        ("w2", w2, (t, c, r)),
        ("b2", b2, (t, c)),
    ):
        check_tensor(OP, name, p, dims=str(expected), ndim=len(expected))
        if tuple(p.shape) != expected:
            raise ValueError(
                f"{OP}: {name} must have shape {shape_str(expected)} for T={t} tasks, R={r}, C={c}, got {shape_str(p)}"
            )
        check_same(OP, name, p, "x", x, dtype=False)
    if residual is not None:
        check_tensor(OP, "residual", residual, dims=shape_str(x), ndim=4)
        if residual.shape != x.shape:
            raise ValueError(
                f"{OP}: residual must have the shape of x {shape_str(x)}, got {shape_str(residual)}"
            )
        check_same(OP, "residual", residual, "x", x)


def _check_task_range(task: torch.Tensor, num_tasks: int) -> None:
    # Inside the op: a data-dependent check that torch.compile must not trace; meta tensors
    # hold no values to check.
    if (
        task.numel()
        and task.device.type != "meta"
        and (int(task.min()) < 0 or int(task.max()) >= num_tasks)
    ):
        raise ValueError(
            f"{OP}: task indices must lie in [0, {num_tasks}), got values in [{int(task.min())}, {int(task.max())}]"
        )


# ---- the per-task linear layers, grouped by task --------------------------------------------


def _groups(task: torch.Tensor, num_tasks: int) -> list[tuple[int, torch.Tensor | None]]:
    """(task, sample indices) for each task present; None indices when the batch has one task."""
    counts = torch.bincount(task, minlength=num_tasks).tolist()
    present = [t for t, k in enumerate(counts) if k]
    if len(present) == 1:
        return [(present[0], None)]
    order = torch.argsort(task, stable=True)
    return [(t, idx) for t, idx in enumerate(order.split(counts)) if idx.numel()]


def _rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _gate(pooled, task, w1, b1, w2, b2):
    """hidden (N,R), gate (N,C) in the accumulation dtype of pooled."""
    acc = pooled.dtype
    hidden = pooled.new_empty((pooled.shape[0], w1.shape[1]))
    gate = torch.empty_like(pooled)
    for t, idx in _groups(task, w1.shape[0]):
        h = torch.relu(torch.addmm(b1[t].to(acc), _rows(pooled, idx), w1[t].to(acc).T))
        g = torch.sigmoid(torch.addmm(b2[t].to(acc), h, w2[t].to(acc).T))
        if idx is None:
            hidden, gate = h, g
        else:
            hidden[idx], gate[idx] = h, g
    return hidden, gate


def _gate_backward(grad_gate, pooled, hidden, gate, task, w1, w2):
    """Gradients w.r.t. pooled and the four parameters (in their dtypes) from grad_gate (N,C)."""
    acc = pooled.dtype
    grad_pooled = torch.zeros_like(pooled)
    grads = [
        torch.zeros(p.shape, dtype=acc, device=p.device) for p in (w1, w1[:, :, 0], w2, w2[:, :, 0])
    ]
    gw1, gb1, gw2, gb2 = grads
    for t, idx in _groups(task, w1.shape[0]):
        g = _rows(gate, idx)
        dz2 = _rows(grad_gate, idx) * g * (1 - g)
        h = _rows(hidden, idx)
        gw2[t], gb2[t] = dz2.T @ h, dz2.sum(0)
        dh = (dz2 @ w2[t].to(acc)) * (h > 0)
        gw1[t], gb1[t] = dh.T @ _rows(pooled, idx), dh.sum(0)
        if idx is None:
            grad_pooled = dh @ w1[t].to(acc)
        else:
            grad_pooled[idx] = dh @ w1[t].to(acc)
    return grad_pooled, gw1, gb1, gw2, gb2


def _acc_params(acc: torch.dtype, *params: torch.Tensor) -> list[torch.Tensor]:
    """The weights as the whole-op kernels take them: contiguous, in the accumulation dtype."""
    return [p if p.dtype == acc and p.is_contiguous() else p.to(acc).contiguous() for p in params]


# ---- the op ---------------------------------------------------------------------------------


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(
    x: torch.Tensor,
    task: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = kernel(OP, x.device, x.dtype)
    whole_op = x.numel() > 0 and hasattr(k, "forward")
    if not whole_op:  # the whole-op kernel checks the indices itself
        _check_task_range(task, w1.shape[0])
    fmt = _format(x)
    x = x.contiguous(memory_format=fmt)
    residual = None if residual is None else residual.contiguous(memory_format=fmt)
    pooled = x.new_empty(x.shape[:2], dtype=_acc_dtype(x))
    out = torch.empty_like(x, memory_format=fmt)
    if whole_op:
        k.forward(x, task, *_acc_params(pooled.dtype, w1, b1, w2, b2), residual, relu, out, pooled)
    elif x.numel():
        k.pool(x, pooled)
        _, gate = _gate(pooled, task, w1, b1, w2, b2)
        k.scale(x, gate, residual, relu, out)
    else:
        pooled.zero_()
    return out, pooled


_task_se = torch.library.custom_op("mtlfast::task_se", _forward, mutates_args=())


@_task_se.register_fake
def _(x, task, w1, b1, w2, b2, residual, relu):
    out = torch.empty_like(x, memory_format=_format(x))
    return out, x.new_empty(x.shape[:2], dtype=_acc_dtype(x))


def _backward_kernel(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    pooled: torch.Tensor,
    task: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = kernel(OP, x.device, x.dtype)
    fmt = _format(x)
    x = x.contiguous(memory_format=fmt)
    grad_out = grad_out.contiguous(memory_format=fmt)
    residual = None if residual is None else residual.contiguous(memory_format=fmt)
    grad_x = torch.empty_like(x, memory_format=fmt)
    # An empty tensor stands for "no residual" (an op cannot return None).
    grad_residual = (
        torch.empty_like(x, memory_format=fmt) if residual is not None else x.new_empty(0)
    )
    if x.numel() and hasattr(k, "backward"):
        grads = [
            torch.empty(p.shape, dtype=pooled.dtype, device=p.device) for p in (w1, b1, w2, b2)
        ]
        k.backward(
            grad_out,
            x,
            pooled,
            task,
            *_acc_params(pooled.dtype, w1, b1, w2, b2),
            residual,
            relu,
            grad_x,
            *grads,
            grad_residual if residual is not None else None,
        )
        return (grad_x, *(g.to(p.dtype) for g, p in zip(grads, (w1, b1, w2, b2))), grad_residual)
    hidden, gate = _gate(pooled, task, w1, b1, w2, b2)
    grad_gate = torch.empty_like(pooled)
    if x.numel():
        k.backward_gate(
            grad_out,
            x,
            gate,
            residual,
            relu,
            grad_gate,
            grad_residual if residual is not None else None,
        )
    else:
        grad_gate.zero_()
    grad_pooled, gw1, gb1, gw2, gb2 = _gate_backward(grad_gate, pooled, hidden, gate, task, w1, w2)
    if x.numel():
        k.backward_input(grad_out, x, gate, residual, relu, grad_pooled, grad_x)
    return (
        grad_x,
        gw1.to(w1.dtype),
        gb1.to(b1.dtype),
        gw2.to(w2.dtype),
        gb2.to(b2.dtype),
        grad_residual,
    )


_task_se_backward = torch.library.custom_op(
    "mtlfast::task_se_backward", _backward_kernel, mutates_args=()
)


@_task_se_backward.register_fake
def _(grad_out, x, pooled, task, w1, b1, w2, b2, residual, relu):
    fmt = _format(x)
    grad_residual = (
        torch.empty_like(x, memory_format=fmt) if residual is not None else x.new_empty(0)
    )
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(w1),
        torch.empty_like(b1),
        torch.empty_like(w2),
        torch.empty_like(b2),
        grad_residual,
    )


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    x, task, w1, b1, w2, b2, residual, relu = inputs
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(output[1])
    # The backward never needs the residual itself: without ReLU its gradient is grad_out, with
    # ReLU the mask is where the output is positive. So the output is kept for the mask, not the
    # residual: the output is usually kept anyway (the next block's input, saved by its
    # convolutions) where the residual often is not (a projection shortcut's batch-norm output:
    # (4, 2048, 16, 16), 8 MiB, in ASTMT's layer4).
    mask = output[0] if relu and residual is not None else None
    ctx.save_for_backward(x, output[1], task, w1, b1, w2, b2, mask)


def _backward(ctx, grad_out, _grad_pooled):
    x, pooled, task, w1, b1, w2, b2, out = ctx.saved_tensors
    relu, grad_residual = ctx.relu, None
    if ctx.has_residual:
        if relu:  # ReLU's own backward, the gradient of the residual: one pass, then no ReLU
            grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
            relu = False
        grad_residual = grad_out
    with remembered_backend(ctx):
        direct = runs_directly(grad_out, x, pooled, task, w1, b1, w2, b2)
        op = _backward_kernel if direct else _task_se_backward
        grads = op(grad_out, x, pooled, task, w1, b1, w2, b2, None, relu)
    grad_x, gw1, gb1, gw2, gb2, _ = grads
    need = ctx.needs_input_grad
    return (
        grad_x if need[0] else None,
        None,
        gw1 if need[2] else None,
        gb1 if need[3] else None,
        gw2 if need[4] else None,
        gb2 if need[5] else None,
        grad_residual if need[6] else None,
        None,
    )


_task_se.register_autograd(_backward, setup_context=_setup_context)
_TaskSE = autograd_function("_TaskSE", _forward, _setup_context, _backward)


def task_se(
    x: torch.Tensor,
    task: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Task-conditioned squeeze-and-excitation, optionally fused with a residual add and ReLU.

    Args:
        x: (N, C, H, W).
        task: (N,) int64, the task of each sample, in [0, T); any strides.
        w1, b1: (T, R, C), (T, R): each task's squeeze layer, R >= 1 (C >= 1 too).
        w2, b2: (T, C, R), (T, C): each task's excitation layer.
        residual: (N, C, H, W) or None, added after the gating (the tail of an SE bottleneck).
        relu: apply ReLU at the end.

    Returns:
        (N, C, H, W): ``x * g[:, :, None, None] (+ residual)``, then ReLU if ``relu``, with
        ``g[n] = sigmoid(w2[t] @ relu(w1[t] @ mean_hw(x[n]) + b1[t]) + b2[t])``, ``t = task[n]``.

    Stacking a batch T times with task ids 0..T-1 runs ASTMT's T single-task passes as one pass.
    x and residual share a dtype (float32, float16, bfloat16 or float64; float8 raises TypeError); the small layers run in float32 (float64 for float64).
    Contiguous and channels-last inputs run in place; other strides are copied once.
    Backward keeps x and, with a residual and ReLU, the output (for the mask, as ``torch.relu``
    keeps its own): the residual is not kept, and changing the output in place before backward
    raises autograd's in-place error.
    """
    _check(x, task, w1, b1, w2, b2, residual)
    task = task.contiguous()  # any strides (an expanded or sliced task), as the kernels need
    op = choose(_forward, _TaskSE.apply, _task_se, x, task, w1, b1, w2, b2, residual)
    if x.is_meta:  # shapes only: the custom op's fake implementation
        op = _task_se
    return op(x, task, w1, b1, w2, b2, residual, bool(relu))[0]


# ---- backends: the four passes over x, or the whole op (cpu; csrc/task_se.cpp) -----------


def _reference_passes() -> SimpleNamespace:
    def active(grad_out, x, gate, residual, relu):
        if not relu:
            return grad_out.to(gate.dtype)
        y = x.to(gate.dtype) * gate[:, :, None, None]
        if residual is not None:
            y = y + residual.to(gate.dtype)
        return grad_out.to(gate.dtype) * (y > 0)

    def pool(x, pooled):
        pooled.copy_(x.to(pooled.dtype).mean(dim=(2, 3)))

    def scale(x, gate, residual, relu, out):
        y = x.to(gate.dtype) * gate[:, :, None, None]
        if residual is not None:
            y = y + residual.to(gate.dtype)
        out.copy_(torch.relu(y) if relu else y)

    def backward_gate(grad_out, x, gate, residual, relu, grad_gate, grad_residual):
        g = active(grad_out, x, gate, residual, relu)
        grad_gate.copy_((g * x.to(gate.dtype)).sum(dim=(2, 3)))
        if grad_residual is not None:
            grad_residual.copy_(g)

    def backward_input(grad_out, x, gate, residual, relu, grad_pooled, grad_x):
        g = active(grad_out, x, gate, residual, relu)
        hw = x.shape[2] * x.shape[3]
        grad_x.copy_(g * gate[:, :, None, None] + (grad_pooled / hw)[:, :, None, None])

    return SimpleNamespace(
        pool=pool, scale=scale, backward_gate=backward_gate, backward_input=backward_input
    )


def _extension_passes() -> SimpleNamespace:
    ops = torch.ops.mtlfast_C
    return SimpleNamespace(
        pool=lambda *a: ops.task_se_pool(*a),
        scale=lambda *a: ops.task_se_scale(*a),
        backward_gate=lambda *a: ops.task_se_backward_gate(*a),
        backward_input=lambda *a: ops.task_se_backward_input(*a),
    )


def _extension_whole_op() -> SimpleNamespace:
    """The CPU kernels run the whole op, small layers included, in one call each way."""
    ops = torch.ops.mtlfast_C
    return SimpleNamespace(
        forward=lambda *a: ops.task_se_forward(*a),
        backward=lambda *a: ops.task_se_backward(*a),
    )


class _TritonPasses:
    """The Triton module's passes, imported on first use."""

    def __getattr__(self, name):
        from .triton import task_se as tk

        return getattr(tk, name)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ALL = (*_FLOATS, torch.float64)
register_kernel(OP, "reference", _ALL)(_reference_passes())
register_kernel(OP, "cpu", _ALL)(_extension_whole_op())
register_kernel(OP, "cuda", _FLOATS)(_extension_passes())
register_kernel(OP, "triton", _ALL)(_TritonPasses())
