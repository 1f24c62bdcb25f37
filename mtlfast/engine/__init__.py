"""The memory engine: multi-task backprop whose peak memory does not grow with the number of tasks.

UberNet Sec. 4: a checkpointed trunk (about sqrt(L) anchors), then one task branch at a time,
forward and backward, each on the samples labelled for it, then one recomputing trunk backward.
See :func:`multi_branch_step`.
"""

from ._context import current_strategy
from ._segments import split_segments
from .step import StepResult, multi_branch_step

__all__ = ["StepResult", "current_strategy", "multi_branch_step", "split_segments"]
