"""Single-task networks of each model family: the references of Delta_m (MTI-Net Eq. 2, ASTMT Eq. 4).

Delta_m compares a multi-task model with single-task networks *of the same family*, each trained
on one task: ``create("single_task", task, like=family)`` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._build import make_backbone
from ._checks import check_images
from ._common import backbone_segments, fuse_scales, resize, split_size, trunk_of
from .astmt import ASTMT
from .base import MultiTaskModel
from .baseline import SingleTask
from .tasks import resolve_tasks
from .ubernet import UberNet

__all__ = ["HRNetSingleTask", "HighResolutionHead", "single_task"]

FAMILIES = (None, "mtl_baseline", "ubernet", "astmt", "mtinet", "padnet")


def _one_task(tasks: Sequence[str] | str) -> str:
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if len(tasks) != 1:
        raise ValueError(f"single_task takes exactly one task, got {tasks!r}")
    return tasks[0]


class HighResolutionHead(nn.Module):
    """One task's head on HRNet's 4 scales: upsample to the finest, concatenate, 1x1 conv + BN + ReLU +
    1x1 conv, upsample to the image (MTI-Net's release, models/seg_hrnet.py ``HighResolutionHead``).
    The first 1x1 convolution runs on each scale before the upsampling
    (:func:`mtlfast.models._common.fuse_scales`: the same function, an eighth of the arithmetic).

    Args:
        channels: the backbone's channels per scale, finest first. out_channels: C_t.
        stride: of the finest scale, for the output size when no size is known.

    Shapes: features: 4 tensors (N, channels[s], H_s, W_s), optionally followed by the size token
    of :class:`mtlfast.models._common.SizeCarry`; size: output (H, W), default the token's, else
    ``stride`` times the finest scale's. Returns (N, out_channels, H, W).
    """

    def __init__(self, channels: Sequence[int], out_channels: int, stride: int = 4) -> None:
        super().__init__()
        total = sum(channels)
        self.stride = stride
        self.last_layer = nn.Sequential(
            nn.Conv2d(total, total, 1),
            nn.BatchNorm2d(total),
            nn.ReLU(inplace=True),
            nn.Conv2d(total, out_channels, 1),
        )

    def forward(
        self, features: Sequence[torch.Tensor], size: Sequence[int] | None = None
    ) -> torch.Tensor:
        scales, size = split_size(features, size)
        finest = scales[0].shape[-2:]
        if size is None:
            size = tuple(self.stride * d for d in finest)
        return resize(fuse_scales(self.last_layer, scales, finest), size)


class HRNetSingleTask(MultiTaskModel):
    """The single-task network of MTI-Net and PAD-Net: HRNet and one :class:`HighResolutionHead`.

    MTI-Net (Sec. 4.1) measures Delta_m against single-task networks with the same backbone; its
    release builds them as ``SingleTaskModel(backbone, HighResolutionHead, task)`` (models/models.py,
    models/seg_hrnet.py): the backbone's 4 scales upsampled to 1/4, concatenated, 1x1 conv + BN +
    ReLU + 1x1 conv, upsampled bilinearly to the image. This is that network; no deep supervision.
    As in :class:`MTINet`, upsampling goes to exact sizes, so odd image sizes work.

    Args:
        tasks: one task name (a str or a one-element list).
        backbone: a registry name (default "hrnet18", HRNet-W18-small-v2) or a module returning 4
            features finest first with ``channels`` and ``strides`` (``segments()``, if it has them,
            become the trunk's checkpoint boundaries).
        dataset, out_channels: the output channels, as for the other models.

    ``trunk`` is the backbone (carrying a size token, as MTINet's) and ``heads`` ``{task: head}``.

    Shapes: x (N, 3, H, W) -> {task: (N, C_t, H, W)}.
    """

    def __init__(
        self,
        tasks: Sequence[str] | str,
        backbone: str | nn.Module = "hrnet18",
        *,
        dataset: str = "pascal",
        out_channels: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.out_channels = resolve_tasks([_one_task(tasks)], dataset, out_channels)
        self.tasks = list(self.out_channels)
        self.backbone = make_backbone(backbone)
        channels, strides = list(self.backbone.channels), list(self.backbone.strides)
        if len(channels) != 4 or len(strides) != 4:
            raise ValueError(
                f"HRNetSingleTask: the backbone must give 4 scales, got channels {channels}"
            )
        self.heads = nn.ModuleDict(
            {t: HighResolutionHead(channels, c, strides[0]) for t, c in self.out_channels.items()}
        )

    @property
    def trunk(self) -> nn.Sequential:
        return trunk_of(backbone_segments(self.backbone))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x, type(self).__name__)
        features = self.backbone(x)
        return {t: head(features, size=x.shape[-2:]) for t, head in self.heads.items()}


def single_task(
    tasks: Sequence[str] | str,
    backbone: str | nn.Module | None = None,
    *,
    like: str | None = None,
    **options: Any,
) -> MultiTaskModel:
    """The single-task network of model family ``like`` for one task (``create("single_task", ...)``).

    - None or "mtl_baseline": :class:`SingleTask`, :class:`MTLBaseline` with its one head (default
      ResNet-50 and a DeepLab-v3+ head), the single-task counterpart of ``mtl_baseline``.
    - "astmt": ``ASTMT([task], ...)`` (default SE-ResNet-26): ASTMT Fig. 3, "single-task network
      architecture", DeepLab-v3+ over SE-ResNet with SE in every encoder and decoder block; with
      T = 1 the task SE and task batch norm are plain SE and batch norm, nothing to modulate.
    - "ubernet": ``UberNet([task], ...)`` (default VGG-16, the same skip layers and image
      pyramid): UberNet Sec. 5 compares with single-task networks of the same architecture.
    - "mtinet", "padnet": :class:`HRNetSingleTask`, HRNet-18 and the release's per-task head:
      MTI-Net Sec. 4.1 measures Delta_m against "a fully-converged model that uses the same
      backbone network only for that task", and compares PAD-Net with the same ones.

    ``backbone`` (None: the family's default) and ``options`` (dataset, out_channels, width, ...)
    go to the constructor, as for the multi-task model of the family. Returns a
    :class:`MultiTaskModel` with ``tasks == [task]``.
    """
    task = _one_task(tasks)
    if like not in FAMILIES:
        raise ValueError(f"single_task: like must be one of {list(FAMILIES)}, got {like!r}")
    if backbone is not None:
        options["backbone"] = backbone
    if like in (None, "mtl_baseline"):
        return SingleTask([task], **options)
    if like == "astmt":
        return ASTMT([task], **options)
    if like == "ubernet":
        return UberNet([task], **options)
    return HRNetSingleTask([task], **options)
