"""MTI-Net's multi-modal distillation unit (Sec. 2.3, Eq. 1), also PAD-Net's."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import attention_distill

__all__ = ["MultiModalDistillation"]


class MultiModalDistillation(nn.Module):
    """Refines each task's features with spatially gated messages from the other tasks.

    For target k and source l != k (the authors' ``SABlock``): ``mask = sigmoid(conv3x3(F_l))``,
    ``message = conv3x3(F_l)``, both 3x3 convolutions without bias, and
    ``out_k = F_k + sum_{l != k} mask * message`` (MTI-Net Eq. 1).

    All T*(T-1) pairs run as one grouped convolution over the features gathered per pair; its
    output is viewed, without a copy, as the mask logits and messages of the fused
    :func:`mtlfast.ops.attention_distill`, which applies the sigmoid, product, sum and residual in
    one pass and recomputes the sigmoid in its backward.

    Args:
        num_tasks: T >= 2.
        channels: C, the channels of every task's features.

    Shapes:
        input: a list of T tensors (N, C, H, W), or one tensor (N, T, C, H, W).
        output: the same form as the input.

    Parameters ``mask_weight`` and ``message_weight`` are (T, T-1, C, C, 3, 3): ``[k, s]`` is the
    convolution of target k applied to its s-th source, the s-th task other than k in increasing
    order. :meth:`pair_weights` gives them by task indices.
    """

    def __init__(self, num_tasks: int, channels: int) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"MultiModalDistillation: num_tasks must be >= 2, got {num_tasks}")
        if channels < 1:
            raise ValueError(f"MultiModalDistillation: channels must be >= 1, got {channels}")
        self.num_tasks = num_tasks
        self.channels = channels
        shape = (num_tasks, num_tasks - 1, channels, channels, 3, 3)
        self.mask_weight = nn.Parameter(torch.empty(shape))
        self.message_weight = nn.Parameter(torch.empty(shape))
        # sources[k * (T-1) + s] = the task feeding target k at slot s.
        sources = [l for k in range(num_tasks) for l in range(num_tasks) if l != k]
        self.register_buffer("sources", torch.tensor(sources, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default initialisation, per pair: U(-1/sqrt(9C), 1/sqrt(9C))."""
        bound = 1.0 / math.sqrt(self.channels * 9)
        nn.init.uniform_(self.mask_weight, -bound, bound)
        nn.init.uniform_(self.message_weight, -bound, bound)

    def source_slot(self, target: int, source: int) -> int:
        """Slot s of ``source`` among the sources of ``target``."""
        if target == source or not (0 <= target < self.num_tasks and 0 <= source < self.num_tasks):
            raise ValueError(f"no distillation pair (target={target}, source={source}) for {self.num_tasks} tasks")
        return source if source < target else source - 1

    def pair_weights(self, target: int, source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, message) convolution weights (C, C, 3, 3) of the pair target <- source."""
        s = self.source_slot(target, source)
        return self.mask_weight[target, s], self.message_weight[target, s]

    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        stacked = self._stack(features)
        n, t, c, h, w = stacked.shape
        pairs = t * (t - 1)
        # (N, T*(T-1)*C, H, W): the features of each pair's source, in (target, slot) order.
        gathered = stacked.index_select(1, self.sources).reshape(n, pairs * c, h, w)
        # Per pair: C mask-logit channels then C message channels.
        weight = torch.stack((self.mask_weight, self.message_weight), dim=2).reshape(pairs * 2 * c, c, 3, 3)
        logits_and_messages = nn.functional.conv2d(gathered, weight, padding=1, groups=pairs)
        both = logits_and_messages.view(n, t, t - 1, 2, c, h, w)
        out = attention_distill(stacked, both[:, :, :, 0], both[:, :, :, 1])
        return list(out.unbind(1)) if isinstance(features, (list, tuple)) else out

    def _stack(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(features, (list, tuple)):
            if len(features) != self.num_tasks:
                raise ValueError(
                    f"MultiModalDistillation: expected a list of {self.num_tasks} task features, got {len(features)}"
                )
            shapes = {tuple(f.shape) for f in features}
            if len(shapes) != 1 or features[0].dim() != 4:
                raise ValueError(
                    "MultiModalDistillation: features must be T tensors of one shape (N, C, H, W), "
                    f"got shapes {[tuple(f.shape) for f in features]}"
                )
            features = torch.stack(list(features), dim=1)
        if not isinstance(features, torch.Tensor) or features.dim() != 5:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"MultiModalDistillation: features must be (N, T, C, H, W) or a list of T (N, C, H, W), got {got}")
        if features.shape[1] != self.num_tasks or features.shape[2] != self.channels:
            raise ValueError(
                f"MultiModalDistillation: features must have T={self.num_tasks} tasks of C={self.channels} "
                f"channels, got {tuple(features.shape)}"
            )
        return features

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, channels={self.channels}"
