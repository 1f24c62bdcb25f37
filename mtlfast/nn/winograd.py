"""3x3 convolutions by Winograd's F(4x4, 3x3) in a model: :class:`WinogradConv2d` and
:func:`use_winograd`, which switches a model's eligible ``nn.Conv2d`` layers (and its
distillation units and residual adapters) to it in place."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.winograd_conv import MIN_CHANNELS, winograd_conv3x3
from .adapters import ResidualAdapter
from .distillation import MultiModalDistillation

__all__ = ["WinogradConv2d", "use_winograd"]


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with a 3x3 kernel, stride 1, padding equal to its dilation ('same': 1
    undilated, d for dilation d; the dilation the same along both axes), no groups, computed by
    :func:`mtlfast.ops.winograd_conv3x3` (``F.conv2d`` wherever that does not pay: see there; a
    dilated one over its phases).

    The same parameters and state dict as ``nn.Conv2d``; the outputs differ from it by the
    transforms' rounding (about 1e-5 of the largest output in fp32).

    Shapes: input (N, C_in, H, W); output (N, C_out, H, W).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not _eligible(self, 1):
            raise ValueError(
                "WinogradConv2d: needs kernel_size=3, stride=1, padding=dilation (or 'same') with "
                "the same dilation along both axes, groups=1 and "
                f"padding_mode='zeros', got {self.extra_repr()}"
            )

    def forward(self, input: Tensor) -> Tensor:
        return winograd_conv3x3(input, self.weight, self.bias, dilation=self.dilation[0])


def _eligible(conv: nn.Conv2d, min_channels: int) -> bool:
    d = conv.dilation[0]
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation == (d, d)
        and conv.padding in ((d, d), "same")
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not conv.transposed
        and min(conv.in_channels, conv.out_channels) >= min_channels
    )


def use_winograd(model: nn.Module, enabled: bool = True) -> int:
    """Switch ``model``'s 3x3 stride-1 'same' convolutions (dilated ones included) of at least
    128 input and output channels to :class:`WinogradConv2d`, and its
    :class:`MultiModalDistillation` and :class:`ResidualAdapter` layers to Winograd (their
    ``winograd`` flag), in place (``enabled=False`` switches them back). Parameters, state dict
    and hooks are kept.

    Only layers whose type is exactly ``nn.Conv2d`` are switched: a subclass's forward is its own.
    Returns the number of layers and units switched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_winograd: model must be an nn.Module, got {type(model).__name__}")
    switched = 0
    for module in model.modules():
        if isinstance(module, (MultiModalDistillation, ResidualAdapter)):
            switched += module.winograd != enabled
            module.winograd = enabled
        elif enabled and type(module) is nn.Conv2d and _eligible(module, MIN_CHANNELS):
            module.__class__ = WinogradConv2d
            switched += 1
        elif not enabled and type(module) is WinogradConv2d:
            module.__class__ = nn.Conv2d
            switched += 1
    return switched
