"""Backbones in plain PyTorch: ResNet / SE-ResNet, MobileNetV2 / SE-MobileNetV2, VGG-16 (DeepLab), FPN.

Every backbone maps (N, 3, H, W) to a list of features, finest first, and exposes ``channels``
and ``strides``; module names follow torchvision, so :func:`load_pretrained` loads local
torchvision checkpoints by name.
"""

from .base import Backbone
from .fpn import FPN
from .mobilenet import MobileNetV2
from .pretrained import CONVERTERS, LoadResult, load_pretrained, register_converter, to_torchvision
from .registry import create_backbone, list_backbones, register_backbone
from .resnet import ResNet
from .vgg import VGG16

__all__ = [
    "Backbone", "CONVERTERS", "FPN", "LoadResult", "MobileNetV2", "ResNet", "VGG16", "create_backbone",
    "list_backbones", "load_pretrained", "register_backbone", "register_converter", "to_torchvision",
]
