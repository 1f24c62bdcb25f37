"""The network, data and strategies of benchmarks/bench_engine.py, in plain PyTorch.

* :func:`resnet50_trunk`: ResNet-50 (bottleneck blocks [3, 4, 6, 3], 64..2048 channels, BN and
  ReLU) as an ``nn.Sequential`` of its 17 top-level blocks (the stem, then each bottleneck), so
  that the engine's ~sqrt(L) anchors fall between blocks; by default output stride 16 as
  DeepLab-v3 trains (the last stage dilated instead of strided);
* :class:`Head`: a task branch of three layers (conv3x3 2048->256, ReLU, conv3x3 256->256, ReLU,
  conv1x1 256->C), its prediction bilinearly upsampled to the image size, where UberNet computes
  its losses; no BN, whose batch statistics would depend on which samples a branch runs on;
* :data:`KINDS`: the six tasks of the synthetic scenes and their losses, cycled over tasks
  ``t0``, ``t1``, ... for any number of them; :func:`batch`: random images, targets, labels;
* :func:`checkpoint_step`: the baseline that is not an engine strategy, ``torch.utils.checkpoint``
  over the trunk (~sqrt(L) segments) with plain heads and one backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KINDS",
    "STAGES",
    "TRUNK_BLOCKS",
    "Bottleneck",
    "Head",
    "TaskKind",
    "batch",
    "checkpoint_step",
    "loss_fns",
    "make_heads",
    "one_task_per_sample",
    "resnet50_trunk",
    "task_kinds",
]

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks): ResNet-50
TRUNK_BLOCKS = 1 + sum(count for _, count in STAGES)  # the stem and the bottlenecks: 17
EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1, 3x3 (stride, dilation), 1x1, each with BN; + shortcut, ReLU."""

    def __init__(
        self,
        inplanes: int,
        width: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        out = width * EXPANSION
        first_dilation = dilation if first_dilation is None else first_dilation
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def resnet50_trunk(output_stride: int = 16) -> nn.Sequential:
    """ResNet-50 without its classifier, (N,3,H,W) -> (N,2048,H/os,W/os): the stem (conv7x7/2,
    BN, ReLU, maxpool/2) then the 16 bottlenecks, 17 elements. ``output_stride`` 32 is the
    classifier's; 16 and 8 dilate the last one and two stages instead of striding them
    (torchvision's ``replace_stride_with_dilation``: a dilated stage's first block keeps the
    previous dilation)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride: expected 8, 16 or 32, got {output_stride}")
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
    )
    blocks: list[nn.Module] = [stem]
    dilated = {32: 0, 16: 1, 8: 2}[output_stride]  # how many of the last stages are dilated
    inplanes, dilation = 64, 1
    for index, (width, count) in enumerate(STAGES):
        stride = 1 if index == 0 else 2
        previous = dilation
        if index >= len(STAGES) - dilated:
            dilation, stride = dilation * stride, 1
        for b in range(count):
            blocks.append(
                Bottleneck(
                    inplanes,
                    width,
                    stride if b == 0 else 1,
                    dilation,
                    previous if b == 0 else dilation,
                )
            )
            inplanes = width * EXPANSION
    return nn.Sequential(*blocks)


class Head(nn.Module):
    """A task branch: conv3x3 (in -> hidden), ReLU, conv3x3 (hidden -> hidden), ReLU,
    conv1x1 (hidden -> channels); (N, in, h, w) -> (N, channels, *size), upsampled bilinearly."""

    def __init__(
        self, in_channels: int, channels: int, size: tuple[int, int], hidden: int = 256
    ) -> None:
        super().__init__()
        self.size = size
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.layers(x), self.size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class TaskKind:
    """A task of the synthetic scenes: its prediction's channels, its loss, its target."""

    name: str
    channels: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    target: Callable[[int, tuple[int, int], torch.Generator], torch.Tensor]


def _classes(count: int):
    def target(n, size, generator):
        return torch.randint(0, count, (n, *size), generator=generator)

    return target


def _binary(n, size, generator):
    return torch.randint(0, 2, (n, 1, *size), generator=generator).float()


def _normals(n, size, generator):
    return F.normalize(torch.randn(n, 3, *size, generator=generator), dim=1)


def _depth(n, size, generator):
    return 10 * torch.rand(n, 1, *size, generator=generator)


def _cross_entropy(pred, target):
    return F.cross_entropy(pred, target, ignore_index=255)


KINDS = (
    TaskKind("semseg", 21, _cross_entropy, _classes(21)),
    TaskKind("parts", 7, _cross_entropy, _classes(7)),
    TaskKind("saliency", 1, F.binary_cross_entropy_with_logits, _binary),
    TaskKind("normals", 3, F.l1_loss, _normals),
    TaskKind("edge", 1, F.binary_cross_entropy_with_logits, _binary),
    TaskKind("depth", 1, F.l1_loss, _depth),
)


def task_kinds(tasks: int) -> dict[str, TaskKind]:
    """Tasks ``t0`` .. ``t<tasks-1>``, of the kinds of :data:`KINDS` in turn."""
    return {f"t{i}": KINDS[i % len(KINDS)] for i in range(tasks)}


def make_heads(tasks: int, size: tuple[int, int], in_channels: int = 2048) -> nn.ModuleDict:
    """One :class:`Head` per task of :func:`task_kinds`."""
    return nn.ModuleDict(
        {name: Head(in_channels, kind.channels, size) for name, kind in task_kinds(tasks).items()}
    )


def loss_fns(tasks: int) -> dict[str, Callable]:
    return {name: kind.loss for name, kind in task_kinds(tasks).items()}


def batch(tasks: int, n: int, size: tuple[int, int], seed: int = 0):
    """Random images (n, 3, *size) and every task's targets for them."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, *size, generator=generator)
    targets = {name: kind.target(n, size, generator) for name, kind in task_kinds(tasks).items()}
    return images, targets


def one_task_per_sample(tasks: int, n: int) -> dict[str, torch.Tensor]:
    """``labeled[task]`` (n,) bool: sample i labelled for task ``t<i mod tasks>`` only."""
    owner = torch.arange(n) % tasks
    return {f"t{t}": owner == t for t in range(tasks)}


def checkpoint_step(
    trunk: nn.Sequential,
    heads: Mapping[str, nn.Module],
    images: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    losses: Mapping[str, Callable],
    labeled: Mapping[str, torch.Tensor] | None = None,
    segments: int | None = None,
) -> torch.Tensor:
    """One training step's forward and backward with ``torch.utils.checkpoint`` on the trunk
    alone (``checkpoint_sequential``, ``segments`` default round(sqrt(L)), non-reentrant), every
    head on every sample, each task's loss on its labelled rows, one backward of their sum.
    Returns the total loss (detached)."""
    segments = segments or max(1, round(math.sqrt(len(trunk))))
    images = images.requires_grad_(False)
    features = torch.utils.checkpoint.checkpoint_sequential(
        trunk, segments, images, use_reentrant=False
    )
    total = features.new_zeros(())
    for name, head in heads.items():
        rows = None if labeled is None else labeled[name]
        if rows is not None and not bool(rows.any()):
            continue
        pred = head(features)
        target = targets[name]
        if rows is not None:
            pred, target = pred[rows], target[rows]
        total = total + losses[name](pred, target)
    total.backward()
    return total.detach()
