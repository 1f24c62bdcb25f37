"""``attention_distill``: MTI-Net's multi-modal distillation (Eq. 1) after its convolutions.

``out[:, k] = feats[:, k] + sum_s sigmoid(mask_logits[:, k, s]) * messages[:, k, s]``, source s of
target k being the s-th task other than k in increasing order. The backward recomputes the
sigmoid from the inputs, so nothing but the inputs is saved for it.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_same, check_tensor, shape_str
from ._dispatch import (
    autograd_function,
    choose,
    kernel,
    register_kernel,
    remember_backend,
    remembered_backend,
    runs_directly,
)
from ._layout import empty_in_order, inner_order, to_inner_order

__all__ = ["attention_distill"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(feats: object, mask_logits: object, messages: object) -> None:
    """Raise TypeError/ValueError naming the offending argument, before any kernel runs."""
    op = "attention_distill"
    for name, t in (("feats", feats), ("mask_logits", mask_logits), ("messages", messages)):
        check_tensor(op, name, t)
    check_tensor(op, "feats", feats, dims="(N, T, C, H, W)", ndim=5)
    n, t, c, h, w = feats.shape
    if t < 2:
        raise ValueError(f"{op}: needs T >= 2 tasks, got feats of shape {shape_str(feats)}")
    expected = (n, t, t - 1, c, h, w)
    for name, x in (("mask_logits", mask_logits), ("messages", messages)):
        if tuple(x.shape) != expected:
            raise ValueError(
                f"{op}: {name} must have shape (N, T, T-1, C, H, W) = {expected} to match feats "
                f"{shape_str(feats)}, got {shape_str(x)}"
            )
        check_same(op, name, x, "feats", feats)


def _order(*tensors: torch.Tensor) -> tuple[int, int, int]:
    """Inner (C,H,W) order of the largest input that has a dense one; else contiguous."""
    for t in tensors:
        order = inner_order(t)
        if order is not None:
            return order
    return (0, 1, 2)


def _forward(
    feats: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor
) -> torch.Tensor:
    return kernel("attention_distill", feats.device, feats.dtype)(feats, mask_logits, messages)


_attention_distill = torch.library.custom_op(
    "mtlfast::attention_distill", _forward, mutates_args=()
)


@_attention_distill.register_fake
def _(feats, mask_logits, messages):
    return empty_in_order(feats.shape, _order(messages, mask_logits, feats), feats)


def _backward_kernel(
    grad_out: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel("attention_distill_backward", grad_out.device, grad_out.dtype)(
        grad_out, mask_logits, messages
    )


_attention_distill_backward = torch.library.custom_op(
    "mtlfast::attention_distill_backward", _backward_kernel, mutates_args=()
)


@_attention_distill_backward.register_fake
def _(grad_out, mask_logits, messages):
    order = _order(messages, mask_logits, grad_out)
    return empty_in_order(messages.shape, order, messages), empty_in_order(
        messages.shape, order, messages
    )


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    _, mask_logits, messages = inputs
    ctx.save_for_backward(mask_logits, messages)


def _backward(ctx, grad_out):
    mask_logits, messages = ctx.saved_tensors
    _, need_mask, need_messages = ctx.needs_input_grad
    grad_mask = grad_messages = None
    if need_mask or need_messages:
        with remembered_backend(ctx):
            op = (
                _backward_kernel
                if runs_directly(grad_out, mask_logits, messages)
                else _attention_distill_backward
            )
            grad_mask, grad_messages = op(grad_out, mask_logits, messages)
    return grad_out, grad_mask if need_mask else None, grad_messages if need_messages else None


_attention_distill.register_autograd(_backward, setup_context=_setup_context)
_AttentionDistill = autograd_function("_AttentionDistill", _forward, _setup_context, _backward)


def attention_distill(
    feats: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor
) -> torch.Tensor:
    """Fused multi-modal distillation: feats plus the sigmoid-gated messages of the other tasks.

    Args:
        feats: (N, T, C, H, W) task features, T >= 2.
        mask_logits: (N, T, T-1, C, H, W) attention logits; ``[:, k, s]`` gates source s of target k,
            source s being the s-th task other than k in increasing order.
        messages: (N, T, T-1, C, H, W), same indexing.

    Returns:
        (N, T, C, H, W): ``feats[:, k] + sum_s sigmoid(mask_logits[:, k, s]) * messages[:, k, s]``.

    All inputs share one floating dtype (float32, float16, bfloat16; float64 for checks) and
    device; any strides. Reduced precision accumulates in float32.
    """
    _check(feats, mask_logits, messages)
    op = choose(_forward, _AttentionDistill.apply, _attention_distill, feats, mask_logits, messages)
    return op(feats, mask_logits, messages)


# ---- kernels -------------------------------------------------------------------------------


def _canonical(feats, mask_logits, messages):
    order = _order(messages, mask_logits, feats)
    return (
        order,
        to_inner_order(feats, order),
        to_inner_order(mask_logits, order),
        to_inner_order(messages, order),
    )


def _compiled_forward(launch):
    def forward(feats, mask_logits, messages):
        order, feats, mask_logits, messages = _canonical(feats, mask_logits, messages)
        out = empty_in_order(feats.shape, order, feats)
        if out.numel():
            launch(feats, mask_logits, messages, out)
        return out

    return forward


def _compiled_backward(launch):
    def backward(grad_out, mask_logits, messages):
        order, grad_out, mask_logits, messages = _canonical(grad_out, mask_logits, messages)
        grad_mask = empty_in_order(messages.shape, order, messages)
        grad_messages = empty_in_order(messages.shape, order, messages)
        if grad_mask.numel():
            launch(grad_out, mask_logits, messages, grad_mask, grad_messages)
        return grad_mask, grad_messages

    return backward


def _ext_fwd(*args):
    torch.ops.mtlfast_C.attention_distill_fwd(*args)


def _ext_bwd(*args):
    torch.ops.mtlfast_C.attention_distill_bwd(*args)


def _triton_fwd(*args):
    from .triton import attention_distill as tk

    tk.forward(*args)


def _triton_bwd(*args):
    from .triton import attention_distill as tk

    tk.backward(*args)


def _reference_forward(feats, mask_logits, messages):
    # Copied into the canonical layout so every backend returns the strides the fake promises.
    out = empty_in_order(feats.shape, _order(messages, mask_logits, feats), feats)
    return out.copy_(reference.attention_distill(feats, mask_logits, messages))


def _reference_backward(grad_out, mask_logits, messages):
    order = _order(messages, mask_logits, grad_out)
    grads = reference.attention_distill_backward(grad_out, mask_logits, messages)
    return tuple(empty_in_order(messages.shape, order, messages).copy_(g) for g in grads)


_ALL = (*_FLOATS, torch.float64)
register_kernel("attention_distill", "reference", _ALL)(_reference_forward)
register_kernel("attention_distill_backward", "reference", _ALL)(_reference_backward)
for _backend, _dtypes in (("cpu", _ALL), ("cuda", _FLOATS)):
    register_kernel("attention_distill", _backend, _dtypes)(_compiled_forward(_ext_fwd))
    register_kernel("attention_distill_backward", _backend, _dtypes)(_compiled_backward(_ext_bwd))
register_kernel("attention_distill", "triton", _ALL)(_compiled_forward(_triton_fwd))
register_kernel("attention_distill_backward", "triton", _ALL)(_compiled_backward(_triton_bwd))
