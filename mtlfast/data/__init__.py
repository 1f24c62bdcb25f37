"""Datasets, joint transforms and batching for multi-task dense prediction."""

from . import transforms
from .collate import collate
from .synthetic import SyntheticScenes
from .tasks import IGNORE_INDEX, TASKS, ignore_target, label_boundaries

__all__ = [
    "SyntheticScenes",
    "collate",
    "transforms",
    "TASKS",
    "IGNORE_INDEX",
    "ignore_target",
    "label_boundaries",
]
