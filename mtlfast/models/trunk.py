"""A backbone as a chain of modules over an image pyramid: the ``trunk`` of multi_branch_step.

The chain's state is a flat tuple of tensors (the engine passes tuples whole between modules):

    (image, x_1, ..., x_S, collected features...)

``PyramidInput`` makes the S scaled images, each ``PyramidStage`` runs one backbone stage on every
scale (shared weights) and collects its outputs when the stage is a feature stage, and
``PyramidOutput`` applies the backbone's neck per scale and orders the result scale-major:

    (image, f[0][0], ..., f[0][K-1], f[1][0], ..., f[S-1][K-1])

The image (full resolution) stays in the output so that heads know the size to predict at.
A backbone that is not an :class:`mtlfast.backbones.Backbone` (any module mapping an image to
a list of features, with ``channels`` and ``strides``, e.g. a multi-branch HRNet) runs whole,
as one ``WholeBackbone`` module, with the same output.
The modules hold the backbone's own layers: the chain is a view, never registered as a
submodule, so parameters and state-dict keys exist once, under ``backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..backbones import Backbone

__all__ = [
    "PyramidInput",
    "PyramidOutput",
    "PyramidStage",
    "WholeBackbone",
    "build_trunk",
    "split_scales",
]


class PyramidInput(nn.Module):
    """(N, 3, H, W) -> (image, image at scales[0], ..., at scales[S-1]); scale s: size round(s H) x round(s W)."""

    def __init__(self, scales: Sequence[float]) -> None:
        super().__init__()
        self.scales = tuple(scales)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [x]
        for s in self.scales:
            if s == 1.0:
                out.append(x)
            else:
                size = (max(1, round(x.shape[-2] * s)), max(1, round(x.shape[-1] * s)))
                out.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return tuple(out)


class PyramidStage(nn.Module):
    """One backbone stage on each of the S current tensors; appends them to the state if a feature."""

    def __init__(self, stage: nn.Module, num_scales: int, is_feature: bool) -> None:
        super().__init__()
        self.stage, self.num_scales, self.is_feature = stage, num_scales, is_feature

    def forward(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        s = self.num_scales
        new = tuple(self.stage(x) for x in state[1 : 1 + s])
        return (state[0], *new, *state[1 + s :], *(new if self.is_feature else ()))


class PyramidOutput(nn.Module):
    """Drops the current tensors, applies the neck per scale, orders features scale-major."""

    def __init__(self, neck: nn.Module | None, num_scales: int) -> None:
        super().__init__()
        self.neck, self.num_scales = neck, num_scales

    def forward(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        s = self.num_scales
        collected = state[1 + s :]
        out = [state[0]]
        for i in range(s):
            features = list(collected[i::s])
            out += features if self.neck is None else self.neck(features)
        return tuple(out)


class WholeBackbone(nn.Module):
    """(image, x_1, ..., x_S) -> (image, f[0][0..K-1], ..., f[S-1][0..K-1]): the backbone once per scale."""

    def __init__(self, backbone: nn.Module, num_scales: int) -> None:
        super().__init__()
        self.backbone, self.num_scales = backbone, num_scales

    def forward(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = [state[0]]
        for x in state[1 : 1 + self.num_scales]:
            out += list(self.backbone(x))
        return tuple(out)


def build_trunk(backbone: nn.Module, scales: Sequence[float] = (1.0,)) -> nn.Sequential:
    """The chain of modules (see the module docstring): ``len(stages) + 2`` modules for a
    :class:`Backbone`, two for any other backbone module."""
    scales = tuple(scales)
    mods: list[nn.Module] = [PyramidInput(scales)]
    if not isinstance(backbone, Backbone):
        return nn.Sequential(*mods, WholeBackbone(backbone, len(scales)))
    for i, stage in enumerate(backbone.stages()):
        mods.append(PyramidStage(stage, len(scales), i in backbone.feature_stages))
    mods.append(PyramidOutput(backbone.neck_module(), len(scales)))
    return nn.Sequential(*mods)


def split_scales(
    rep: Sequence[torch.Tensor], num_scales: int
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """(image, per-scale features) from a trunk output: image (N, 3, H, W), features[s][k]."""
    k = (len(rep) - 1) // num_scales
    return rep[0], [list(rep[1 + s * k : 1 + (s + 1) * k]) for s in range(num_scales)]
