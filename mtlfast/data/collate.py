"""Batching of sample dicts for ``torch.utils.data.DataLoader``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tasks import TASKS, ignore_target

__all__ = ["collate"]


def collate(samples: Sequence[dict]) -> dict:
    """Stack a list of samples into a batch; use as ``DataLoader(..., collate_fn=collate)``.

    Tensors are stacked: ``image`` (N,3,H,W), ``semseg``/``parts`` (N,H,W), ``saliency``/``edge``/
    ``depth`` (N,1,H,W), ``normals`` (N,3,H,W). ``labeled`` becomes a dict task -> bool tensor
    (N,). A task target missing from some samples (but present in others) is filled with its
    ignore value there and marked unlabelled, so datasets may omit targets they lack. Other
    values (names, metadata) are gathered into lists. All images must have the same size.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    keys = []
    for s in samples:
        keys.extend(k for k in s if k not in keys)
    tasks = [k for k in keys if k in TASKS]
    batch = {}
    shapes = {tuple(s["image"].shape[-2:]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"collate: images of different sizes {sorted(shapes)}; crop or resize them first"
        )
    height, width = shapes.pop()
    labeled = {t: [] for t in tasks}
    for s in samples:
        flags = s.get("labeled", {})
        for t in tasks:
            labeled[t].append(bool(flags.get(t, t in s)) and t in s)
    for k in keys:
        if k == "labeled":
            continue
        if k in tasks:
            values = [s[k] if k in s else ignore_target(k, height, width) for s in samples]
        else:
            values = [s.get(k) for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[k] = torch.stack(values)
        else:
            batch[k] = values
    batch["labeled"] = {t: torch.tensor(v, dtype=torch.bool) for t, v in labeled.items()}
    return batch
