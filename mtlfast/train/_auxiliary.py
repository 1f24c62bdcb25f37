"""Front-end-only auxiliary tasks (the MTI-Net release's): trained through deep supervision only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn


class _WithoutFinal(nn.Module):
    """A head whose outputs keyed by an auxiliary task's own name are dropped: that prediction
    (e.g. MTI-Net's aggregated output of an auxiliary task) is computed but feeds no loss, so it
    gets no gradient and its activations are freed with the head's forward. Its deep-supervision
    outputs (``deep_supervision/scale_0/edge``) stay."""

    def __init__(self, head: nn.Module, drop: set[str]) -> None:
        super().__init__()
        self.head, self.drop = head, drop

    @property
    def tasks(self) -> list[str] | None:
        tasks = getattr(self.head, "tasks", None)
        return None if tasks is None else [k for k in tasks if k not in self.drop]

    def forward(self, x: Any) -> Any:
        out = self.head(x)
        if not isinstance(out, Mapping):
            return out
        return {k: v for k, v in out.items() if k not in self.drop}


def front_end_only(inputs: tuple, auxiliary: Sequence[str]) -> tuple:
    """The engine's inputs ``((trunk, heads), targets, loss_fns, labeled, weights)``, expanded to
    every key, without the final outputs of the ``auxiliary`` tasks (their deep supervision
    stays): the releases' auxiliary tasks, supervised in the front end only."""
    (trunk, heads), targets, loss_fns, labeled, weights = inputs
    drop = set(auxiliary)
    wrapped = {
        name: _WithoutFinal(head, drop) if _joint(head) or name in drop else head
        for name, head in heads.items()
    }

    def strip(d: Mapping | None) -> dict | None:
        return None if d is None else {k: v for k, v in d.items() if k not in drop}

    return (trunk, wrapped), strip(targets), strip(loss_fns), strip(labeled), strip(weights)


def _joint(head: Any) -> bool:
    return getattr(head, "tasks", None) is not None
