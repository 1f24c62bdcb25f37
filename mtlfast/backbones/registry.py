"""Backbones by name: ``create_backbone("se_resnet50", output_stride=16)``, one line per entry."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .base import Backbone
from .fpn import FPN
from .hrnet import hrnet_w18_small_v2
from .mobilenet import MobileNetV2
from .resnet import ResNet
from .vgg import VGG16

__all__ = ["create_backbone", "list_backbones", "register_backbone"]

_REGISTRY: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str, factory: Callable[..., Backbone]) -> None:
    """Adds ``factory(**options) -> Backbone`` under ``name``; re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backbone: name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def list_backbones() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **options) -> Backbone:
    """The backbone registered as ``name``, built with ``options`` (e.g. output_stride, width)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _REGISTRY[name](**options)


def _fpn(depth: int, fpn_channels: int = 256, **options) -> FPN:
    """FPN over ResNet-``depth``; ``fpn_channels`` (256) is FPN's width, other options go to the ResNet."""
    return FPN(ResNet(depth, **options), fpn_channels)


for _d in (18, 26, 50, 101):
    register_backbone(f"resnet{_d}", partial(ResNet, _d))
    register_backbone(f"se_resnet{_d}", partial(ResNet, _d, se=True))
    register_backbone(f"fpn_resnet{_d}", partial(_fpn, _d))
register_backbone("mobilenet_v2", MobileNetV2)
register_backbone("se_mobilenet_v2", partial(MobileNetV2, se=True))
register_backbone("vgg16", VGG16)
register_backbone("hrnet18", hrnet_w18_small_v2)
register_backbone("hrnet_w18_small_v2", hrnet_w18_small_v2)
