"""Backbones in plain PyTorch: ResNet / SE-ResNet, MobileNetV2 / SE-MobileNetV2, VGG-16 (DeepLab),
FPN, HRNet-W18-small-v2.

Every backbone maps (N, 3, H, W) to its features, finest first, and exposes ``channels`` and
``strides``; module names follow torchvision (HRNet: the official HRNet-ImageNet release), so
:func:`load_pretrained` loads local checkpoints by name.
"""

from .base import Backbone
from .fpn import FPN
from .hrnet import HRNet, hrnet_state_dict_from_release, hrnet_w18_small_v2, load_hrnet_pretrained
from .mobilenet import MobileNetV2
from .pretrained import CONVERTERS, LoadResult, load_pretrained, register_converter, to_torchvision
from .registry import create_backbone, list_backbones, register_backbone
from .resnet import ResNet
from .vgg import VGG16

__all__ = [
    "CONVERTERS",
    "FPN",
    "VGG16",
    "Backbone",
    "HRNet",
    "LoadResult",
    "MobileNetV2",
    "ResNet",
    "create_backbone",
    "hrnet_state_dict_from_release",
    "hrnet_w18_small_v2",
    "list_backbones",
    "load_hrnet_pretrained",
    "load_pretrained",
    "register_backbone",
    "register_converter",
    "to_torchvision",
]
