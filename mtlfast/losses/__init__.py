"""Losses of the dense tasks (ASTMT / MTI-Net releases), averaged over labelled samples only.

Every task loss is ``fn(prediction, target, labeled=None) -> 0-dim tensor``: ``labeled`` (N,)
bool keeps only the rows labelled for the task (UberNet Eq. 4), so a batch with unlabelled rows
gives exactly the loss of its labelled rows; with no labelled row (or no valid pixel) the loss is
a zero whose graph still reaches the prediction, so it can be summed and back-propagated.
:func:`for_task` gives the callables :func:`mtlfast.engine.multi_branch_step` takes.
"""

from .binary import balanced_bce_loss, edge_loss, saliency_loss
from .depth import depth_gradient_loss, depth_loss
from .multi_task import NYUD_WEIGHTS, PASCAL_WEIGHTS, TASK_LOSSES, MultiTaskLoss, for_task
from .normals import normals_loss
from .segmentation import cross_entropy_loss

__all__ = [
    "NYUD_WEIGHTS",
    "PASCAL_WEIGHTS",
    "TASK_LOSSES",
    "MultiTaskLoss",
    "balanced_bce_loss",
    "cross_entropy_loss",
    "depth_gradient_loss",
    "depth_loss",
    "edge_loss",
    "for_task",
    "normals_loss",
    "saliency_loss",
]
