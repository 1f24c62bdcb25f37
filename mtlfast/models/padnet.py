"""PAD-Net (Xu et al., CVPR 2018) on a multi-scale backbone, as the MTI-Net paper compares with it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backbones.residual import Bottleneck
from ..engine import current_strategy
from ..nn import MultiModalDistillation
from ..ops._layout import memory_format_of
from ._checks import check_images
from ._common import (
    JointDecoderModel,
    backbone_segments,
    deep_supervision_key,
    fuse_scales,
    recomputed,
    split_size,
    task_outputs,
    trunk_of,
)
from .heads import resize_prediction

__all__ = ["PADNet", "PADNetDecoder", "ScaleFusion"]

INITIAL = "initial"


class ScaleFusion(nn.Module):
    """The backbone's scales fused at the finest: upsample, concatenate, 1x1 conv (with bias) + BN + ReLU.

    The 1x1 convolution runs on each scale before the upsampling
    (:func:`mtlfast.models._common.fuse_scales`: the same function, an eighth of the arithmetic).

    Shapes: features (N, channels[s], H_s, W_s), finest first -> (N, sum(channels), H_0, W_0).
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        total = sum(channels)
        self.channels = total
        self.last_layer = nn.Sequential(
            nn.Conv2d(total, total, 1), nn.BatchNorm2d(total), nn.ReLU(inplace=True)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # the decoder keeps the backbone's layout (train.memory_format): back to channels-last
        # if the finest scale is, at the cost of one copy
        first = features[0]
        x = fuse_scales(self.last_layer, features, first.shape[-2:])
        return x.contiguous(memory_format=memory_format_of(first))


def _bottlenecks(cin: int, width: int) -> nn.Sequential:
    return nn.Sequential(Bottleneck(cin, width // 4), Bottleneck(width, width // 4))


class PADNetDecoder(nn.Module):
    """PAD-Net after the fused features: initial predictions, distillation, final predictions.

    Per task, initial heads (two Bottlenecks to ``width`` channels and a 1x1 conv); multi-modal
    distillation (:class:`mtlfast.nn.MultiModalDistillation`, spatial attention, MTI-Net Eq. 1)
    over the T initial task features; per task, final heads (two Bottlenecks and a 1x1 conv);
    predictions upsampled bilinearly to the image.

    Args:
        cin: channels of the fused features. tasks, out_channels, deep_supervision: as PADNet.
        width: task feature channels (256 in the release). stride: of the fused features.

    Attributes:
        tasks: the keys the forward returns (with ``deep_supervision/initial/<task>`` in training).

    Shapes: features (N, cin, H', W') or (features, size token); returns task -> (N, K_t, H, W).
    """

    def __init__(
        self,
        cin: int,
        tasks: Sequence[str],
        out_channels: Mapping[str, int],
        width: int = 256,
        stride: int = 4,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if width < 4 or width % 4:
            raise ValueError(f"PADNetDecoder: width must be a positive multiple of 4, got {width}")
        self.task_names = list(tasks)
        self.out_channels = dict(out_channels)
        self.stride = stride
        self.deep_supervision = deep_supervision
        self.initial = nn.ModuleDict({t: _bottlenecks(cin, width) for t in self.task_names})
        self.initial_out = nn.ModuleDict(
            {t: nn.Conv2d(width, self.out_channels[t], 1) for t in self.task_names}
        )
        self.distillation = MultiModalDistillation(len(self.task_names), width)
        self.final = nn.ModuleDict(
            {
                t: nn.Sequential(
                    *_bottlenecks(width, width), nn.Conv2d(width, self.out_channels[t], 1)
                )
                for t in self.task_names
            }
        )

    @staticmethod
    def _head(layers: nn.Module, x: torch.Tensor, size=None) -> torch.Tensor:
        """``layers(x)``, resized to ``size`` when given (a prediction: NCHW, see
        :func:`mtlfast.models.heads.resize_prediction`)."""
        y = layers(x)
        return y if size is None else resize_prediction(y, size)

    @property
    def tasks(self) -> list[str]:
        keys = list(self.task_names)
        if self.training and self.deep_supervision:
            keys += [deep_supervision_key(INITIAL, t) for t in self.task_names]
        return keys

    def forward(self, features: Any, size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        parts, size = split_size(features, size)
        if len(parts) != 1:
            raise ValueError(
                f"PADNetDecoder: expected one fused feature map, got {len(parts)} tensors"
            )
        x = parts[0]
        if size is None:
            size = tuple(self.stride * d for d in x.shape[-2:])

        # Under the memory engine's recompute strategy each task's initial and final heads (two
        # Bottlenecks each, at 1/4 scale: about 112 MiB kept a head at 256x256 batch 4, 1.1 GiB of
        # the 1.56 GiB the model keeps for five tasks) are recomputed in backward, so that the
        # decoder's memory does not grow with the tasks, as the engine's and the distillation's.
        lean = self.training and torch.is_grad_enabled() and current_strategy() == "recompute"

        def head(layers: nn.Module, inputs: torch.Tensor, out_size=None) -> torch.Tensor:
            if lean:
                return recomputed(self._head, layers, layers, inputs, out_size)
            return self._head(layers, inputs, out_size)

        # initial task predictions
        task_features = [head(self.initial[t], x) for t in self.task_names]

        # multi-modal distillation
        distilled = self.distillation(task_features)

        # final task predictions
        out = {t: head(self.final[t], distilled[i], size) for i, t in enumerate(self.task_names)}
        if self.training and self.deep_supervision:
            for i, t in enumerate(self.task_names):
                out[deep_supervision_key(INITIAL, t)] = resize_prediction(
                    self.initial_out[t](task_features[i]), size
                )
        return out


class PADNet(JointDecoderModel):
    """PAD-Net on a multi-scale backbone: :class:`ScaleFusion` at 1/4 and :class:`PADNetDecoder`.

    Args: as :class:`mtlfast.models.MTINet`, plus ``width`` (task feature channels, 256).

    Forward: image (N, 3, H, W) -> dict task -> (N, out_channels[task], H, W); in training mode
    (and ``deep_supervision``) also the initial predictions under
    ``"deep_supervision/initial/<task>"``, upsampled to (H, W). :meth:`expand` maps targets and
    loss functions to them.

    ``trunk`` is the backbone followed by the scale fusion (the release counts the fusion as part
    of the backbone), so the branching point is the fused (N, sum(channels), H/4, W/4) map;
    ``heads`` is ``{"decoder": self.decoder}``. :meth:`parameter_split` counts as task t's the
    decoder's ``initial[t]``, ``initial_out[t]``, ``final[t]`` and 1/T of the distillation
    convolutions (row k is target task k's); the backbone and the fusion are shared.

    Deviations from the PAD-Net paper (Xu et al.) and MTI-Net's release (models/padnet.py): as in
    MTI-Net's comparison, the backbone is multi-scale (HRNet-18) with its scales fused at 1/4,
    instead of PAD-Net's single-scale encoder with deconvolutions; distillation is the spatial
    attention variant only; every task is final (front-end-only auxiliary tasks are the
    trainer's ``loss.auxiliary``: their final outputs feed no loss); upsampling
    uses exact sizes, so odd image sizes work.

    The release's trained weights load with
    :func:`mtlfast.models.release_mtinet.load_release_checkpoint` (its module names mapped one
    to one; the release's task width is 256, the default ``width``).
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        dataset: str = "pascal",
        out_channels: Mapping[str, int] | None = None,
        backbone: nn.Module | None = None,
        deep_supervision: bool = True,
        width: int = 256,
    ) -> None:
        super().__init__(backbone)
        task_list, outputs = task_outputs(tasks, dataset, out_channels)
        channels, strides = list(self.backbone.channels), list(self.backbone.strides)
        self.fuse = ScaleFusion(channels)
        self.decoder = PADNetDecoder(
            self.fuse.channels, task_list, outputs, width, strides[0], deep_supervision
        )

    @property
    def trunk(self) -> nn.Sequential:
        return trunk_of([*backbone_segments(self.backbone), self.fuse])

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(image, type(self).__name__, "image")
        return self.decoder(self.fuse(self.backbone(image)), size=image.shape[-2:])
