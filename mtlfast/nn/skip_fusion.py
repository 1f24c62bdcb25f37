"""UberNet's skip-layer task head (Sec. 2): normalised skip features, per-layer linear scores, fusion."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import skip_fusion

__all__ = ["SkipScoreFusion"]


class SkipScoreFusion(nn.Module):
    """Scores of all tasks from K skip layers, resized to one size and fused by a learned sum.

    ``out = bias + sum_k weight[k] * resize(conv1x1_k(BN_k(f_k)))``: batch norm on every skip
    input but the last ("skip-layer normalization": the top layer already feeds a linear
    classifier), one 1x1 projection per layer to the concatenated score channels of all tasks
    (Eq. 1, accumulated layer by layer as in Eq. 2), then the fusion of :func:`mtlfast.ops.skip_fusion`,
    which resizes bilinearly and sums without a full-resolution map per layer.

    ``weight`` starts at ones, so the layer starts as the plain sum of Eq. 1 ("sum-fusion"), from
    which the learned fusion departs. A mean (1/K) would only rescale the same function, shrinking
    the initial scores and each projection's gradient by K; ones keeps both at the scale of a
    single ``nn.Conv2d`` head. ``bias`` starts at zero.

    The projections have no bias: bilinear resizing keeps a constant map constant, so per-layer
    biases would only add ``sum_k weight[k] * b_k``, one constant per channel, which ``bias``
    already is. In eval mode each batch norm is folded into its projection at forward time (a
    scaled weight, and a shift that joins ``bias`` the same way), so the normalised features are
    never materialised; :meth:`folded_projection` gives the folded weights.

    Args:
        in_channels: C_1..C_K, the channels of the K skip layers, the last one unnormalised.
        out_channels: C, the sum of the tasks' score channels.
        eps, momentum: of the batch norms, as for ``nn.BatchNorm2d``.

    Shapes:
        features: a list of K tensors (N, C_k, H_k, W_k); size: (H, W).
        output: (N, C, H, W).

    ``norms`` holds the K-1 ``nn.BatchNorm2d``, ``projections`` the K ``nn.Conv2d(C_k, C, 1)``;
    ``weight`` is (K, C), ``bias`` (C,).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        in_channels = tuple(in_channels)
        if not in_channels or any(not isinstance(c, int) or c < 1 for c in in_channels):
            raise ValueError(
                f"SkipScoreFusion: in_channels must be a non-empty list of positive ints, got {in_channels}"
            )
        if out_channels < 1:
            raise ValueError(f"SkipScoreFusion: out_channels must be >= 1, got {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(c, eps=eps, momentum=momentum) for c in in_channels[:-1]
        )
        self.projections = nn.ModuleList(
            nn.Conv2d(c, out_channels, 1, bias=False) for c in in_channels
        )
        self.weight = nn.Parameter(torch.ones(len(in_channels), out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def reset_parameters(self) -> None:
        for module in (*self.norms, *self.projections):
            module.reset_parameters()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def folded_projection(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer k's projection with its batch norm's running statistics folded in.

        Returns (weight (C, C_k, 1, 1), shift (C,)): ``conv1x1(BN_k(f), W) == conv1x1(f, weight) + shift``
        in eval mode. The last layer has no batch norm: its weight and a zero shift.
        """
        if not 0 <= k < len(self.in_channels):
            raise ValueError(
                f"SkipScoreFusion: k must lie in [0, {len(self.in_channels)}), got {k}"
            )
        w = self.projections[k].weight
        if k == len(self.norms):
            return w, w.new_zeros(self.out_channels)
        bn = self.norms[k]
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return w * scale[None, :, None, None], w.flatten(1) @ (bn.bias - bn.running_mean * scale)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        self._check(features)
        bias = self.bias
        scores = []
        for k, f in enumerate(features):
            if self.training or k == len(self.norms):
                if k < len(self.norms):
                    f = self.norms[k](f)
                scores.append(F.conv2d(f, self.projections[k].weight))
            else:
                w, shift = self.folded_projection(k)
                scores.append(F.conv2d(f, w))
                bias = bias + self.weight[k] * shift
        return skip_fusion(scores, self.weight, bias, size)

    def _check(self, features: object) -> None:
        k = len(self.in_channels)
        if not isinstance(features, (list, tuple)) or len(features) != k:
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(
                f"SkipScoreFusion: features must be a list of {k} tensors (N, C_k, H_k, W_k), got {got}"
            )
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if not isinstance(f, torch.Tensor):
                raise TypeError(
                    f"SkipScoreFusion: features[{i}] must be a torch.Tensor, got {type(f).__name__}"
                )
            if f.dim() != 4 or f.shape[1] != c or f.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"SkipScoreFusion: features[{i}] must have shape (N, C_{i}={c}, H, W) with the N of features[0], "
                    f"got {tuple(f.shape)}"
                )

    def extra_repr(self) -> str:
        return f"in_channels={list(self.in_channels)}, out_channels={self.out_channels}"
