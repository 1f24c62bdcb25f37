"""Evaluation: one meter per task over a loader, precise-BN, and the constant predictor."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.tasks import IGNORE_INDEX
from ..metrics import delta_m, for_task, prediction_for_meter

__all__ = ["ConstantPredictor", "evaluate", "load_baselines", "recalibrate_batch_norm"]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A meter's result as JSON-able floats (and lists of floats)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)):
            out[k] = [float(x) for x in v]
        else:
            out[k] = float(v)
    return out


def load_baselines(
    baselines: str | os.PathLike | Mapping | None,
) -> dict[str, dict[str, float]] | None:
    """Single-task results for delta_m: a dict task -> {metric: value}, or a JSON file holding one
    (a ``results.json`` of a run, whose ``final`` entry is used, works too)."""
    if baselines is None or isinstance(baselines, Mapping):
        return None if baselines is None else {t: dict(m) for t, m in baselines.items()}
    try:
        with open(baselines) as f:
            data = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"baselines: cannot read {baselines} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"baselines: {baselines} is not valid JSON ({e})") from None
    if isinstance(data, dict) and "final" in data and isinstance(data["final"], dict):
        data = data["final"].get("tasks", data["final"])
    if isinstance(data, dict) and "tasks" in data and isinstance(data["tasks"], dict):
        data = data["tasks"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"baselines: {baselines} must map task -> {{metric: value}}")
    return data


def _forward(model: nn.Module, images: torch.Tensor) -> Mapping[str, torch.Tensor]:
    out = model(images)
    if not isinstance(out, Mapping):
        raise TypeError(
            f"evaluate: the model must return a dict task -> prediction, got {type(out).__name__}"
        )
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    tasks: Sequence[str],
    dataset: str = "pascal",
    *,
    num_classes: Mapping[str, int] | None = None,
    baselines: str | os.PathLike | Mapping | None = None,
    edge_thresholds: int = 99,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress=None,
    reduce_over_ranks: bool = False,
) -> dict[str, Any]:
    """Every task's metrics over ``loader`` in eval mode (the model's mode is restored).

    Each task is measured on the samples labelled for it (``batch["labeled"][task]``), with
    ``mtlfast.metrics.for_task(task, dataset)``; saliency and edge logits pass through a sigmoid
    first. ``num_classes`` (task -> classes; default the model's ``out_channels``) sizes the
    segmentation meters. ``baselines`` (single-task results, a dict or JSON file) adds delta_m.
    ``reduce_over_ranks``: every rank of the ``torch.distributed`` world evaluated its shard of
    the data; their meters are pooled (every rank must call it).

    Returns plain JSON-able data: ``{"tasks": {task: {metric: float, ...}}, "images": int,
    "delta_m": float or None}``; a task with no labelled sample has no entry in ``tasks``.

    Shapes: batches as :func:`mtlfast.data.collate` makes them; the model maps (N, 3, H, W) to a
    dict task -> (N, C_t, H, W).
    """
    tasks = list(tasks)
    classes = dict(getattr(model, "out_channels", {}) or {})
    classes.update(num_classes or {})
    meters = {}
    for t in tasks:
        opts = {"thresholds": edge_thresholds} if t == "edge" else {}
        n = classes.get(t) if t in ("semseg", "parts") else None
        meters[t] = for_task(t, dataset, num_classes=n, **opts)
    seen = dict.fromkeys(tasks, 0)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    images_seen = 0
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            images = batch["image"].to(device)
            cast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with cast:
                out = _forward(model, images)
            images_seen += images.shape[0]
            labeled = batch.get("labeled", {})
            for t in tasks:
                if t not in out:
                    raise KeyError(
                        f"evaluate: the model returned no prediction for task {t!r} (got {sorted(out)})"
                    )
                mask = labeled.get(t)
                pred, target = out[t], batch[t]
                if mask is not None:
                    if not bool(mask.any()):
                        continue
                    if not bool(mask.all()):
                        rows = mask.nonzero().flatten()
                        pred, target = pred[rows.to(pred.device)], target[rows]
                meters[t].update(prediction_for_meter(t, pred).cpu(), target.cpu())
                seen[t] += int(pred.shape[0])
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    if reduce_over_ranks:
        from .distributed import reduce_meters

        images_seen = reduce_meters(meters, seen, images_seen)
    results = {t: _scalars(meters[t].compute()) for t in tasks if seen[t] > 0}
    base = load_baselines(baselines)
    dm = None
    if base is not None and results:
        dm = (
            delta_m(results, {t: base[t] for t in results if t in base})
            if all(t in base for t in results)
            else None
        )
    return {"tasks": results, "images": images_seen, "delta_m": dm}


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if hasattr(m, "running_mean")
        and hasattr(m, "momentum")
        and hasattr(m, "reset_running_stats")
        and getattr(m, "track_running_stats", True)
        and m.running_mean is not None
    ]


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    num_batches: int,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Precise-BN: re-estimates every batch norm's running statistics as the plain average over
    ``num_batches`` training batches (forward passes in train mode, no gradients).

    Why: running statistics are an exponential average with a small momentum (HRNet's is 0.01),
    so after a short run they still remember the first, random-weight activations and eval-mode
    predictions are far worse than train-mode ones. Parameters, the mode and each layer's
    momentum are restored; returns the number of batches used (0 when the model has no batch norm).
    """
    layers = _norm_layers(model)
    if not layers or num_batches <= 0:
        return 0
    device = _device_of(model)
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            cast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with cast:
                model(batch["image"].to(device))
            used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


class ConstantPredictor(nn.Module):
    """An input-independent prediction of each task, fitted on training targets: the most
    frequent class (semseg, parts), the mean unit normal, the mean depth; saliency and edge call
    every pixel positive (for IoU and F-measures the best a constant can do: the prior's
    probability is below most thresholds and finds nothing). What a network must beat to have
    learnt anything from the image.

    Shapes: (N, 3, H, W) -> {task: (N, C_t, H, W)}.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.tasks = list(values)
        for t, v in values.items():
            self.register_buffer(f"value_{t}", v.detach().float().clone())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = images.shape
        return {
            t: getattr(self, f"value_{t}")[None, :, None, None].expand(n, -1, h, w)
            for t in self.tasks
        }

    @classmethod
    def fit(
        cls,
        batches: Iterable[Mapping[str, Any]],
        tasks: Sequence[str],
        num_classes: Mapping[str, int],
        max_batches: int = 20,
    ) -> ConstantPredictor:
        """Statistics of up to ``max_batches`` batches' labelled targets."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = dict.fromkeys(tasks, 0.0)
        for b, batch in enumerate(batches):
            if b >= max_batches:
                break
            for t in tasks:
                target = batch[t]
                mask = batch.get("labeled", {}).get(t)
                if mask is not None:
                    target = target[mask]
                if t in ("semseg", "parts"):
                    valid = target[target != IGNORE_INDEX]
                    s = torch.bincount(valid.flatten(), minlength=num_classes[t]).double()[
                        : num_classes[t]
                    ]
                    n = float(valid.numel())
                elif t in ("saliency", "edge"):
                    valid = target[target != IGNORE_INDEX]
                    s, n = valid.double().sum().reshape(1), float(valid.numel())
                elif t == "normals":
                    valid = target.movedim(1, -1).reshape(-1, 3)
                    valid = valid[valid.norm(dim=1) > 0]
                    s, n = valid.double().sum(0), float(len(valid))
                elif t == "depth":
                    valid = target[target > 0]
                    s, n = valid.double().sum().reshape(1), float(valid.numel())
                else:
                    raise ValueError(f"ConstantPredictor: unknown task {t!r}")
                sums[t] = sums[t] + s if t in sums else s
                counts[t] += n
        values = {}
        for t in tasks:
            if counts[t] == 0:
                raise ValueError(
                    f"ConstantPredictor: no labelled target of task {t!r} in {max_batches} batches"
                )
            s = sums[t]
            if t in ("semseg", "parts"):
                freq = (s / s.sum()).clamp_min(1e-6)
                values[t] = freq.log()
            elif t in ("saliency", "edge"):
                values[t] = torch.tensor(
                    [math.log(0.999 / 0.001)]
                )  # sigmoid: 0.999, above every threshold
            elif t == "normals":
                mean = s / counts[t]
                values[t] = mean / mean.norm().clamp_min(1e-12)
            else:
                values[t] = s / counts[t]
        return cls(values)
