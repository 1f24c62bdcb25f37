"""HRNet (Wang et al., TPAMI 2020), plain PyTorch, with the module names of the official release."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ops.resize import resize_bilinear
from .pretrained import LoadResult, load_pretrained, register_converter
from .residual import BasicBlock, Bottleneck

__all__ = [
    "HRNet",
    "HighResolutionModule",
    "Transition",
    "hrnet_state_dict_from_release",
    "hrnet_w18_small_v2",
    "load_hrnet_pretrained",
]

BN_MOMENTUM = 0.01  # HRNet's release, kept by the MTI-Net authors
RELEASE_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))  # on the batch norm's fresh output, as the release
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """One exchange unit: a residual branch per resolution, then every branch fuses all others.

    Fusion into branch i sums branch i, the coarser branches j > i (1x1 conv + BN, bilinear
    upsampling to branch i's size) and the finer branches j < i (i - j stride-2 3x3 conv + BN, ReLU
    between them), then applies ReLU.

    Args:
        channels: C_b of each branch. blocks: BasicBlocks per branch. momentum: batch norm momentum.

    Shapes: a tuple of B tensors (N, C_b, H_b, W_b) in, the same shapes out.
    """

    def __init__(self, channels: Sequence[int], blocks: int, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.channels = list(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c, c, momentum=momentum) for _ in range(blocks)))
            for c in channels
        )
        fuse = []
        for i, ci in enumerate(channels):
            row: list[nn.Module | None] = []
            for j, cj in enumerate(channels):
                if j > i:
                    row.append(
                        nn.Sequential(
                            nn.Conv2d(cj, ci, 1, bias=False), nn.BatchNorm2d(ci, momentum=momentum)
                        )
                    )
                elif j == i:
                    row.append(None)
                else:
                    steps = [_conv_bn(cj, cj, 3, 2, relu=True) for _ in range(i - j - 1)]
                    steps.append(_conv_bn(cj, ci, 3, 2, relu=False))
                    row.append(nn.Sequential(*steps))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU()

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, layer in enumerate(row):
                if j < i:
                    y = y + layer(xs[j])
                elif j > i:
                    # size, not scale_factor: odd sizes round up at every stride-2 step
                    y = y + resize_bilinear(layer(xs[j]), xs[i].shape[-2:])
            # in place on a fresh sum (as the release), never on a branch output saved for backward
            out.append(torch.relu_(y) if y is not xs[i] else self.relu(y))
        return tuple(out)


class Transition(nn.ModuleList):
    """Adds branches between stages: entry i maps branch i (or, for a new branch, the last one).

    A None entry passes its branch through; a new branch is reached through stride-2 3x3 convs.

    Shapes: a tensor or tuple of B tensors in, a tuple of len(self) tensors out.
    """

    def __init__(
        self, cin: Sequence[int], cout: Sequence[int], momentum: float = BN_MOMENTUM
    ) -> None:
        entries: list[nn.Module | None] = []
        for i, c in enumerate(cout):
            if i < len(cin):
                entries.append(_conv_bn(cin[i], c, 3, 1, relu=True) if cin[i] != c else None)
            else:
                steps = [_conv_bn(cin[-1], cin[-1], 3, 2, relu=True) for _ in range(i - len(cin))]
                steps.append(_conv_bn(cin[-1], c, 3, 2, relu=True))
                entries.append(nn.Sequential(*steps))
        super().__init__(entries)
        self.num_inputs = len(cin)

    def forward(self, xs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if isinstance(xs, torch.Tensor):
            xs = (xs,)
        out = []
        for i, layer in enumerate(self):
            x = xs[i] if i < self.num_inputs else xs[-1]
            out.append(x if layer is None else layer(x))
        return tuple(out)


class _Stem(nn.Module):
    """The stem as one segment; holds references to HRNet's own conv1/bn1/conv2/bn2."""

    def __init__(self, net: HRNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.relu = (
            net.conv1,
            net.bn1,
            net.conv2,
            net.bn2,
            net.relu,
        )

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class HRNet(nn.Module):
    """HRNet backbone without classification head: four parallel resolutions, repeatedly fused.

    Stem (two stride-2 3x3 convs, 64 channels), ``layer1`` (Bottlenecks, 64 -> 256 channels), then
    stages 2-4 of ``HighResolutionModule``s with 2, 3 and 4 branches, each stage preceded by a
    ``Transition`` that adds the next coarser branch. Batch norm momentum 0.01 everywhere.

    The defaults are HRNet-W18-small-v2 (``hrnet_w18_small_v2.pth`` of HRNet-Image-Classification,
    the "HRNet-18" of MTI-Net): 2 Bottlenecks in layer1; stages of 1, 3 and 2 modules; 2 BasicBlocks
    per branch; widths 18, 36, 72, 144. Module names equal the release's, so its weights load
    after dropping the classification head (:func:`hrnet_state_dict_from_release`).

    Args:
        channels: the four branch widths. modules: modules in stages 2, 3, 4.
        blocks: BasicBlocks per branch in every module. stem_blocks: Bottlenecks in layer1.

    Attributes:
        channels: [18, 36, 72, 144] by default. strides: [4, 8, 16, 32].

    Shapes: image (N, 3, H, W) -> tuple of 4 features (N, channels[s], H_s, W_s), finest first,
    ``H_s = ceil(H / strides[s])`` (each stride-2 conv rounds up).

    Initialisation as the MTI-Net release: convolutions N(0, 0.001^2), batch norms weight 1, bias 0.

    Deviation from the ImageNet release (kept from the MTI-Net release, models/seg_hrnet.py):
    coarser branches are upsampled bilinearly to the finer branch's exact size, not with
    ``nn.Upsample(scale_factor=2**(j-i), mode="nearest")``, which would miss odd sizes. The
    upsampling has no parameters, so the checkpoints' names and shapes are unaffected.
    """

    def __init__(
        self,
        channels: Sequence[int] = (18, 36, 72, 144),
        modules: Sequence[int] = (1, 3, 2),
        blocks: int = 2,
        stem_blocks: int = 2,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(modules) != 3:
            raise ValueError(
                f"HRNet: expected 4 channels and 3 module counts, got {channels} and {modules}"
            )
        self.channels = list(channels)
        self.strides = [4, 8, 16, 32]
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(
            *(
                Bottleneck(64 if i == 0 else 256, 64, momentum=BN_MOMENTUM)
                for i in range(stem_blocks)
            )
        )
        prev = [256]
        for stage, count in zip((2, 3, 4), modules):
            widths = self.channels[:stage]
            setattr(self, f"transition{stage - 1}", Transition(prev, widths))
            exchange = [HighResolutionModule(widths, blocks) for _ in range(count)]
            setattr(self, f"stage{stage}", nn.Sequential(*exchange))
            prev = widths
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def segments(self) -> list[nn.Module]:
        """The forward pass as a chain of modules (stem, layer1, transitions, every exchange module).

        Each module's output is the next one's single argument; the last gives the 4 features.
        :func:`mtlfast.engine.multi_branch_step` checkpoints a trunk at these boundaries.
        """
        chain: list[nn.Module] = [_Stem(self), self.layer1]
        for stage in (2, 3, 4):
            chain.append(getattr(self, f"transition{stage - 1}"))
            chain.extend(getattr(self, f"stage{stage}"))
        return chain

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for module in self.segments():
            x = module(x)
        return x


def hrnet_w18_small_v2() -> HRNet:
    """HRNet-W18-small-v2, the "HRNet-18" backbone of MTI-Net (about 3.9M parameters)."""
    return HRNet()


def hrnet_state_dict_from_release(state_dict: dict[str, Any]) -> OrderedDict[str, Any]:
    """Maps an HRNet-Image-Classification checkpoint to :class:`HRNet`'s names.

    The names agree already; this drops the classification head (``incre_modules``,
    ``downsamp_modules``, ``final_layer``, ``classifier``) and a DataParallel ``module.`` prefix,
    and unwraps a ``{"state_dict": ...}`` checkpoint.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(RELEASE_HEAD_PREFIXES):
            continue
        out[key] = value
    return out


# load_pretrained maps an HRNet's checkpoint with the release converter (the names agree already).
register_converter(HRNet, lambda state, model: dict(hrnet_state_dict_from_release(state)))


def load_hrnet_pretrained(model: nn.Module, path: str) -> LoadResult:
    """Loads release ImageNet weights (e.g. ``hrnet_w18_small_model_v2.pth``) into an HRNet.

    ``model`` is an :class:`HRNet` or a model whose ``backbone`` is one. It is
    :func:`mtlfast.backbones.load_pretrained` (``torch.load(weights_only=True)``, never a
    download; non-strict, what did not match is reported in the result) with a type check, and
    shape mismatches raise a RuntimeError rather than being reported.
    """
    net = model if isinstance(model, HRNet) else getattr(model, "backbone", None)
    if not isinstance(net, HRNet):
        raise TypeError(
            "load_hrnet_pretrained: expected an HRNet or a model with an HRNet backbone, "
            f"got {type(model).__name__}"
        )
    result = load_pretrained(net, path)
    if result.mismatched:
        raise RuntimeError(
            f"load_hrnet_pretrained: size mismatch for {result.mismatched} (a different HRNet width?)"
        )
    return result
