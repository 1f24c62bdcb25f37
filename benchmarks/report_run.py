"""What a benchmark run was: its pytest-benchmark JSONs read as one, the header every report
starts with (torch, the extension, other work on the CPU, glibc malloc), and the table format
every section prints with. Standard library only."""

from __future__ import annotations

import json
from collections.abc import Sequence

from benchmarks.malloc_env import MALLOC_ENV

__all__ = ["BUSY_FRACTION", "format_table", "header", "read"]

BUSY_FRACTION = 0.05  # share of the CPU taken by other work above which timings are suspect


def read(paths: Sequence[str]) -> dict:
    """The pytest-benchmark JSONs at ``paths`` as one: their benchmarks in order, and the first's
    machine_info with the largest ``other_cpu_fraction`` of them all."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    machine_info = dict(runs[0].get("machine_info", {}))
    others = [r.get("machine_info", {}).get("other_cpu_fraction") for r in runs]
    others = [o for o in others if o is not None]
    machine_info["other_cpu_fraction"] = max(others) if others else None
    return {
        "machine_info": machine_info,
        "benchmarks": [b for r in runs for b in r.get("benchmarks", [])],
    }


def header(machine_info: dict) -> list[str]:
    """The report's first lines: the software, the machine's load, the malloc settings."""
    extension = machine_info.get("mtlfast_extension_error")
    if extension is None:
        extension = f"loaded (cpu isa {machine_info.get('mtlfast_cpu_isa')})"
    other = machine_info.get("other_cpu_fraction")
    other_text = "?" if other is None else f"{other:.0%}"
    lines = [
        f"torch {machine_info.get('torch', '?')}; mtlfast._C: {extension}",
        f"share of the CPU taken by other work during the run: {other_text}",
    ]
    if other is not None and other >= BUSY_FRACTION:
        lines.append("WARNING: other work ran on the machine during the run: unreliable timings.")
    malloc = machine_info.get("malloc_env") or {}
    pinned = {k: v for k, v in malloc.items() if v is not None}
    lines.append(
        "glibc malloc: " + (", ".join(f"{k}={v}" for k, v in pinned.items()) or "defaults")
    )
    if set(pinned) != set(MALLOC_ENV):
        lines.append(
            "WARNING: glibc malloc not pinned (benchmarks/malloc_env.py): large tensors may be "
            "faulted in afresh on some calls and not others; CPU timings of one case varied 4x."
        )
    return lines + [""]


def format_table(header: Sequence[str], rows: list[list[str]], markdown: bool) -> list[str]:
    """First column left-aligned, the others right-aligned."""
    if markdown:

        def cells_md(cells):
            return "| " + " | ".join(cells) + " |"

        return [cells_md(header), "|:---|" + "---:|" * (len(header) - 1), *map(cells_md, rows)]
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells):
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
