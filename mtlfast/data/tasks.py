"""Task names, ignore conventions and label helpers shared by every dataset."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "TASKS", "ignore_target", "label_boundaries"]

TASKS = ("semseg", "parts", "saliency", "normals", "edge", "depth")
IGNORE_INDEX = 255


def ignore_target(task: str, height: int, width: int) -> torch.Tensor:
    """An all-invalid target for ``task``: (H,W) int64 of 255 for semseg/parts, (1,H,W) float of
    255 for saliency/edge, (3,H,W) zeros for normals, (1,H,W) zeros for depth."""
    if task in ("semseg", "parts"):
        return torch.full((height, width), IGNORE_INDEX, dtype=torch.int64)
    if task in ("saliency", "edge"):
        return torch.full((1, height, width), float(IGNORE_INDEX), dtype=torch.float32)
    if task == "normals":
        return torch.zeros(3, height, width, dtype=torch.float32)
    if task == "depth":
        return torch.zeros(1, height, width, dtype=torch.float32)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def label_boundaries(label: np.ndarray) -> np.ndarray:
    """One-pixel-thick boundaries of a label map: (H,W) any dtype -> (H,W) bool.

    A pixel is on a boundary when its right or lower neighbour has another label, so each
    boundary between two regions is marked once, on the upper/left side, and stays one pixel
    thick without a thinning pass.
    """
    label = np.asarray(label)
    edge = np.zeros(label.shape, dtype=bool)
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    return edge
