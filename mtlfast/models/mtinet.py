"""MTI-Net (Vandenhende et al., ECCV 2020): multi-scale task interaction network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backbones.residual import BasicBlock
from ..engine import current_strategy
from ..nn import MultiModalDistillation, TaskSE
from ._checks import check_images
from ._common import (
    JointDecoderModel,
    backbone_segments,
    deep_supervision_key,
    fuse_scales,
    recomputed,
    resize,
    split_size,
    task_outputs,
    trunk_of,
)
from .heads import resize_prediction

__all__ = ["FeaturePropagation", "InitialTaskPrediction", "MTINet", "MTINetDecoder"]

SOFTMAX_GROUPINGS = ("paper", "release")


class InitialTaskPrediction(nn.Module):
    """Per-task heads at one scale: two BasicBlocks to task features, a 1x1 conv to a prediction.

    Each task's input is the backbone feature at this scale, concatenated (from the second
    coarsest scale on) with that task's propagated features from the coarser scale, bilinearly
    upsampled to this scale's size.

    Args:
        cin: backbone channels at this scale (plus the coarser scale's channels when it receives
            propagated features). channels: task feature channels C. tasks, out_channels: as MTINet.

    Shapes: x (N, cin_backbone, H, W); propagated None or T tensors (N, C', H', W');
    returns (T task features (N, C, H, W), T predictions (N, out_channels[t], H, W)), the
    predictions an empty list when ``predict`` is False.
    """

    def __init__(
        self, cin: int, channels: int, tasks: Sequence[str], out_channels: Mapping[str, int]
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.refinement = nn.ModuleDict(
            {
                t: nn.Sequential(BasicBlock(cin, channels), BasicBlock(channels, channels))
                for t in self.tasks
            }
        )
        self.decoders = nn.ModuleDict(
            {t: nn.Conv2d(channels, out_channels[t], 1) for t in self.tasks}
        )

    def forward(
        self,
        x: torch.Tensor,
        propagated: Sequence[torch.Tensor] | None = None,
        predict: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features, predictions = [], []
        for i, t in enumerate(self.tasks):
            inp = (
                x if propagated is None else torch.cat((x, resize(propagated[i], x.shape[-2:])), 1)
            )
            f = self.refinement[t](inp)
            features.append(f)
            if predict:
                predictions.append(self.decoders[t](f))
        return features, predictions


class FeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module (Sec. 2.4, Fig. 3), from one scale to the next finer.

    Feature harmonisation: the T task features are concatenated (T*C channels) and passed through
    ``non_linear`` (BasicBlock to T*C/4, BasicBlock, 1x1 conv back to T*C); its output, split into T
    chunks of C, is softmaxed over the tasks and multiplies the concatenated features; a
    ``dimensionality_reduction`` BasicBlock maps the T*C attended channels to a shared C-channel
    representation. Refinement: each task gates the shared representation with its own
    squeeze-and-excitation block (reduction 16) and adds it to its features as a residual.

    The T SE blocks run as one :class:`mtlfast.nn.TaskSE` pass over the shared representation
    repeated T times along the batch, residual added in the same kernel.

    Deviation from the authors' release: the release views the (N, T*C, H, W) concatenation as
    (N, C, T, H, W) for the softmax, which groups T *consecutive channels* (mostly of one task)
    rather than the T tasks' chunks. We softmax over the tasks' chunks, as Sec. 2.4 describes
    (``softmax_grouping="paper"``); ``softmax_grouping="release"`` reproduces the release, for its
    trained weights (:func:`mtlfast.models.release_mtinet.load_release_checkpoint` sets it).

    Args:
        num_tasks: T. channels: C, per task.
        softmax_grouping: "paper" (softmax over the T tasks' chunks of C channels) or "release"
            (over T consecutive channels of the concatenation).

    Shapes: T tensors (N, C, H, W) in, T tensors (N, C, H, W) out.
    """

    def __init__(self, num_tasks: int, channels: int, softmax_grouping: str = "paper") -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.channels = channels
        self.softmax_grouping = softmax_grouping
        shared = num_tasks * channels
        self.non_linear = nn.Sequential(
            BasicBlock(shared, shared // 4),
            BasicBlock(shared // 4, shared // 4),
            nn.Conv2d(shared // 4, shared, 1),
        )
        self.dimensionality_reduction = BasicBlock(shared, channels)
        self.se = TaskSE(channels, num_tasks, reduction=16)

    @property
    def softmax_grouping(self) -> str:
        return self._softmax_grouping

    @softmax_grouping.setter
    def softmax_grouping(self, value: str) -> None:
        if value not in SOFTMAX_GROUPINGS:
            raise ValueError(
                f"FeaturePropagation: softmax_grouping must be one of {SOFTMAX_GROUPINGS}, got {value!r}"
            )
        self._softmax_grouping = value

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, channels={self.channels}, softmax_grouping={self.softmax_grouping!r}"

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        t, c = self.num_tasks, self.channels
        concat = torch.cat(list(features), 1)
        n, _, h, w = concat.shape
        # feature harmonisation: attention over tasks, per channel and pixel
        logits = self.non_linear(concat)
        paper = self.softmax_grouping == "paper"
        if logits.is_contiguous() or not logits.is_contiguous(memory_format=torch.channels_last):
            if paper:
                mask = logits.view(n, t, c, h, w).softmax(dim=1).view(n, t * c, h, w)
            else:
                mask = logits.view(n, c, t, h, w).softmax(dim=2).view(n, t * c, h, w)
        else:  # channels-last: the same softmax over the (N, H, W, T*C) storage, no NCHW copy
            groups, dim = ((t, c), 3) if paper else ((c, t), 4)
            nhwc = logits.permute(0, 2, 3, 1).view(n, h, w, *groups).softmax(dim=dim)
            mask = nhwc.view(n, h, w, t * c).permute(0, 3, 1, 2)
        shared = self.dimensionality_reduction(mask * concat)
        # refinement: task k's SE gate on the shared representation, plus task k's features;
        # cat keeps a channels-last input's layout (a reshape of the expansion would not)
        repeated = torch.cat([shared] * t, 0)
        task = torch.arange(t, device=shared.device).repeat_interleave(n)
        refined = self.se(repeated, task, residual=torch.cat(list(features), 0))
        return list(refined.unflatten(0, (t, n)).unbind(0))  # split(n) gives one chunk at N = 0


class MTINetDecoder(nn.Module):
    """Everything of MTI-Net after the backbone: a joint decoder returning every task's prediction.

    Forward, as Fig. 1 (right): for scales s = 3 (1/32) down to 0 (1/4), initial task predictions
    from the backbone feature of scale s and the propagated task features of scale s+1; feature
    propagation (FPM) from scale s to s-1; multi-modal distillation (Eq. 1) of the initial task
    features at every scale; feature aggregation per task (features of all scales upsampled to
    scale 0, concatenated, 1x1 conv + BN + ReLU + 1x1 conv) and bilinear upsampling to the image.

    Args:
        channels: backbone channels per scale, finest first (4 scales). stride: of the finest scale.
        tasks, out_channels, deep_supervision, softmax_grouping: as :class:`MTINet`.

    Attributes:
        tasks: the keys the forward returns (in training mode with deep supervision, the
            deep-supervision keys too), for :func:`mtlfast.engine.multi_branch_step`.

    Shapes: features: 4 tensors (N, channels[s], H_s, W_s), optionally followed by the size token
    of :class:`mtlfast.models._common.SizeCarry`; size: output (H, W), default the token's, else
    ``stride`` times scale 0's. Returns task -> (N, out_channels[t], H, W).
    """

    def __init__(
        self,
        channels: Sequence[int],
        tasks: Sequence[str],
        out_channels: Mapping[str, int],
        stride: int = 4,
        deep_supervision: bool = True,
        softmax_grouping: str = "paper",
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(
                f"MTINetDecoder: expected 4 scales of backbone channels, got {list(channels)}"
            )
        self.channels = list(channels)
        self.task_names = list(tasks)
        self.out_channels = dict(out_channels)
        self.stride = stride
        self.deep_supervision = deep_supervision
        c, t = self.channels, len(self.task_names)
        # scale s receives scale s+1's propagated features, except the coarsest
        self.initial = nn.ModuleList(
            InitialTaskPrediction(
                c[s] + (c[s + 1] if s < 3 else 0), c[s], self.task_names, self.out_channels
            )
            for s in range(4)
        )
        # propagation[s - 1] carries scale s to scale s - 1 (s = 1, 2, 3)
        self.propagation = nn.ModuleList(
            FeaturePropagation(t, c[s], softmax_grouping) for s in range(1, 4)
        )
        self.distillation = nn.ModuleList(MultiModalDistillation(t, c[s]) for s in range(4))
        total = sum(c)
        self.aggregation = nn.ModuleDict(
            {
                task: nn.Sequential(
                    nn.Conv2d(total, total, 1),
                    nn.BatchNorm2d(total),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(total, self.out_channels[task], 1),
                )
                for task in self.task_names
            }
        )

    @staticmethod
    def _aggregate(layers: nn.Module, finest, size, *pieces: torch.Tensor) -> torch.Tensor:
        """One task's aggregation: its features of every scale at the finest, concatenated,
        ``layers``, resized to the output (NCHW, see :func:`resize_prediction`). The first 1x1
        convolution runs on each scale before the resizing (:func:`fuse_scales`)."""
        return resize_prediction(fuse_scales(layers, pieces, finest), size)

    @property
    def tasks(self) -> list[str]:
        keys = list(self.task_names)
        if self.training and self.deep_supervision:
            keys += [deep_supervision_key(s, t) for s in range(4) for t in self.task_names]
        return keys

    def forward(
        self, features: Sequence[torch.Tensor], size: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        scales, size = split_size(features, size)
        if len(scales) != 4:
            raise ValueError(f"MTINetDecoder: expected 4 backbone features, got {len(scales)}")
        if size is None:
            size = tuple(self.stride * d for d in scales[0].shape[-2:])

        # initial task predictions, coarsest scale first, each fed by the propagated coarser scale
        supervise = self.training and self.deep_supervision  # the predictions only feed the losses
        task_features: list[Any] = [None] * 4
        initial: list[Any] = [None] * 4
        propagated = None
        for s in (3, 2, 1, 0):
            task_features[s], initial[s] = self.initial[s](scales[s], propagated, predict=supervise)
            if s > 0:
                propagated = self.propagation[s - 1](task_features[s])

        # multi-modal distillation at every scale
        distilled = [self.distillation[s](task_features[s]) for s in range(4)]

        # feature aggregation; under the memory engine's recompute strategy each task's layers are
        # recomputed in backward (about 51 MiB a task kept otherwise at 256x256 batch 4), so that
        # the decoder's memory does not grow with the tasks either
        out = {}
        finest = scales[0].shape[-2:]
        lean = self.training and torch.is_grad_enabled() and current_strategy() == "recompute"
        for i, task in enumerate(self.task_names):
            pieces = [distilled[s][i] for s in range(4)]
            layers = self.aggregation[task]
            if lean:
                out[task] = recomputed(self._aggregate, layers, layers, finest, size, *pieces)
            else:
                out[task] = self._aggregate(layers, finest, size, *pieces)
        if supervise:
            for s in range(4):
                for i, task in enumerate(self.task_names):
                    out[deep_supervision_key(s, task)] = resize_prediction(initial[s][i], size)
        return out


class MTINet(JointDecoderModel):
    """MTI-Net: a multi-scale backbone and :class:`MTINetDecoder`.

    Args:
        tasks: task names; default every task of ``dataset``.
        dataset: "pascal" (semseg 21, parts 7, saliency 1, normals 3, edge 1), "nyud"
            (semseg 40, depth 1, normals 3, edge 1) or "synthetic" (semseg 5, parts 7, saliency 1,
            normals 3, edge 1, depth 1): the default output channels.
        out_channels: task -> output channels, overriding the dataset's.
        backbone: a module returning 4 features finest first, with ``channels`` and ``strides``
            attributes (optionally ``segments()``, its forward as a chain of modules, which become
            the trunk's checkpoint boundaries); default :class:`mtlfast.backbones.HRNet`
            (HRNet-W18-small-v2, randomly initialised: see ``load_hrnet_pretrained``).
        deep_supervision: return the initial predictions in training mode.
        softmax_grouping: of the feature propagation modules' attention, "paper" (over the tasks)
            or "release" (the authors' code, see :class:`FeaturePropagation`).

    Forward: image (N, 3, H, W) -> dict task -> (N, out_channels[task], H, W), bilinearly
    upsampled. In training mode (and ``deep_supervision``) also the initial prediction of every
    task at every scale s (0 = 1/4, ..., 3 = 1/32), upsampled to (H, W), under
    ``"deep_supervision/scale_<s>/<task>"``; :meth:`expand` maps targets and loss functions to them
    (the paper weighs them like the final predictions).

    For :func:`mtlfast.engine.multi_branch_step`, ``engine_branches()`` is ``(trunk, heads)``:
    ``trunk`` the backbone as an nn.Sequential (its output carries a size token, see
    :class:`mtlfast.models._common.SizeCarry`), ``heads`` ``{"decoder": self.decoder}``, a joint
    decoder with a ``tasks`` attribute. :meth:`parameter_split` counts as task t's the decoder's
    layers under t's name (initial[s].refinement[t], initial[s].decoders[t], aggregation[t]) and
    1/T of the stacked per-task tensors (the propagation modules' task SE, the distillation
    convolutions, whose row k is target task k's); the rest (backbone, harmonisation) is shared.

    Deviations from the paper and the authors' release (models/mti_net.py):
    - features are upsampled to the finer scale's exact size rather than by a factor 2 (the
      release), so odd image sizes work; predictions are resized to the image with bilinear
      interpolation, align_corners=False (the release leaves it to torch's default, the same);
    - the FPM softmax runs over the tasks' chunks, as the paper says (see :class:`FeaturePropagation`;
      ``softmax_grouping="release"`` restores the release's, which its trained weights need:
      :func:`mtlfast.models.release_mtinet.load_release_checkpoint` sets it);
    - every task is predicted at every stage: the release's auxiliary tasks (predicted only in
      the front-end, e.g. edges and normals on NYUD) are the trainer's ``loss.auxiliary``,
      whose final outputs are computed here but feed no loss (config ``mtinet_nyud_aux``);
    - the SE hidden width is ``max(C // 16, 1)`` (:class:`mtlfast.nn.TaskSE`); equal for C >= 16.
    """

    # Two trunk segments in the trainer's recompute step, not the engine's round(sqrt(11)) = 3:
    # with HRNet-18 the step 2.52 s against 2.68 s (5 alternating rounds, each faster), peak 508
    # against 470 MiB (the release's 1003), PASCAL's five tasks at 256x256, batch 4, channels-last,
    # 2 threads, 2-core Xeon (benchmarks/segments_step.py). PAD-Net gained nothing (15.5 s
    # against 15.0 s): it keeps the engine's.
    engine_segments = 2

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        dataset: str = "pascal",
        out_channels: Mapping[str, int] | None = None,
        backbone: nn.Module | None = None,
        deep_supervision: bool = True,
        softmax_grouping: str = "paper",
    ) -> None:
        super().__init__(backbone)
        task_list, outputs = task_outputs(tasks, dataset, out_channels)
        channels, strides = list(self.backbone.channels), list(self.backbone.strides)
        if len(channels) != 4 or len(strides) != 4:
            raise ValueError(
                f"MTINet: the backbone must give 4 scales, got channels {channels}, strides {strides}"
            )
        self.decoder = MTINetDecoder(
            channels, task_list, outputs, strides[0], deep_supervision, softmax_grouping
        )

    @property
    def trunk(self) -> nn.Sequential:
        return trunk_of(backbone_segments(self.backbone))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(image, type(self).__name__, "image")
        return self.decoder(self.backbone(image), size=image.shape[-2:])
