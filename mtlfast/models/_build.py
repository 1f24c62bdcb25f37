"""Helpers shared by the model constructors."""

from __future__ import annotations

from ..backbones import Backbone, create_backbone

__all__ = ["aspp_rates", "make_backbone"]


def make_backbone(backbone: str | Backbone, **options) -> Backbone:
    """A backbone from its registry name and options, or the given instance (options must be empty)."""
    if isinstance(backbone, Backbone):
        if options:
            raise ValueError(f"backbone options {sorted(options)} given with a backbone instance")
        return backbone
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a name or a Backbone, got {type(backbone).__name__}")
    return create_backbone(backbone, **options)


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """DeepLab v3's (6, 12, 18) at output stride 16, doubled at 8 (same field of view in pixels)."""
    return tuple(r * 16 // output_stride for r in (6, 12, 18))
