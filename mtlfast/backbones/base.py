"""The interface every backbone implements: ordered stages, multi-scale features, channels, strides."""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import call

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """A feature extractor run as a chain of stages, some of whose outputs are its features.

    Subclasses build their layers under torchvision's module names (so that
    :func:`mtlfast.backbones.load_pretrained` maps keys by name) and implement :meth:`stages`.

    Attributes:
        channels: C_k of each returned feature, finest first.
        strides: the output stride of each returned feature (input size / feature size, rounded up).
        feature_stages: indices into :meth:`stages` whose outputs are the features.
        classifier_prefixes: key prefixes of the pretrained classifier this backbone drops.

    Shapes: x (N, 3, H, W); returns a list of K tensors (N, channels[k], ceil(H / strides[k]), ...).
    """

    channels: list[int]
    strides: list[int]
    feature_stages: tuple[int, ...]
    classifier_prefixes: tuple[str, ...] = ()

    def stages(self) -> list[nn.Module]:
        """The stages in order, each mapping one tensor to the next (built on demand, not registered)."""
        raise NotImplementedError

    def neck(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Maps the stage features to the returned ones (identity; FPN overrides it)."""
        return features

    def neck_module(self) -> nn.Module | None:
        """The module holding the neck's parameters (None when the neck has none)."""
        return None

    def forward(
        self, x: torch.Tensor, task: int | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: x must have shape (N, 3, H, W), got {got}")
        features = []
        for i, stage in enumerate(self.stages()):
            x = call(stage, x, task)
            if i in self.feature_stages:
                features.append(x)
        return self.neck(features)
