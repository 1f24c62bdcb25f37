"""``skip_fusion``: UberNet's online accumulation of skip-layer scores (Eq. 1-2), fused with the
bilinear resizing to the output size and the learned linear combination of layers.

Neither direction materialises a full-resolution map per layer: the forward reads each
low-resolution map and writes the output once; the backward reads grad_out once and produces
every layer's gradient (the adjoint of bilinear resizing), the weight's and the bias's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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

__all__ = ["skip_fusion"]

OP = "skip_fusion"

# The kernels index planes with 32-bit ints: a side beyond this is a mistake, not a request.
_MAX_SIDE = 2**31 - 1


def _memory_bytes() -> int | None:
    """This machine's physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


_MEMORY_BYTES = _memory_bytes()  # read once: torch.compile cannot trace os.sysconf


def _check_output_size(first: torch.Tensor, size: tuple[int, int]) -> None:
    """An output too large to exist raises ValueError naming size, before anything allocates it
    (CPU memory is overcommitted: the process would otherwise be killed while writing it)."""
    if max(size) > _MAX_SIDE:
        raise ValueError(f"{OP}: size must be at most {_MAX_SIDE} per side, got {tuple(size)}")
    n, c = first.shape[:2]
    nbytes = n * c * size[0] * size[1] * first.element_size()
    limit = _MEMORY_BYTES if first.device.type == "cpu" else None
    if limit is not None and nbytes > limit:
        raise ValueError(
            f"{OP}: size {tuple(size)} asks for an output of {n}x{c}x{size[0]}x{size[1]} elements "
            f"({nbytes / 2**30:.1f} GiB), more than this machine's memory ({limit / 2**30:.1f} GiB)"
        )


def _check(scores: object, weight: object, bias: object, size: object) -> tuple[int, int]:
    """Raise TypeError/ValueError naming the offending argument; return size as a tuple."""
    if not isinstance(scores, (list, tuple)) or len(scores) == 0:
        raise ValueError(
            f"{OP}: scores must be a non-empty list of (N, C, H_k, W_k) tensors, got {scores!r:.80}"
        )
    first = check_tensor(OP, "scores[0]", scores[0], dims="(N, C, H_k, W_k)", ndim=4)
    n, c = first.shape[:2]
    if c < 1:
        raise ValueError(f"{OP}: scores[0] must have C >= 1 channels, got shape {shape_str(first)}")
    for k, s in enumerate(scores):
        check_tensor(OP, f"scores[{k}]", s, dims="(N, C, H_k, W_k)", ndim=4)
        if s.shape[:2] != first.shape[:2] or s.shape[2] < 1 or s.shape[3] < 1:
            raise ValueError(
                f"{OP}: scores[{k}] must have shape (N, C, H_k, W_k) = ({n}, {c}, >=1, >=1) like scores[0], "
                f"got {shape_str(s)}"
            )
        check_same(OP, f"scores[{k}]", s, "scores[0]", first)
    check_tensor(OP, "weight", weight, dims=f"(K, C) = ({len(scores)}, {c})", ndim=2)
    if tuple(weight.shape) != (len(scores), c):
        raise ValueError(
            f"{OP}: weight must have shape (K, C) = ({len(scores)}, {c}), got {shape_str(weight)}"
        )
    check_same(OP, "weight", weight, "scores[0]", first, dtype=False)
    if bias is not None:
        check_tensor(OP, "bias", bias, dims=f"(C,) = ({c},)", ndim=1)
        if bias.shape[0] != c:
            raise ValueError(f"{OP}: bias must have shape (C,) = ({c},), got {shape_str(bias)}")
        check_same(OP, "bias", bias, "scores[0]", first, dtype=False)
    if (
        not isinstance(size, (list, tuple, torch.Size))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise ValueError(f"{OP}: size must be a pair of positive ints (H, W), got {size!r}")
    size = int(size[0]), int(size[1])
    _check_output_size(first, size)
    return size


def _forward(
    scores: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, size: list[int]
) -> torch.Tensor:
    return kernel(OP, scores[0].device, scores[0].dtype)(scores, weight, bias, size)


_skip_fusion = torch.library.custom_op("mtlfast::skip_fusion", _forward, mutates_args=())


@_skip_fusion.register_fake
def _(scores, weight, bias, size):
    n, c = scores[0].shape[:2]
    return scores[0].new_empty((n, c, size[0], size[1]))


def _backward_kernel(
    grad_out: torch.Tensor, scores: list[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    return kernel(OP + "_backward", grad_out.device, grad_out.dtype)(grad_out, scores, weight)


_skip_fusion_backward = torch.library.custom_op(
    "mtlfast::skip_fusion_backward", _backward_kernel, mutates_args=()
)


@_skip_fusion_backward.register_fake
def _(grad_out, scores, weight):
    return (
        [s.new_empty(s.shape) for s in scores],
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[1:]),
    )


def _setup_context(ctx, inputs, output):
    remember_backend(ctx)
    scores, weight, bias, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(weight, *scores)


def _grads(ctx, grad_out):
    weight, *scores = ctx.saved_tensors
    with remembered_backend(ctx):
        op = _backward_kernel if runs_directly(grad_out, *scores, weight) else _skip_fusion_backward
        return op(grad_out, scores, weight)


def _backward(ctx, grad_out):
    grad_scores, grad_weight, grad_bias = _grads(ctx, grad_out)
    need_scores, need_weight, need_bias, _ = ctx.needs_input_grad
    return (
        grad_scores if need_scores else None,
        grad_weight if need_weight else None,
        grad_bias if ctx.has_bias and need_bias else None,
        None,
    )


_skip_fusion.register_autograd(_backward, setup_context=_setup_context)

# The autograd.Function of plain eager autograd (_dispatch.choose) takes the scores last, one
# argument each: autograd sees no tensor inside a list.


def _function_forward(weight, bias, size, *scores):
    return _forward(list(scores), weight, bias, size)


def _function_setup_context(ctx, inputs, output):
    weight, bias, size, *scores = inputs
    _setup_context(ctx, (scores, weight, bias, size), output)


def _function_backward(ctx, grad_out):
    grad_scores, grad_weight, grad_bias = _grads(ctx, grad_out)
    need_weight, need_bias, _, *need_scores = ctx.needs_input_grad
    return (
        grad_weight if need_weight else None,
        grad_bias if ctx.has_bias and need_bias else None,
        None,
        *(g if need else None for g, need in zip(grad_scores, need_scores)),
    )


_SkipFusion = autograd_function(
    "_SkipFusion", _function_forward, _function_setup_context, _function_backward
)


def _skip_fusion_function(scores, weight, bias, size):
    return _SkipFusion.apply(weight, bias, size, *scores)


def skip_fusion(
    scores: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    size: Sequence[int],
) -> torch.Tensor:
    """Fused skip-layer score fusion: resize every layer's scores and combine them linearly.

    Args:
        scores: K >= 1 tensors (N, C, H_k, W_k), each layer's task scores at its own resolution.
        weight: (K, C), the weight of layer k for score channel c.
        bias: (C,) or None.
        size: output (H, W); larger or smaller than the inputs, any ratio.

    Returns:
        (N, C, H, W): ``bias + sum_k weight[k, :, None, None] * interpolate(scores[k], size,
        mode="bilinear", align_corners=False)``, in the dtype of the scores.

    Scores share one floating dtype (float32, float16, bfloat16; float64 for checks); weight and
    bias are cast to it. Reduced precision accumulates in float32. Any strides. C >= 1; an output
    larger than the machine's memory raises ValueError naming size. Non-finite scores, weight or
    bias give what the formula gives in IEEE arithmetic on every backend (an infinite weight
    times an interpolated value, not times each of its four taps).
    """
    size = _check(scores, weight, bias, size)
    dtype = scores[0].dtype
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    op = choose(_forward, _skip_fusion_function, _skip_fusion, *scores, weight, bias)
    return op(list(scores), weight, bias, list(size))


# ---- kernels: every tensor contiguous (csrc/skip_fusion.cpp) --------------------------------


def _compiled(launch_fwd, launch_bwd):
    def forward(scores, weight, bias, size):
        scores = [s.contiguous() for s in scores]
        out = scores[0].new_empty((*scores[0].shape[:2], *size))
        if out.numel():
            launch_fwd(
                scores, weight.contiguous(), None if bias is None else bias.contiguous(), out
            )
        return out

    def backward(grad_out, scores, weight):
        scores = [s.contiguous() for s in scores]
        grad_scores = [torch.empty_like(s) for s in scores]
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        grad_bias = weight.new_empty(weight.shape[1:])
        if grad_out.numel():
            launch_bwd(
                grad_out.contiguous(),
                scores,
                weight.contiguous(),
                grad_scores,
                grad_weight,
                grad_bias,
            )
        else:
            for g in (*grad_scores, grad_weight, grad_bias):
                g.zero_()
        return grad_scores, grad_weight, grad_bias

    return forward, backward


def _ext_fwd(*args):
    torch.ops.mtlfast_C.skip_fusion_fwd(*args)


def _ext_bwd(*args):
    torch.ops.mtlfast_C.skip_fusion_bwd(*args)


def _triton_fwd(*args):
    from .triton import skip_fusion as tk

    tk.forward(*args)


def _triton_bwd(*args):
    from .triton import skip_fusion as tk

    tk.backward(*args)


def _ieee_cpu(fwd, bwd):
    """The cpu kernels fold weight[k] into the bilinear coefficients: with an infinite weight,
    taps of mixed sign give inf - inf = NaN where the formula gives +-inf. Such a weight (cheap
    to test on the CPU) takes the reference, whose every operation is the formula's."""

    def forward(scores, weight, bias, size):
        if not bool(torch.isfinite(weight).all()):
            return reference.skip_fusion(scores, weight, bias, size).contiguous()
        return fwd(scores, weight, bias, size)

    def backward(grad_out, scores, weight):
        if not bool(torch.isfinite(weight).all()):
            return _reference_backward(grad_out, scores, weight)
        return bwd(grad_out, scores, weight)

    return forward, backward


def _reference_backward(grad_out, scores, weight):
    grad_scores, grad_weight, grad_bias = reference.skip_fusion_backward(grad_out, scores, weight)
    return [g.contiguous() for g in grad_scores], grad_weight.contiguous(), grad_bias.contiguous()


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ALL = (*_FLOATS, torch.float64)
register_kernel(OP, "reference", _ALL)(lambda *a: reference.skip_fusion(*a).contiguous())
register_kernel(OP + "_backward", "reference", _ALL)(_reference_backward)
for _backend, _dtypes, _launchers in (
    ("cpu", _ALL, (_ext_fwd, _ext_bwd)),
    ("cuda", _FLOATS, (_ext_fwd, _ext_bwd)),
    ("triton", _ALL, (_triton_fwd, _triton_bwd)),
):
    _fwd, _bwd = _compiled(*_launchers)
    if _backend == "cpu":
        _fwd, _bwd = _ieee_cpu(_fwd, _bwd)
    register_kernel(OP, _backend, _dtypes)(_fwd)
    register_kernel(OP + "_backward", _backend, _dtypes)(_bwd)
