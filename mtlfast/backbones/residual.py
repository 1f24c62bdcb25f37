"""Decoder and backbone building blocks: residual blocks (He et al.) with the names HRNet's release uses."""

from __future__ import annotations

from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "conv3x3", "projection"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a batch norm follows)."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def projection(cin: int, cout: int, stride: int = 1, momentum: float = 0.1) -> nn.Sequential:
    """The shortcut of a residual block whose shape changes: 1x1 convolution (no bias) and batch norm."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, momentum=momentum)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is ``downsample`` (conv1x1 + BN, made automatically when ``cin != planes`` or
    ``stride != 1``) or the identity.

    Args:
        cin: input channels. planes: output channels. stride: of the first convolution.
        momentum: of every batch norm (HRNet uses 0.01, torch's default is 0.1).

    Shapes: (N, cin, H, W) -> (N, planes, ceil(H/stride), ceil(W/stride)).
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)  # on fresh outputs only: BN's and the residual sum
        self.downsample = (
            projection(cin, planes, stride, momentum) if (cin != planes or stride != 1) else None
        )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with BN, and a shortcut (He et al., ResNet-50 style).

    Args:
        cin: input channels. planes: the inner width; the output has ``4 * planes`` channels.
        stride: of the 3x3 convolution. momentum: of every batch norm.

    Shapes: (N, cin, H, W) -> (N, 4 * planes, ceil(H/stride), ceil(W/stride)).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, momentum: float = 0.1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)  # on fresh outputs only: BN's and the residual sum
        self.downsample = (
            projection(cin, cout, stride, momentum) if (cin != cout or stride != 1) else None
        )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)
