"""Triton kernels of the task-conditioned squeeze-and-excitation (ASTMT): the passes over the features.

x, residual, grad_out, out, grad_x, grad_residual: (N, C, H, W), all contiguous (NCHW) or all
channels-last (NHWC); pooled, gate, grad_gate, grad_pooled: contiguous (N, C) float32 (float64 for
float64 features). Outputs are preallocated, entirely overwritten and must not alias inputs.
The program decomposition is that of the CUDA kernels in kernels/task_se.cu.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# NCHW reductions: planes of up to _TILE // 2 pixels are packed _TILE // next_pow2(HW) to a
# program, longer ones get a program each. Elementwise kernels: _TILE elements a program.
_TILE = 2048
# NHWC reductions: a program covers _CHUNK_BYTES of channels, and the pixels are split until about
# _TARGET_PROGRAMS programs run, keeping at least _MIN_SPLIT_PIXELS each.
_CHUNK_BYTES = 512
_TARGET_PROGRAMS = 2048
_MIN_SPLIT_PIXELS = 16
_NUM_WARPS = 8  # 8 elements a thread for every _TILE-element tile


@triton.jit
def _relu_grad(g, x, gate, res_ptr, offs, mask, RELU: tl.constexpr, HAS_RES: tl.constexpr):
    """g where the recomputed out = x * gate (+ residual) is positive; all of g without the ReLU."""
    if RELU:
        out = x * gate
        if HAS_RES:
            out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        g = tl.where(out > 0, g, 0.0)
    return g


@triton.jit
def _contribution(
    go_ptr,
    x_ptr,
    res_ptr,
    gres_ptr,
    offs,
    mask,
    gate,
    GRAD: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_GRES: tl.constexpr,
    ACC: tl.constexpr,
):
    """What elements add to their planes' sums: x (pool), or g' * x, g' stored to grad_residual."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if GRAD:
        g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = _relu_grad(g, x, gate, res_ptr, offs, mask, RELU, HAS_RES)
        if HAS_GRES:
            tl.store(gres_ptr + offs, g.to(gres_ptr.dtype.element_ty), mask=mask)
        x = g * x
    return x


@triton.jit
def _reduce_nchw_kernel(
    go_ptr,
    x_ptr,
    gate_ptr,
    res_ptr,
    gres_ptr,
    out_ptr,
    planes,
    HW,
    divisor,
    GRAD: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_GRES: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[p] = sum of the contributions of plane p / divisor, for ROWS consecutive planes p."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < planes
    if GRAD:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    else:
        gate = tl.zeros([ROWS, 1], ACC)
    acc = tl.zeros([ROWS, BLOCK_HW], ACC)
    for h0 in range(0, HW, BLOCK_HW):
        cols = h0 + tl.arange(0, BLOCK_HW)
        offs = rows[:, None] * HW + cols[None, :]
        mask = row_ok[:, None] & (cols < HW)[None, :]
        acc += _contribution(
            go_ptr, x_ptr, res_ptr, gres_ptr, offs, mask, gate, GRAD, RELU, HAS_RES, HAS_GRES, ACC
        )
    tl.store(out_ptr + rows, tl.sum(acc, axis=1) / divisor, mask=row_ok)


@triton.jit
def _reduce_nhwc_kernel(
    go_ptr,
    x_ptr,
    gate_ptr,
    res_ptr,
    gres_ptr,
    out_ptr,
    C,
    HW,
    chunks,
    splits,
    split_pixels,
    steps,
    divisor,
    GRAD: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_GRES: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program (n, chunk, split), split fastest: out[n, chunk] (+)= its pixels' sum / divisor."""
    pid = tl.program_id(0).to(tl.int64)
    pair = pid // splits
    split = pid - pair * splits
    n = pair // chunks
    ch = (pair - n * chunks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < C
    if GRAD:
        gate = tl.load(gate_ptr + n * C + ch, mask=ch_ok, other=0.0).to(ACC)[None, :]
    else:
        gate = tl.zeros([1, BLOCK_C], ACC)
    p_begin = split * split_pixels
    p_end = tl.minimum(p_begin + split_pixels, HW)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for s in range(steps):
        pix = p_begin + s * BLOCK_P + tl.arange(0, BLOCK_P)
        offs = (n * HW + pix)[:, None] * C + ch[None, :]
        mask = (pix < p_end)[:, None] & ch_ok[None, :]
        acc += _contribution(
            go_ptr, x_ptr, res_ptr, gres_ptr, offs, mask, gate, GRAD, RELU, HAS_RES, HAS_GRES, ACC
        )
    total = tl.sum(acc, axis=0) / divisor
    if ATOMIC:
        tl.atomic_add(out_ptr + n * C + ch, total, mask=ch_ok, sem="relaxed")
    else:
        tl.store(out_ptr + n * C + ch, total, mask=ch_ok)


@triton.jit
def _flat_span(numel, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's offsets into the flat tensor and their bounds mask; int64 when WIDE."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _gate_index(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    """n*C + c of flat element offsets of an (N, C, H, W) tensor in NCHW or NHWC order."""
    if CHANNELS_LAST:
        q = offs // C
        idx = (q // HW) * C + (offs - q * C)
    else:
        idx = offs // HW
    return idx


@triton.jit
def _scale_kernel(
    x_ptr,
    gate_ptr,
    res_ptr,
    out_ptr,
    numel,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RES: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """out = x * gate[n, c] (+ residual), ReLU if RELU, on one BLOCK of the flat tensor."""
    offs, mask = _flat_span(numel, WIDE, BLOCK)
    gate = tl.load(gate_ptr + _gate_index(offs, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
    out = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) * gate
    if HAS_RES:
        out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        out = tl.where(out < 0, 0.0, out)  # NaN passes, as in torch.relu
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_grad_kernel(
    go_ptr,
    x_ptr,
    gate_ptr,
    res_ptr,
    gp_ptr,
    gx_ptr,
    numel,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    HAS_RES: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """grad_x = g' * gate[n, c] + grad_pooled[n, c] / HW on one BLOCK of the flat tensor."""
    offs, mask = _flat_span(numel, WIDE, BLOCK)
    idx = _gate_index(offs, C, HW, CHANNELS_LAST)
    gate = tl.load(gate_ptr + idx, mask=mask, other=0.0).to(ACC)
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(ACC)
    if RELU:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = _relu_grad(g, x, gate, res_ptr, offs, mask, RELU, HAS_RES)
    grad_x = g * gate + tl.load(gp_ptr + idx, mask=mask, other=0.0).to(ACC) / HW
    tl.store(gx_ptr + offs, grad_x.to(gx_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _channels_last(x: torch.Tensor) -> bool:
    """Memory order of the call's features; a tensor dense both ways has one order."""
    return not x.is_contiguous()


def _nhwc_geometry(n: int, c: int, hw: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(chunk, chunks, splits, split_pixels) of the NHWC reduction, as in task_se.cu."""
    chunk = min(triton.next_power_of_2(c), _CHUNK_BYTES // elem_bytes)
    chunks = triton.cdiv(c, chunk)
    wanted = triton.cdiv(_TARGET_PROGRAMS, n * chunks)
    splits = max(1, min(wanted, triton.cdiv(hw, _MIN_SPLIT_PIXELS)))
    split_pixels = triton.cdiv(hw, splits)
    return chunk, chunks, triton.cdiv(hw, split_pixels), split_pixels


def _reduce(
    grad_out, x, gate, residual, relu, out, grad_residual, grad: bool, divisor: float
) -> None:
    """out[n, c] = (sum over the pixels of x, or of g' * x when grad) / divisor; HW > 0, N*C > 0."""
    n, c, h, w = x.shape
    hw = h * w
    args = (
        x if grad_out is None else grad_out,
        x,
        x if gate is None else gate,
        x if residual is None else residual,
        x if grad_residual is None else grad_residual,
        out,
    )
    flags = {
        "GRAD": grad,
        "RELU": relu,
        "HAS_RES": residual is not None,
        "HAS_GRES": grad_residual is not None,
    }
    if _channels_last(x):
        chunk, chunks, splits, split_pixels = _nhwc_geometry(n, c, hw, x.element_size())
        block_p = max(1, _TILE // chunk)
        if splits > 1:
            out.zero_()
        _reduce_nhwc_kernel[(n * chunks * splits,)](
            *args,
            c,
            hw,
            chunks,
            splits,
            split_pixels,
            triton.cdiv(split_pixels, block_p),
            divisor,
            **flags,
            ATOMIC=splits > 1,
            BLOCK_C=chunk,
            BLOCK_P=block_p,
            ACC=_acc(x.dtype),
            num_warps=_NUM_WARPS,
        )
    else:
        block_hw = triton.next_power_of_2(hw)
        rows = _TILE // block_hw if block_hw <= _TILE // 2 else 1
        block_hw = min(block_hw, _TILE)
        _reduce_nchw_kernel[(triton.cdiv(n * c, rows),)](
            *args,
            n * c,
            hw,
            divisor,
            **flags,
            ROWS=rows,
            BLOCK_HW=block_hw,
            ACC=_acc(x.dtype),
            num_warps=_NUM_WARPS,
        )


def _elementwise_flags(x: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> dict:
    return {
        "CHANNELS_LAST": _channels_last(x),
        "RELU": relu,
        "HAS_RES": residual is not None,
        "WIDE": x.numel() + _TILE > 2**31 - 1,
        "BLOCK": _TILE,
        "ACC": _acc(x.dtype),
        "num_warps": _NUM_WARPS,
    }


def pool(x: torch.Tensor, pooled: torch.Tensor) -> None:
    """pooled[n, c] = mean over H, W of x[n, c]; x (N, C, H, W), pooled (N, C)."""
    n, c, h, w = x.shape
    if n * c == 0:
        return
    if h * w == 0:
        pooled.fill_(float("nan"))  # the mean of nothing, as torch.mean
        return
    _reduce(None, x, None, None, False, pooled, None, False, float(h * w))


def scale(
    x: torch.Tensor,
    gate: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    out: torch.Tensor,
) -> None:
    """out = x * gate[n, c] (+ residual), then ReLU if relu; x, residual, out (N, C, H, W), gate (N, C)."""
    if x.numel() == 0:
        return
    _, c, h, w = x.shape
    _scale_kernel[(triton.cdiv(x.numel(), _TILE),)](
        x,
        gate,
        x if residual is None else residual,
        out,
        x.numel(),
        c,
        h * w,
        **_elementwise_flags(x, residual, relu),
    )


def backward_gate(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    grad_gate: torch.Tensor,
    grad_residual: torch.Tensor | None,
) -> None:
    """grad_gate = sum_hw g' * x, grad_residual = g' (if given); (N, C, H, W) features, (N, C) gates.

    g' is grad_out where the recomputed out is positive (all of it without the ReLU).
    """
    n, c, h, w = x.shape
    if n * c == 0:
        return
    if h * w == 0:
        grad_gate.zero_()
        return
    # Without the ReLU the residual does not enter g'; leaving it out spares its reads.
    _reduce(
        grad_out, x, gate, residual if relu else None, relu, grad_gate, grad_residual, True, 1.0
    )


def backward_input(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    grad_pooled: torch.Tensor,
    grad_x: torch.Tensor,
) -> None:
    """grad_x = g' * gate[n, c] + grad_pooled[n, c] / (H*W), g' as in backward_gate; (N, C, H, W), (N, C)."""
    if x.numel() == 0:
        return
    _, c, h, w = x.shape
    residual = residual if relu else None
    _input_grad_kernel[(triton.cdiv(x.numel(), _TILE),)](
        grad_out,
        x,
        gate,
        x if residual is None else residual,
        grad_pooled,
        grad_x,
        x.numel(),
        c,
        h * w,
        **_elementwise_flags(x, residual, relu),
    )
