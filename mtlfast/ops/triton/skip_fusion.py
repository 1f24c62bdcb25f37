"""Triton kernels of UberNet's skip-layer score fusion, forward and backward.

scores[k]: (N, C, H_k, W_k); weight (K, C); bias (C,); out, grad_out: (N, C, H, W); all
contiguous, one dtype. out[n,c] = bias[c] + sum_k weight[k,c] * bilinear(scores[k][n,c], (H, W)),
bilinear being interpolate(mode="bilinear", align_corners=False). Outputs are preallocated and
entirely overwritten; they must not alias inputs.

The layers' sizes differ and K is only known at run time, so each launch gets a small table of
per-layer (address, H_k, W_k) rows and the kernels loop over it, casting the addresses back to
pointers: one kernel for any K, every low-resolution map read in place, out written once.
"""

import torch
import triton
import triton.language as tl

# Elements a program covers, and per thread (num_warps follows). The backward keeps about twice
# the forward's values live per element (taps, weights, four scatters): at 8 a thread it took
# 163-191 registers on sm_90 at the benchmark shapes (one 8-warp block per SM), at 4 <= 128 with
# no spills (tests/ops/test_triton_aot.py compiles every specialization ahead of time).
_FWD_LANES, _FWD_PER_THREAD = 2048, 8
_BWD_LANES, _BWD_PER_THREAD = 1024, 4
_MAX_PIXELS = 1024
# The kernels index within one plane (an output or score map of one (n, c)) in 32 bits.
_MAX_PLANE = 2**31 - 1
_REDUCED = (torch.float16, torch.bfloat16)


@triton.jit
def _lanes(NC, HW, n_chunks, BP: tl.constexpr, BI: tl.constexpr):
    """Planes (BP,) and in-plane pixels (1, BI) of this program, and which pairs are in bounds."""
    pid = tl.program_id(0).to(tl.int64)
    block = pid // n_chunks
    plane = block * BP + tl.arange(0, BP)
    pix = (pid - block * n_chunks) * BI + tl.arange(0, BI)[None, :]
    return plane, pix, (plane[:, None] < NC) & (pix < HW)


@triton.jit
def _taps(dst, scale, size):
    """aten's align_corners=False taps of dst: (i0, i1, l0, l1), value l0*s[i0] + l1*s[i1]."""
    # One fused multiply-add, as aten's CPU and CUDA builds compile scale * (dst + 0.5) - 0.5.
    src = tl.maximum(tl.fma(scale, dst.to(scale.dtype) + 0.5, -0.5), 0.0)
    i0 = src.to(tl.int32)
    l1 = src - i0.to(scale.dtype)
    return i0, i0 + (i0 < size - 1).to(tl.int32), 1.0 - l1, l1


@triton.jit
def _bilinear(base, w_k, y0, y1, ly0, ly1, x0, x1, lx0, lx1, valid, ACC: tl.constexpr):
    """aten's bilinear value from the map at base, in aten's order of operations."""
    a = tl.load(base + y0 * w_k + x0, mask=valid, other=0.0).to(ACC)
    b = tl.load(base + y0 * w_k + x1, mask=valid, other=0.0).to(ACC)
    c = tl.load(base + y1 * w_k + x0, mask=valid, other=0.0).to(ACC)
    d = tl.load(base + y1 * w_k + x1, mask=valid, other=0.0).to(ACC)
    return ly0 * (lx0 * a + lx1 * b) + ly1 * (lx0 * c + lx1 * d)


@triton.jit
def _scatter(dst, row, col, w_k, coef, value, valid):
    """Add coef * value at (row, col) of the accumulator at dst."""
    # Zero coefficients (equal sizes, clamped borders) would only add atomics and contention.
    ptr = dst + row * w_k + col
    tl.atomic_add(ptr, coef * value, mask=valid & (coef != 0.0), sem="relaxed")


@triton.jit
def _layer(table, scales, k, y, x):
    """Layer k's (H_k, W_k) and the taps of output rows y and columns x into it."""
    h_k = tl.load(table + 4 * k + 2).to(tl.int32)
    w_k = tl.load(table + 4 * k + 3).to(tl.int32)
    y0, y1, ly0, ly1 = _taps(y, tl.load(scales + 2 * k), h_k)
    x0, x1, lx0, lx1 = _taps(x, tl.load(scales + 2 * k + 1), w_k)
    return h_k, w_k, y0, y1, ly0, ly1, x0, x1, lx0, lx1


@triton.jit
def _fwd_kernel(
    table, scales, weight, bias, out,
    K, C, NC, H, W, n_chunks,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """out = bias + sum_k weight[k] * bilinear(scores[k]) on BP planes x BI pixels."""
    plane, pix, valid = _lanes(NC, H * W, n_chunks, BP, BI)
    c = (plane % C)[:, None]
    in_plane = plane[:, None] < NC
    y = pix // W
    x = pix - y * W
    acc = tl.zeros([BP, BI], ACC)
    if HAS_BIAS:
        acc += tl.load(bias + c, mask=in_plane, other=0.0).to(ACC)
    for layer in range(K):
        k = tl.cast(layer, tl.int64)  # every offset into the table and weight in 64 bits
        h_k, w_k, y0, y1, ly0, ly1, x0, x1, lx0, lx1 = _layer(table, scales, k, y, x)
        src = tl.load(table + 4 * k).to(tl.pointer_type(out.dtype.element_ty))
        src += plane[:, None] * (h_k * w_k)
        value = _bilinear(src, w_k, y0, y1, ly0, ly1, x0, x1, lx0, lx1, valid, ACC)
        acc += tl.load(weight + k * C + c, mask=in_plane, other=0.0).to(ACC) * value
    tl.store(out + plane[:, None] * (H * W) + pix, acc.to(out.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_kernel(
    grad_out, table, scales, weight, grad_weight, grad_bias,
    K, C, NC, H, W, n_chunks,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BP: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """Scatter g * weight[k] into every layer's accumulator; sum g * bilinear and g per plane."""
    plane, pix, valid = _lanes(NC, H * W, n_chunks, BP, BI)
    c = plane % C
    in_plane = plane < NC
    y = pix // W
    x = pix - y * W
    g = tl.load(grad_out + plane[:, None] * (H * W) + pix, mask=valid, other=0.0).to(ACC)
    for layer in range(K):
        k = tl.cast(layer, tl.int64)  # as in _fwd_kernel
        h_k, w_k, y0, y1, ly0, ly1, x0, x1, lx0, lx1 = _layer(table, scales, k, y, x)
        offset = plane[:, None] * (h_k * w_k)
        dst = tl.load(table + 4 * k + 1).to(tl.pointer_type(ACC)) + offset
        gw = g * tl.load(weight + k * C + c, mask=in_plane, other=0.0).to(ACC)[:, None]
        _scatter(dst, y0, x0, w_k, ly0 * lx0, gw, valid)
        _scatter(dst, y0, x1, w_k, ly0 * lx1, gw, valid)
        _scatter(dst, y1, x0, w_k, ly1 * lx0, gw, valid)
        _scatter(dst, y1, x1, w_k, ly1 * lx1, gw, valid)
        src = tl.load(table + 4 * k).to(tl.pointer_type(grad_out.dtype.element_ty)) + offset
        value = _bilinear(src, w_k, y0, y1, ly0, ly1, x0, x1, lx0, lx1, valid, ACC)
        dot = tl.sum(g * value, axis=1)
        tl.atomic_add(grad_weight + k * C + c, dot, mask=in_plane, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(grad_bias + c, tl.sum(g, axis=1), mask=in_plane, sem="relaxed")


def _launch_config(
    nc: int, hw: int, dtype: torch.dtype, lanes: int, per_thread: int
) -> tuple[int, int, int, int, tl.dtype]:
    """(planes per program, pixels per program, chunks per plane, num_warps, accumulator dtype)
    for programs of up to ``lanes`` elements, ``per_thread`` of them a thread."""
    bi = min(_MAX_PIXELS, triton.next_power_of_2(hw))
    bp = min(max(1, lanes // bi), triton.next_power_of_2(nc))
    num_warps = max(1, min(8, bp * bi // (32 * per_thread)))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return bp, bi, triton.cdiv(hw, bi), num_warps, acc


def _tables(scores, accs, out_hw, acc_dtype, device):
    """Per-layer rows (map address, accumulator address or 0, H_k, W_k) and (scale_h, scale_w)."""
    h, w = out_hw
    acc_ptrs = [a.data_ptr() for a in accs] if accs else [0] * len(scores)
    rows = [[s.data_ptr(), a, *s.shape[2:]] for s, a in zip(scores, acc_ptrs)]
    # aten's scale, input / output size in the accumulator type (the float64 quotient rounds
    # to the same float32 as a float32 division would: it never lands on a float32 midpoint).
    scales = [[s.shape[2] / h, s.shape[3] / w] for s in scores]
    return (
        torch.tensor(rows, dtype=torch.int64).to(device),
        torch.tensor(scales, dtype=acc_dtype).to(device),
    )


def _check_planes(scores: list[torch.Tensor], h: int, w: int) -> None:
    """Planes of 2**31 elements or more raise ValueError naming the argument (as the CUDA kernels)."""
    for name, (ph, pw) in [("size", (h, w))] + [
        (f"scores[{k}]", s.shape[2:]) for k, s in enumerate(scores)
    ]:
        if ph * pw > _MAX_PLANE:
            raise ValueError(
                f"skip_fusion (triton): {name} has planes of {ph}x{pw} elements; the kernels "
                f"index a plane in 32 bits, so at most {_MAX_PLANE}"
            )


def _torch_acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED else dtype


def forward(
    scores: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Write bias + sum_k weight[k] * bilinear(scores[k]) into out.

    scores[k] (N,C,H_k,W_k), weight (K,C), bias (C,) or None, out (N,C,H,W).
    """
    n, c, h, w = out.shape
    if n * c * h * w == 0:
        return
    _check_planes(scores, h, w)
    bp, bi, n_chunks, num_warps, acc = _launch_config(
        n * c, h * w, out.dtype, _FWD_LANES, _FWD_PER_THREAD
    )
    table, scales = _tables(scores, None, (h, w), _torch_acc(out.dtype), out.device)
    _fwd_kernel[(triton.cdiv(n * c, bp) * n_chunks,)](
        table, scales, weight, out if bias is None else bias, out,
        len(scores), c, n * c, h, w, n_chunks,
        HAS_BIAS=bias is not None, ACC=acc, BP=bp, BI=bi, num_warps=num_warps,
    )  # fmt: skip


def backward(
    grad_out: torch.Tensor,
    scores: list[torch.Tensor],
    weight: torch.Tensor,
    grad_scores: list[torch.Tensor],
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor | None,
) -> None:
    """Write the grads of scores, weight and bias (when grad_bias is given) for grad_out.

    grad_out (N,C,H,W); scores, grad_scores: K tensors (N,C,H_k,W_k); weight, grad_weight (K,C);
    grad_bias (C,) or None.
    """
    n, c, h, w = grad_out.shape
    _check_planes(scores, h, w)
    outputs = [*grad_scores, grad_weight] + ([grad_bias] if grad_bias is not None else [])
    acc_dtype = _torch_acc(grad_out.dtype)
    if acc_dtype == grad_out.dtype:
        accs = outputs
        for t in accs:
            t.zero_()
    else:
        # Atomics into fp32 scratch, one zero-filled buffer, cast into the outputs at the end.
        sizes = [t.numel() for t in outputs]
        scratch = torch.zeros(sum(sizes), dtype=acc_dtype, device=grad_out.device)
        accs = [v.view(t.shape) for v, t in zip(scratch.split(sizes), outputs)]
    if n * c * h * w:
        bp, bi, n_chunks, num_warps, acc = _launch_config(
            n * c, h * w, grad_out.dtype, _BWD_LANES, _BWD_PER_THREAD
        )
        table, scales = _tables(scores, accs[: len(scores)], (h, w), acc_dtype, grad_out.device)
        k = len(scores)
        _bwd_kernel[(triton.cdiv(n * c, bp) * n_chunks,)](
            grad_out, table, scales, weight, accs[k], accs[-1],
            k, c, n * c, h, w, n_chunks,
            HAS_BIAS=grad_bias is not None, ACC=acc, BP=bp, BI=bi, num_warps=num_warps,
        )  # fmt: skip
    if accs is not outputs:
        for t, a in zip(outputs, accs):
            t.copy_(a)
