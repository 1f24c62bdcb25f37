"""Triton kernels of the MTI-Net attention distillation, forward and backward.

feats, out, grad_out: (N, T, C, H, W); mask_logits, messages and their grads: (N, T, S, C, H, W).
Layout contract (the caller guarantees it): the trailing (C, H, W) block of every tensor is one
dense run of P = C*H*W elements, ordered the same way in all tensors of a call; outer strides
are free. Outputs are preallocated and must not alias inputs.
"""

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 2048


@triton.jit
def _program_span(T, P, n_chunks, BLOCK: tl.constexpr):
    """Split the flat program id (pair-major, chunk-minor) into (n, t, start, lanes, in bounds)."""
    pid = tl.program_id(0).to(tl.int64)
    pair = pid // n_chunks
    start = (pid - pair * n_chunks) * BLOCK
    n = pair // T
    lanes = tl.arange(0, BLOCK)
    return n, pair - n * T, start, lanes, lanes < P - start


@triton.jit
def _fwd_kernel(
    feats, mask, msg, out,
    T, S, P, n_chunks,
    f_sn, f_st, m_sn, m_st, m_ss, g_sn, g_st, g_ss, o_sn, o_st,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[n,t] = feats[n,t] + sum_s sigmoid(mask[n,t,s]) * msg[n,t,s] on one chunk of P."""
    n, t, start, lanes, valid = _program_span(T, P, n_chunks, BLOCK)
    acc = tl.load(feats + (n * f_sn + t * f_st + start) + lanes, mask=valid).to(ACC)
    m_base = mask + (n * m_sn + t * m_st + start)
    g_base = msg + (n * g_sn + t * g_st + start)
    for s in range(S):
        # In 64 bits: the JIT passes a stride below 2**31 as an i32, and s * stride can pass it.
        s64 = tl.cast(s, tl.int64)
        logit = tl.load(m_base + s64 * m_ss + lanes, mask=valid).to(ACC)
        acc += tl.sigmoid(logit) * tl.load(g_base + s64 * g_ss + lanes, mask=valid).to(ACC)
    o_ptr = out + (n * o_sn + t * o_st + start) + lanes
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_kernel(
    grad_out, mask, msg, grad_mask, grad_msg,
    T, S, P, n_chunks,
    go_sn, go_st, m_sn, m_st, m_ss, g_sn, g_st, g_ss, dm_sn, dm_st, dm_ss, dg_sn, dg_st, dg_ss,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad_msg = g * sig, grad_mask = g * msg * sig * (1 - sig), sig recomputed, on one chunk."""
    n, t, start, lanes, valid = _program_span(T, P, n_chunks, BLOCK)
    g = tl.load(grad_out + (n * go_sn + t * go_st + start) + lanes, mask=valid).to(ACC)
    m_base = mask + (n * m_sn + t * m_st + start)
    g_base = msg + (n * g_sn + t * g_st + start)
    dm_base = grad_mask + (n * dm_sn + t * dm_st + start)
    dg_base = grad_msg + (n * dg_sn + t * dg_st + start)
    for s in range(S):
        s64 = tl.cast(s, tl.int64)  # as in _fwd_kernel
        sig = tl.sigmoid(tl.load(m_base + s64 * m_ss + lanes, mask=valid).to(ACC))
        x = tl.load(g_base + s64 * g_ss + lanes, mask=valid).to(ACC)
        g_sig = g * sig
        tl.store(dg_base + s64 * dg_ss + lanes, g_sig.to(grad_msg.dtype.element_ty), mask=valid)
        d_mask = g_sig * x * (1.0 - sig)
        tl.store(dm_base + s64 * dm_ss + lanes, d_mask.to(grad_mask.dtype.element_ty), mask=valid)


def _launch_config(p: int, dtype: torch.dtype) -> tuple[int, int, tl.dtype]:
    """(BLOCK, num_warps, accumulator dtype) for an inner block of p elements."""
    block = min(_MAX_BLOCK, max(128, triton.next_power_of_2(p)))
    # 8 elements per thread: one 16-byte access for half types, two for float32.
    num_warps = max(1, min(8, block // 256))
    return block, num_warps, tl.float64 if dtype == torch.float64 else tl.float32


def _outer(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of the outer (N, T[, S]) dims in elements."""
    return t.stride()[: t.dim() - 3]


def forward(
    feats: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor, out: torch.Tensor
) -> None:
    """Write feats + sum_s sigmoid(mask_logits) * messages into out; (N,T,C,H,W), (N,T,S,C,H,W)."""
    n, t = feats.shape[:2]
    s = mask_logits.shape[2]
    p = feats.shape[2:].numel()
    if n * t * p == 0:
        return
    block, num_warps, acc = _launch_config(p, feats.dtype)
    n_chunks = triton.cdiv(p, block)
    _fwd_kernel[(n * t * n_chunks,)](
        feats, mask_logits, messages, out,
        t, s, p, n_chunks,
        *_outer(feats), *_outer(mask_logits), *_outer(messages), *_outer(out),
        ACC=acc, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip


def backward(
    grad_out: torch.Tensor,
    mask_logits: torch.Tensor,
    messages: torch.Tensor,
    grad_mask_logits: torch.Tensor,
    grad_messages: torch.Tensor,
) -> None:
    """Write the mask-logit and message grads; grad_out (N,T,C,H,W), the rest (N,T,S,C,H,W)."""
    n, t, s = mask_logits.shape[:3]
    p = grad_out.shape[2:].numel()
    if n * t * s * p == 0:
        return
    block, num_warps, acc = _launch_config(p, grad_out.dtype)
    n_chunks = triton.cdiv(p, block)
    _bwd_kernel[(n * t * n_chunks,)](
        grad_out, mask_logits, messages, grad_mask_logits, grad_messages,
        t, s, p, n_chunks,
        *_outer(grad_out), *_outer(mask_logits), *_outer(messages),
        *_outer(grad_mask_logits), *_outer(grad_messages),
        ACC=acc, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
