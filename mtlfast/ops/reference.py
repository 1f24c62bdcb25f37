"""Pure-PyTorch references of the fused ops: the oracle of every test, written for clarity.

Each function has the name and signature of its op in ``mtlfast.ops``. Reduced-precision inputs
are computed in float32 and rounded once at the end, as the fused kernels do.
"""

from __future__ import annotations

import torch

__all__ = [
    "attention_distill",
    "attention_distill_backward",
    "skip_fusion",
    "skip_fusion_backward",
    "task_se",
]


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def attention_distill(
    feats: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor
) -> torch.Tensor:
    """MTI-Net's distillation (Eq. 1) after its convolutions.

    feats (N,T,C,H,W); mask_logits, messages (N,T,T-1,C,H,W) -> (N,T,C,H,W):
    ``out[:, k] = feats[:, k] + sum_s sigmoid(mask_logits[:, k, s]) * messages[:, k, s]``.
    """
    out = _acc(feats) + (torch.sigmoid(_acc(mask_logits)) * _acc(messages)).sum(dim=2)
    return out.to(feats.dtype)


def attention_distill_backward(
    grad_out: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_distill`` w.r.t. mask_logits and messages.

    grad_out (N,T,C,H,W); mask_logits, messages (N,T,T-1,C,H,W) -> two (N,T,T-1,C,H,W).
    The gradient w.r.t. feats is grad_out itself.
    """
    g = _acc(grad_out).unsqueeze(2)
    sig = torch.sigmoid(_acc(mask_logits))
    grad_messages = g * sig
    grad_mask_logits = grad_messages * _acc(messages) * (1 - sig)
    return grad_mask_logits.to(mask_logits.dtype), grad_messages.to(messages.dtype)


def skip_fusion(
    scores: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    size: tuple[int, int],
) -> torch.Tensor:
    """UberNet's skip-layer score fusion (Eq. 1-2) with a learned linear combination of layers.

    scores: K tensors (N,C,H_k,W_k); weight (K,C); bias (C,) or None; size (H,W) -> (N,C,H,W):
    ``bias + sum_k weight[k] * interpolate(scores[k], size, bilinear, align_corners=False)``.
    """
    out = None
    for k, s in enumerate(scores):
        up = torch.nn.functional.interpolate(
            _acc(s), size=tuple(size), mode="bilinear", align_corners=False
        )
        term = _acc(weight[k])[None, :, None, None] * up
        out = term if out is None else out + term
    if bias is not None:
        out = out + _acc(bias)[None, :, None, None]
    return out.to(scores[0].dtype)


def skip_fusion_backward(
    grad_out: torch.Tensor, scores: list[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of ``skip_fusion`` w.r.t. scores, weight and bias.

    grad_out (N,C,H,W) -> (K tensors (N,C,H_k,W_k), (K,C), (C,)). The scores' gradient is the
    adjoint of bilinear resizing (aten's upsample_bilinear2d_backward) of the weighted grad_out.
    """
    g = _acc(grad_out)
    size = list(grad_out.shape[-2:])
    grad_scores, grad_weight = [], []
    for k, s in enumerate(scores):
        weighted = g * _acc(weight[k])[None, :, None, None]
        adjoint = torch.ops.aten.upsample_bilinear2d_backward(weighted, size, list(s.shape), False)
        grad_scores.append(adjoint.to(s.dtype))
        up = torch.nn.functional.interpolate(
            _acc(s), size=size, mode="bilinear", align_corners=False
        )
        grad_weight.append((g * up).sum(dim=(0, 2, 3)))
    grad_bias = g.sum(dim=(0, 2, 3))
    return grad_scores, torch.stack(grad_weight).to(weight.dtype), grad_bias.to(weight.dtype)


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
    """Task-conditioned squeeze-and-excitation, one task per sample (ASTMT Sec. 3.1).

    x (N,C,H,W); task (N,) int64; w1 (T,R,C); b1 (T,R); w2 (T,C,R); b2 (T,C); residual (N,C,H,W)
    or None -> (N,C,H,W): ``g = sigmoid(w2[t] @ relu(w1[t] @ mean_hw(x[n]) + b1[t]) + b2[t])``,
    ``y = x * g (+ residual)``, then ReLU if ``relu``.
    """
    pooled = _acc(x).mean(dim=(2, 3))
    hidden = torch.relu(torch.einsum("nrc,nc->nr", _acc(w1)[task], pooled) + _acc(b1)[task])
    gate = torch.sigmoid(torch.einsum("ncr,nr->nc", _acc(w2)[task], hidden) + _acc(b2)[task])
    y = _acc(x) * gate[:, :, None, None]
    if residual is not None:
        y = y + _acc(residual)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)
