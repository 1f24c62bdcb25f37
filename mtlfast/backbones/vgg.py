"""VGG-16 with atrous conv5 and convolutionalised fc6/fc7 (DeepLab v2 LargeFOV), UberNet's trunk."""

from __future__ import annotations

from torch import nn

from ..nn.max_pool import MaxPool2d
from ._blocks import AtrousConv2d
from .base import Backbone

__all__ = ["VGG16"]

CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(Backbone):
    """VGG-16 (Simonyan and Zisserman) made dense as in DeepLab-LargeFOV: output stride 8.

    ``features`` keeps torchvision's indices (convolutions at 0, 2, 5, ..., 28; pools at 4, 9, 16,
    23, 30), so ``features.0.weight`` etc. load by name. As in DeepLab: pools are 3x3 with padding
    1 (stride 2 for pool1-3; stride 1 for pool4 and pool5), conv5_x have dilation 2, ``fc6`` is a
    3x3 convolution with dilation 12 and 1024 channels and ``fc7`` a 1x1 convolution with 1024
    channels: the subsampled fc layers of DeepLab v2's VGG-16 (LargeFOV), not torchvision's
    4096-wide ones, whose weights therefore do not load (reported as mismatched). DeepLab's dropout
    after fc6 and fc7 is left out: UberNet normalises its skip layers instead. fc6 skips the taps
    that read padding only where its dilation is large against the map
    (:func:`mtlfast.ops.atrous_conv2d`: the 0.5 scale of a 256x256 image, 16x16 at fc6). conv5_x
    are plain 'same' ``nn.Conv2d``: :func:`mtlfast.nn.use_winograd` (the trainer's default) runs
    them by Winograd over their 2 x 2 phases where the maps are large enough (32x32 and, measured,
    24x24 at 256x256 input).

    The features are UberNet's skip layers: conv1_2, conv2_2, conv3_3, conv4_3, conv5_3, fc7
    (after their ReLU), with channels [64, 128, 256, 512, 512, 1024] x width and strides
    [1, 2, 4, 8, 8, 8].

    Args:
        width: multiplies every width; 1.0 is VGG-16, smaller values only make tests fast.

    Shapes: x (N, 3, H, W) -> 6 tensors (N, channels[k], ceil(H / strides[k]), ceil(W / strides[k])).
    """

    classifier_prefixes = ("classifier.",)

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"VGG16: width must be > 0, got {width}")
        layers: list[nn.Module] = []
        cin, pools = 3, 0
        for v in CFG:
            if v == "M":
                pools += 1
                layers.append(MaxPool2d(3, stride=2 if pools <= 3 else 1, padding=1))
                continue
            cout = max(int(v * width), 1)
            dilation = 2 if pools == 4 else 1
            layers += [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        fc = max(int(1024 * width), 1)
        self.fc6 = AtrousConv2d(cin, fc, 3, dilation=12)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        c = [max(int(v * width), 1) for v in (64, 128, 256, 512, 512)]
        self.channels = [*c, fc]
        self.strides = [1, 2, 4, 8, 8, 8]
        self.feature_stages = (0, 1, 2, 3, 4, 5)

    def stages(self) -> list[nn.Module]:
        f = self.features
        return [
            f[0:4],
            f[4:9],
            f[9:16],
            f[16:23],
            f[23:30],
            nn.Sequential(f[30], self.fc6, nn.ReLU(), self.fc7, nn.ReLU()),
        ]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
