"""Streaming evaluation of the dense tasks (ASTMT / MTI-Net protocols) and Delta_m.

Every meter has ``update(pred, target)`` (tensors or arrays, batches of (N, ...)),
``compute() -> dict`` and ``reset()``; statistics are pooled over the whole dataset.
"""

from .delta_m import DEFAULT_METRIC, HIGHER_IS_BETTER, LOWER_IS_BETTER, delta_m
from .depth import DepthMeter
from .edges import MAX_DIST_NYUD, MAX_DIST_PASCAL, EdgeMeter, edge_counts, edge_scores, match_edges
from .normals import NormalsMeter
from .saliency import SALIENCY_THRESHOLDS, SaliencyMeter
from .segmentation import SegmentationMeter
from .tasks import NUM_CLASSES, for_task, prediction_for_meter

__all__ = [
    "DEFAULT_METRIC",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "MAX_DIST_NYUD",
    "MAX_DIST_PASCAL",
    "NUM_CLASSES",
    "SALIENCY_THRESHOLDS",
    "DepthMeter",
    "EdgeMeter",
    "NormalsMeter",
    "SaliencyMeter",
    "SegmentationMeter",
    "delta_m",
    "edge_counts",
    "edge_scores",
    "for_task",
    "match_edges",
    "prediction_for_meter",
]
