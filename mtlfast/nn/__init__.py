"""Layers built on mtlfast's fused ops."""

from .adapters import ResidualAdapter
from .batch_norm import BatchNorm2d, use_fast_batch_norm
from .distillation import MultiModalDistillation
from .max_pool import MaxPool2d
from .rebuilt_norm import rebuild_norms
from .skip_fusion import SkipScoreFusion
from .task_norm import TaskBatchNorm2d
from .task_se import TaskSE
from .winograd import WinogradConv2d, use_winograd

__all__ = [
    "BatchNorm2d",
    "MaxPool2d",
    "MultiModalDistillation",
    "ResidualAdapter",
    "SkipScoreFusion",
    "TaskBatchNorm2d",
    "TaskSE",
    "WinogradConv2d",
    "rebuild_norms",
    "use_fast_batch_norm",
    "use_winograd",
]
