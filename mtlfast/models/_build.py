"""Helpers shared by the model constructors."""

from __future__ import annotations

from torch import nn

from ..backbones import create_backbone

__all__ = ["aspp_rates", "make_backbone"]


def make_backbone(backbone: str | nn.Module, **options) -> nn.Module:
    """A backbone from its registry name and options, or the given instance (options must be empty).

    An instance is any module mapping (N, 3, H, W) to a list of features, finest first, with
    ``channels`` and ``strides`` lists; :class:`Backbone` subclasses also run stage by stage.
    """
    if isinstance(backbone, nn.Module):
        if options:
            raise ValueError(f"backbone options {sorted(options)} given with a backbone instance")
        if not all(
            isinstance(getattr(backbone, a, None), (list, tuple)) for a in ("channels", "strides")
        ):
            raise TypeError(
                f"backbone {type(backbone).__name__} must have `channels` and `strides` lists"
            )
        return backbone
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
    return create_backbone(backbone, **options)


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """DeepLab v3's (6, 12, 18) at output stride 16, doubled at 8 (same field of view in pixels)."""
    return tuple(r * 16 // output_stride for r in (6, 12, 18))
