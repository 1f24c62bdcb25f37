"""The meter of each task, and the form of prediction it reads: the twin of ``losses.for_task``."""

from __future__ import annotations

import torch

from .depth import DepthMeter
from .edges import MAX_DIST_NYUD, MAX_DIST_PASCAL, EdgeMeter
from .normals import NormalsMeter
from .saliency import SaliencyMeter
from .segmentation import SegmentationMeter

__all__ = ["NUM_CLASSES", "for_task", "prediction_for_meter"]

#: dataset -> task -> classes of the segmentation tasks (synthetic: SyntheticScenes' defaults)
NUM_CLASSES = {
    "pascal": {"semseg": 21, "parts": 7},
    "nyud": {"semseg": 40},
    "synthetic": {"semseg": 5, "parts": 7},
}

#: tasks whose meters read probabilities: the network's logits go through a sigmoid
_SIGMOID = ("saliency", "edge")


def for_task(task: str, dataset: str = "pascal", num_classes: int | None = None, **options):
    """A fresh meter for ``task`` as the ASTMT / MTI-Net evaluations measure it on ``dataset``.

    semseg / parts: :class:`SegmentationMeter` (``num_classes`` or the dataset's); saliency:
    :class:`SaliencyMeter`; normals: :class:`NormalsMeter`; depth: :class:`DepthMeter`; edge:
    :class:`EdgeMeter` with the dataset's matching distance (NYUD 0.011, else 0.0075).
    ``options`` go to the meter's constructor (e.g. ``thresholds=`` for edges).
    """
    if task in ("semseg", "parts"):
        if num_classes is None:
            classes = NUM_CLASSES.get(dataset, {})
            if task not in classes:
                raise ValueError(
                    f"for_task: no default class count for {task!r} on dataset {dataset!r}; "
                    "pass num_classes"
                )
            num_classes = classes[task]
        return SegmentationMeter(num_classes, **options)
    if task == "saliency":
        return SaliencyMeter(**options)
    if task == "normals":
        return NormalsMeter(**options)
    if task == "depth":
        return DepthMeter(**options)
    if task == "edge":
        options.setdefault("max_dist", MAX_DIST_NYUD if dataset == "nyud" else MAX_DIST_PASCAL)
        return EdgeMeter(**options)
    raise ValueError(
        f"for_task: unknown task {task!r}; expected semseg, parts, saliency, normals, edge or depth"
    )


def prediction_for_meter(task: str, prediction: torch.Tensor) -> torch.Tensor:
    """The network's raw output of ``task`` in the form its meter reads, as float32: class scores
    stay scores (the meter takes the argmax), saliency and edge logits become probabilities,
    normals and depth stay as they are.

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """
    prediction = prediction.detach().float()
    return torch.sigmoid(prediction) if task in _SIGMOID else prediction
