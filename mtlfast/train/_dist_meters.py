"""Evaluation meters merged over ranks: each rank measures its shard, the sums are pooled.

Every meter of :mod:`mtlfast.metrics` keeps its whole state in the attributes its ``reset()``
assigns: counts and sums (numbers, arrays: added) or per-image lists (concatenated). So the
state is found by watching ``reset()`` rather than listed per meter class, and a new meter
that follows the same rule merges without code here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["merge_meters"]


def _state_names(meter: Any) -> list[str]:
    """The attributes ``meter.reset()`` assigns, found by running it on a shallow copy."""
    names: list[str] = []

    class _Recorder(type(meter)):
        def __setattr__(self, name: str, value: Any) -> None:
            names.append(name)
            object.__setattr__(self, name, value)

    probe = object.__new__(_Recorder)
    probe.__dict__.update(vars(meter))
    probe.reset()
    return list(dict.fromkeys(names))


def _merge(values: list[Any], what: str) -> Any:
    first = values[0]
    if isinstance(first, list):
        return [x for v in values for x in v]
    if isinstance(first, (int, float, np.ndarray, np.number, torch.Tensor)):
        total = first
        for v in values[1:]:
            total = total + v
        return total
    raise TypeError(f"merge_meters: cannot pool {what} of type {type(first).__name__} over ranks")


def merge_meters(meters: dict[str, Any], seen: dict[str, int], images: int, group=None) -> int:
    """Pools every rank's ``meters`` and ``seen`` counts into each rank's (in place) with one
    ``all_gather_object``; returns the images seen by all ranks.

    Lists are concatenated in rank order; a per-image metric averaged over them is then the
    one-process value up to the summation order.
    """
    names = {t: _state_names(m) for t, m in meters.items()}
    mine = {
        "meters": {t: {n: getattr(m, n) for n in names[t]} for t, m in meters.items()},
        "seen": dict(seen),
        "images": images,
    }
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    for t, m in meters.items():
        for n in names[t]:
            setattr(m, n, _merge([r["meters"][t][n] for r in every], f"{type(m).__name__}.{n}"))
    for t in seen:
        seen[t] = sum(r["seen"][t] for r in every)
    return sum(r["images"] for r in every)
