"""UberNet (Kokkinos, CVPR 2017, Sec. 2): skip-layer linear task heads over an image pyramid of tied trunks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..nn import SkipScoreFusion
from ..ops import skip_fusion
from ._build import make_backbone
from .base import MultiTaskModel
from .tasks import resolve_tasks
from .trunk import split_scales

__all__ = ["UberNet", "UberNetTaskHead", "scale_key"]


def scale_key(task: str, scale: float) -> str:
    """The deep-supervision key of ``task`` at pyramid scale ``scale``: ``"semseg/scale_0.5"``."""
    return f"{task}/scale_{scale:g}"


class UberNetTaskHead(nn.Module):
    """One task's branch: skip-layer scores per scale (Eq. 1-2), then a learned fusion across scales.

    At each pyramid scale the task's :class:`mtlfast.nn.SkipScoreFusion` (weights tied across
    scales, like the trunk) normalises the skip features (all but the last), projects each to
    the task's scores and sums them, resized to the input size, with learned per-layer weights.
    The S per-scale scores are then fused by ``out = bias + sum_s weight[s] * score_s``
    (``weight`` (S, C) starting at 1/S, the average, ``bias`` (C,) at zero) with
    :func:`mtlfast.ops.skip_fusion`: the paper's "concatenation of the scores followed by a linear
    operation", restricted to one weight per scale and channel (no mixing across channels).

    It returns a dict (a "joint" head for :func:`mtlfast.engine.multi_branch_step`, whose keys
    ``tasks`` lists): ``task`` the fused prediction and, in training mode with S > 1,
    ``scale_key(task, s)`` each scale's prediction, for UberNet's losses "at the outputs of the
    individual scales and the final responses".

    Shapes: rep (image (N, 3, H, W), f[0][0..K-1], ..., f[S-1][K-1]) -> {key: (N, C, H, W)}.
    """

    def __init__(
        self, task: str, in_channels: Sequence[int], out_channels: int, scales: Sequence[float]
    ) -> None:
        super().__init__()
        self.task, self.scales = task, tuple(scales)
        self.fusion = SkipScoreFusion(in_channels, out_channels)
        self.scale_weight = nn.Parameter(
            torch.full((len(self.scales), out_channels), 1.0 / len(self.scales))
        )
        self.scale_bias = nn.Parameter(torch.zeros(out_channels))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The keys this head returns in its current mode (read by multi_branch_step)."""
        if self.training and len(self.scales) > 1:
            return (self.task, *(scale_key(self.task, s) for s in self.scales))
        return (self.task,)

    def forward(self, rep: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        image, per_scale = split_scales(rep, len(self.scales))
        size = tuple(image.shape[-2:])
        scores = [self.fusion(features, size) for features in per_scale]
        fused = skip_fusion(scores, self.scale_weight, self.scale_bias, size)
        if not (self.training and len(self.scales) > 1):
            return {self.task: fused}
        return {
            self.task: fused,
            **{scale_key(self.task, s): p for s, p in zip(self.scales, scores)},
        }


class UberNet(MultiTaskModel):
    """UberNet's dense-labelling architecture (Sec. 2, Fig. 2) for the tasks given.

    Trunk: VGG-16 made dense as in DeepLab (atrous conv5, fc6 dilation 12 / 1024 channels, output
    stride 8; :class:`mtlfast.backbones.VGG16`), whose skip layers are conv1_2, conv2_2, conv3_3,
    conv4_3, conv5_3 and fc7; or a ResNet (output stride 8 by default, "atrous convolution to
    obtain an output stride of 8"), whose skip layers are the outputs of its four stages. An image
    pyramid (``scales``) of trunks with tied weights; per task, :class:`UberNetTaskHead`.

    ``trunk`` runs the whole pyramid: its output is ``(image, f[0][0..K-1], ..., f[S-1][0..K-1])``
    (scale-major, see :mod:`mtlfast.models.trunk`); ``heads[task]`` maps it to the task's
    prediction, so ``multi_branch_step(model.trunk, model.heads, ...)`` trains UberNet with the
    recompute engine. In training mode the output dict also has ``"<task>/scale_<s>"``, the
    prediction of each scale at input resolution, on which UberNet puts losses too.

    Deviations (UberNet had no public code): ``scales`` defaults to (1, 0.75, 0.5): the paper
    builds its pyramid "by successive down-sampling" without stating the factors, and these are
    DeepLab's multi-scale inputs [15, 49], on which it builds. Each task has its own skip-layer
    batch norms (inside its SkipScoreFusion) where Fig. 2 draws them shared: a per-task affine
    after a shared normalisation spans the same linear functions (the task's projection absorbs
    it), batch statistics are the same in training, and in eval the norms fold into the
    projections; keeping them per task makes every task an independent branch for the engine.
    Running statistics move once per scale per step. Under the engine with partial labels a
    head's batch norms see only the samples labelled for its task, since a branch runs on those
    alone (the engine's lazy evaluation, UberNet Sec. 3-4). Object detection and the paper's
    task-specific deviations (Sec. 2, e.g. extra layers for some tasks) are left out.

    Args:
        tasks: task names; out_channels from ``dataset`` unless overridden.
        backbone: "vgg16" (the paper's), another registry name (ResNets get output stride 8),
            or a backbone module with ``channels`` and ``strides``.
        scales: the pyramid's scale factors, the first the full image.
        **backbone_options: passed to the backbone (width, output_stride for a ResNet, ...).

    Shapes: x (N, 3, H, W) -> {task: (N, C_t, H, W)} (plus per-scale keys in training).
    """

    # Two trunk segments in the trainer's recompute step, not the engine's round(sqrt(8)) = 3:
    # the default VGG-16 pyramid's step 8.78 s against 10.57 s and peak 1148 against 1342 MiB
    # (PASCAL's five tasks, 256x256, batch 4, 2 threads, 4 alternating rounds, each faster; 2-core
    # Xeon; on a 2-core AVX2 EPYC 0.83-1.04x, 1140 against 1342 MiB). benchmarks/segments_step.py
    engine_segments = 2

    def __init__(
        self,
        tasks: Sequence[str],
        backbone: str | nn.Module = "vgg16",
        *,
        dataset: str = "pascal",
        out_channels: Mapping[str, int] | None = None,
        scales: Sequence[float] = (1.0, 0.75, 0.5),
        **backbone_options,
    ) -> None:
        super().__init__()
        self.out_channels = resolve_tasks(tasks, dataset, out_channels)
        self.tasks = list(self.out_channels)
        scales = tuple(float(s) for s in scales)
        if not scales or any(not s > 0 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct positive numbers, got {scales}")
        self.scales = scales
        if isinstance(backbone, str) and "resnet" in backbone:
            backbone_options.setdefault("output_stride", 8)
        self.backbone = make_backbone(backbone, **backbone_options)
        self.heads = nn.ModuleDict(
            {
                t: UberNetTaskHead(t, self.backbone.channels, c, scales)
                for t, c in self.out_channels.items()
            }
        )
