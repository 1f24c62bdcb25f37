"""Datasets, joint transforms and batching for multi-task dense prediction."""

from . import transforms
from ._io import DataFileError
from .collate import collate
from .nyud import NYUD
from .pascal_context import HUMAN_PART_GROUPS, PascalContext
from .synthetic import SyntheticScenes
from .tasks import IGNORE_INDEX, TASKS, ignore_target, label_boundaries

__all__ = [
    "HUMAN_PART_GROUPS",
    "IGNORE_INDEX",
    "NYUD",
    "TASKS",
    "DataFileError",
    "PascalContext",
    "SyntheticScenes",
    "collate",
    "ignore_target",
    "label_boundaries",
    "transforms",
]
