"""Layers built on mtlfast's fused ops."""

from .distillation import MultiModalDistillation

__all__ = ["MultiModalDistillation"]
