"""Feature Pyramid Network (Lin et al.) over a ResNet: P2..P5 with 256 channels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Backbone
from .resnet import ResNet

__all__ = ["FPN", "TopDown"]


class FPN(Backbone):
    """Lateral 1x1 convolutions on C2..C5, a nearest-neighbour top-down pathway, 3x3 output convolutions.

    ``body`` is the ResNet; ``fpn.inner_blocks.k`` / ``fpn.layer_blocks.k`` are the lateral and
    output convolutions, torchvision's names. Upsampling goes to the finer map's exact size, so odd
    inputs work. No P6 (max-pool of P5): dense prediction does not use it.

    Args:
        body: the ResNet whose layer1..layer4 feed the pyramid.
        out_channels: 256 in the paper.

    Shapes: x (N, 3, H, W) -> [P2, P3, P4, P5], (N, out_channels, ceil(H / s), ceil(W / s)) with
    s in ``body.strides``.
    """

    def __init__(self, body: ResNet, out_channels: int = 256) -> None:
        super().__init__()
        if not isinstance(body, ResNet):
            raise TypeError(f"FPN: body must be a ResNet, got {type(body).__name__}")
        self.body = body
        self.fpn = TopDown(body.channels, out_channels)
        self.channels = [out_channels] * len(body.channels)
        self.strides = list(body.strides)
        self.feature_stages = body.feature_stages

    def stages(self) -> list[nn.Module]:
        return self.body.stages()

    def neck(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fpn(features)

    def neck_module(self) -> nn.Module:
        return self.fpn


class TopDown(nn.Module):
    """FPN's lateral and output convolutions and its top-down pathway.

    Shapes: features [(N, C_k, H_k, W_k)] finest first -> [(N, out_channels, H_k, W_k)].
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = self.inner_blocks[-1](features[-1])
        out = [self.layer_blocks[-1](inner)]
        for k in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[k](features[k])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            out.insert(0, self.layer_blocks[k](inner))
        return out
