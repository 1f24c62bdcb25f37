"""Baselines: a shared encoder with one head per task, and the single-task network (for Delta_m)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._build import aspp_rates, make_backbone
from .base import MultiTaskModel
from .heads import DeepLabV3PlusDecoder, SimpleHead, resize
from .tasks import resolve_tasks
from .trunk import split_scales

__all__ = ["DeepLabTaskHead", "MTLBaseline", "SimpleTaskHead", "SingleTask"]


class DeepLabTaskHead(nn.Module):
    """One task's DeepLab-v3+ decoder and 1x1 classifier on the trunk output, upsampled to the image.

    Shapes: rep (image (N, 3, H, W), f_1, ..., f_K) -> (N, out_channels, H, W); uses f_1 (low
    level) and f_K (ASPP input).
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int,
        channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.decoder = DeepLabV3PlusDecoder(
            low_channels, high_channels, channels, rates=rates, separable=separable
        )
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, rep: Sequence[torch.Tensor]) -> torch.Tensor:
        image, (features,) = split_scales(rep, 1)
        return resize(self.classifier(self.decoder(features[0], features[-1])), image.shape[-2:])


class SimpleTaskHead(nn.Module):
    """conv3x3-BN-ReLU and a 1x1 classifier on f_K, upsampled to the image.

    Shapes: rep (image (N, 3, H, W), f_1, ..., f_K) -> (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 256) -> None:
        super().__init__()
        self.head = SimpleHead(in_channels, out_channels, channels)

    def forward(self, rep: Sequence[torch.Tensor]) -> torch.Tensor:
        image, (features,) = split_scales(rep, 1)
        return resize(self.head(features[-1]), image.shape[-2:])


class MTLBaseline(MultiTaskModel):
    """Standard multi-task learning: one shared encoder, one full head per task, nothing else shared.

    This is ASTMT's multi-task baseline (its Table 2/3 rows without modulation): every task has
    its own DeepLab-v3+ decoder (``head="deeplab"``: ASPP with rates 6/12/18 at output stride 16,
    12/24/36 at 8, image pooling, 48-channel low-level skip, two 3x3 convolutions) and 1x1
    classifier, or a light ``head="simple"`` (conv3x3-BN-ReLU, 1x1 on the coarsest features).
    Predictions are bilinearly upsampled to the input. No deep supervision: the training output
    is the eval output. Deviations: ASTMT's baseline uses its SE-ResNet encoder, here any backbone
    (default plain ResNet-50); the DeepLab heads have no ASPP dropout (as in the ASTMT release).

    Args:
        tasks: task names; out_channels from ``dataset`` ("pascal", "nyud" or "synthetic") unless overridden.
        backbone: a registry name (default "resnet50") or a backbone module (see
            :func:`mtlfast.models._build.make_backbone`).
        head: "deeplab" or "simple"; head_channels: 256 (DeepLab's width).
        output_stride: passed to the backbone; None: 16 for ResNets and MobileNets (as DeepLab-v3+
            trains), the backbone's own otherwise (VGG-16: 8).
        **backbone_options: passed to the backbone (e.g. width, se).

    Shapes: x (N, 3, H, W) -> {task: (N, C_t, H, W)}.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: str | nn.Module = "resnet50",
        *,
        dataset: str = "pascal",
        out_channels: Mapping[str, int] | None = None,
        head: str = "deeplab",
        head_channels: int = 256,
        output_stride: int | None = None,
        **backbone_options,
    ) -> None:
        super().__init__()
        self.out_channels = resolve_tasks(tasks, dataset, out_channels)
        self.tasks = list(self.out_channels)
        if isinstance(backbone, str):
            if output_stride is not None:
                backbone_options["output_stride"] = output_stride
            elif "resnet" in backbone or "mobilenet" in backbone:
                backbone_options["output_stride"] = 16  # DeepLab-v3+'s training stride
        self.backbone = make_backbone(backbone, **backbone_options)
        if head not in ("deeplab", "simple"):
            raise ValueError(f"head must be 'deeplab' or 'simple', got {head!r}")
        c = self.backbone.channels
        separable = "mobilenet" in type(self.backbone).__name__.lower()
        rates = aspp_rates(self.backbone.strides[-1])
        self.heads = nn.ModuleDict(
            {
                t: DeepLabTaskHead(c[0], c[-1], n, head_channels, rates, separable)
                if head == "deeplab"
                else SimpleTaskHead(c[-1], n, head_channels)
                for t, n in self.out_channels.items()
            }
        )


class SingleTask(MTLBaseline):
    """One task, one network: the single-task reference of ASTMT's Delta_m (Eq. 4). Options as MTLBaseline.

    Shapes: x (N, 3, H, W) -> {task: (N, C_t, H, W)}.
    """

    def __init__(
        self, tasks: Sequence[str] | str, backbone: str | nn.Module = "resnet50", **options
    ) -> None:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if len(tasks) != 1:
            raise ValueError(f"single_task takes exactly one task, got {tasks!r}")
        super().__init__(tasks, backbone, **options)
