"""Task names and their default output channels per dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_OUT_CHANNELS", "resolve_tasks"]

#: dataset -> task -> output channels: PASCAL-Context (21 classes, 7 parts incl. background,
#: saliency, normals, edges), NYUD-v2 (40 classes, depth, normals, edges) and the embedded
#: synthetic scenes with their default shapes (``mtlfast.data.SyntheticScenes()``: 5 classes
#: floor, wall, sphere, box, cylinder; 7 parts, background and two per shape; all six tasks).
DEFAULT_OUT_CHANNELS = {
    "pascal": {"semseg": 21, "parts": 7, "saliency": 1, "normals": 3, "edge": 1},
    "nyud": {"semseg": 40, "depth": 1, "normals": 3, "edge": 1},
    "synthetic": {"semseg": 5, "parts": 7, "saliency": 1, "normals": 3, "edge": 1, "depth": 1},
}


def resolve_tasks(
    tasks: Sequence[str] | str,
    dataset: str = "pascal",
    out_channels: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """task -> output channels, in the given order: ``out_channels`` first, then ``dataset``'s defaults."""
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct, got {tasks!r}")
    if any("/" in t for t in tasks):
        raise ValueError(
            f"task names may not contain '/' (it separates deep-supervision keys), got {tasks!r}"
        )
    if dataset not in DEFAULT_OUT_CHANNELS:
        raise ValueError(f"dataset must be one of {sorted(DEFAULT_OUT_CHANNELS)}, got {dataset!r}")
    out_channels = dict(out_channels or {})
    unknown = set(out_channels) - set(tasks)
    if unknown:
        raise ValueError(f"out_channels names tasks not in tasks: {sorted(unknown)}")
    defaults = DEFAULT_OUT_CHANNELS[dataset]
    result = {}
    for t in tasks:
        c = out_channels.get(t, defaults.get(t))
        if c is None:
            raise ValueError(
                f"task {t!r} has no default output channels for dataset {dataset!r}; "
                "give them in out_channels"
            )
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"out_channels[{t!r}] must be a positive int, got {c!r}")
        result[t] = c
    return result
