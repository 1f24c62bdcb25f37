"""Layers built on mtlfast's fused ops."""

from .distillation import MultiModalDistillation
from .task_norm import TaskBatchNorm2d
from .task_se import TaskSE

__all__ = ["MultiModalDistillation", "TaskBatchNorm2d", "TaskSE"]
