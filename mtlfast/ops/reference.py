"""Pure-PyTorch references of the fused ops: the oracle of every test, written for clarity.

Each function has the name and signature of its op in ``mtlfast.ops``. Reduced-precision inputs
are computed in float32 and rounded once at the end, as the fused kernels do.
"""

from __future__ import annotations

import torch

__all__ = ["attention_distill", "attention_distill_backward"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def attention_distill(feats: torch.Tensor, mask_logits: torch.Tensor, messages: torch.Tensor) -> torch.Tensor:
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
