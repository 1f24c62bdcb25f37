"""Cross-entropy for semantic segmentation and human parts (ASTMT / MTI-Net ``SoftMaxwithLoss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension
from ..ops._dispatch import runs_directly
from ..ops.backends import current_backend
from ._labeled import IGNORE, safe_mean, select_labeled, zero_loss

__all__ = ["cross_entropy_loss"]


def _kernels(x: torch.Tensor) -> bool:
    """Whether the C++ kernels take ``x``: float32/float64 NCHW or channels-last logits on the
    CPU, in plain eager code (under torch.compile, modes, tensor subclasses or
    ``use_backend("reference")`` the aten formula runs)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and current_backend() != "reference"
        and runs_directly(x)
        and _extension.has_extension()
    )


class _SoftmaxCrossEntropySum(torch.autograd.Function):
    """``F.cross_entropy(x, target, ignore_index, reduction="sum")`` with a leaner backward.

    aten's pair (log_softmax, then nll_loss) keeps the log-probabilities and back-propagates
    through a dense gradient map of each: three maps of the logits' size alive at once (63 MiB
    for 21 classes at 256x256, batch 4: ASTMT's training peak was at this backward). Here the
    logits are kept and backward writes ``(softmax(x) - onehot(target)) * valid * grad`` into one
    map: two alive. On the CPU (float32/float64, NCHW or channels-last) C++ kernels
    (``csrc/cpu/softmax_xent_kernel.h``) compute each pixel's log-sum-exp and loss in one pass
    over the logits, kept for backward with the log-sum-exp, and the gradient in one more: at
    (4, 21, 256, 256) on a 2-core EPYC forward and backward 16.3 -> 7.6 ms NCHW and
    27.7 -> 8.4 ms channels-last, where aten's reductions over the channels are slow. Elsewhere
    the same formula runs in aten's ops (logsumexp, then softmax in backward). With
    ``create_graph`` (ASTMT's adversarial term) the formula runs in differentiable ops, out of
    place, so the gradient is differentiable again. Reduced precision logits are computed in
    float32, as autocast runs aten's.

    Shapes: x (N, C, H, W); target (N, H, W) int64, ``ignore_index`` or in [0, C). Returns a
    0-dim tensor of x's dtype promoted to at least float32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        ctx.ignore_index = ignore_index
        if _kernels(x):
            target = target.contiguous()
            lse, nll = torch.ops.mtlfast_C.softmax_xent_fwd(x, target, ignore_index)
            ctx.save_for_backward(x, target, lse)
            return nll.sum()
        valid = target != ignore_index
        index = torch.where(valid, target, 0).unsqueeze(1)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        nll = torch.logsumexp(xf, 1) - xf.gather(1, index).squeeze(1)
        ctx.save_for_backward(x, target, None)
        return torch.where(valid, nll, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, target, lse = ctx.saved_tensors
        if lse is not None and not torch.is_grad_enabled() and _kernels(x) and runs_directly(grad):
            out = torch.ops.mtlfast_C.softmax_xent_bwd(
                x, target, lse, ctx.ignore_index, float(grad)
            )
            return out, None, None
        valid = target != ctx.ignore_index
        index = torch.where(valid, target, 0).unsqueeze(1)
        p = torch.softmax(x.to(torch.promote_types(x.dtype, torch.float32)), 1)
        scale = (valid.unsqueeze(1) * grad).to(p.dtype)
        minus_one = p.new_full((), -1.0).expand(index.shape)
        if torch.is_grad_enabled():  # create_graph: differentiable, out of place
            out = p.scatter_add(1, index, minus_one) * scale
        else:
            out = p.scatter_add_(1, index, minus_one).mul_(scale)
        return out.to(x.dtype), None, None


def cross_entropy_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    labeled: torch.Tensor | None = None,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Softmax cross-entropy averaged over the non-ignored pixels of the labelled samples.

    Shapes: prediction (N, C, H, W) logits; target (N, H, W) or (N, 1, H, W) int64 class ids,
    ``ignore_index`` = ignore; labeled (N,) bool or None (all labelled). Returns a 0-dim tensor;
    a zero connected to ``prediction`` when no labelled, non-ignored pixel is left.
    """
    if prediction.dim() != 4:
        raise ValueError(f"prediction must be (N, C, H, W) logits, got {tuple(prediction.shape)}")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != prediction.shape[:1] + prediction.shape[2:]:
        raise ValueError(
            f"target must be (N, H, W) = {tuple(prediction.shape[:1] + prediction.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class ids, got {target.dtype}")
    prediction, target = select_labeled(prediction, target, labeled)
    if prediction.shape[0] == 0:
        return zero_loss(prediction)
    target = target.long()
    # an id out of range would stop aten with an IndexError (a device-side assert on CUDA)
    c = prediction.shape[1]
    if bool(((target < 0) | (target >= c)).logical_and_(target != ignore_index).any()):
        raise ValueError(
            f"target holds class ids outside [0, {c}) (C = prediction.shape[1]) other than "
            f"ignore_index = {ignore_index}"
        )
    if torch.is_grad_enabled() and prediction.requires_grad:
        total = _SoftmaxCrossEntropySum.apply(prediction, target, ignore_index)
    elif _kernels(prediction):  # no graph: the forward kernel alone
        _, nll = torch.ops.mtlfast_C.softmax_xent_fwd(prediction, target.contiguous(), ignore_index)
        total = nll.sum()
    else:
        total = F.cross_entropy(prediction, target, ignore_index=ignore_index, reduction="sum")
    return safe_mean(total, (target != ignore_index).sum())
