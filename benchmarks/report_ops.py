"""The op benchmarks' report (``benchmarks/bench_<op>.py``): one table per (op, device, dtype,
shape, variant, mode) with a row per impl, and each fused backend against its targets
(``TARGETS``). Standard library only."""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.report_run import format_table

__all__ = ["BASELINES", "TARGETS", "Group", "Row", "Target", "columns", "load", "render_ops"]

BASELINES = ("eager_loop", "naive_head", "eager", "compile")


@dataclass(frozen=True)
class Target:
    """A bound on one of a fused row's figures (``Row.figures``), for the benchmarks whose
    extra_info matches the fields that are set."""

    figure: str
    bound: float
    upper: bool = False  # figure <= bound; else figure >= bound
    device: str | None = None
    ops: tuple[str, ...] = ()
    mode: str | None = None
    k: int | None = None  # extra_info's K (skip_fusion's number of layers)

    def applies(self, info: dict) -> bool:
        wanted = (("device", self.device), ("mode", self.mode), ("K", self.k))
        return (not self.ops or info["op"] in self.ops) and all(
            value is None or info.get(key) == value for key, value in wanted
        )

    def describe(self, value: float | None) -> str:
        verdict = "" if self.met(value) else " FAIL"
        relation = "<=" if self.upper else ">="
        bound = _format(self.figure, self.bound)
        return f"{self.figure} {_format(self.figure, value)} ({relation} {bound}){verdict}"

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return value <= self.bound if self.upper else value >= self.bound


TARGETS = (
    Target("vs eager", 2.0, device="cpu", ops=("attention_distill", "skip_fusion")),
    Target("vs eager_loop", 2.0, device="cpu", ops=("task_se",)),
    Target("vs compile", 1.0, device="cpu"),
    Target("% copy", 0.8, device="cuda"),
    Target("vs compile", 1.3, device="cuda"),
    Target(
        "peak / naive_head", 0.25, upper=True, ops=("skip_fusion",), mode="forward_backward", k=6
    ),
)


@dataclass(frozen=True)
class Row:
    """One benchmark of the JSON: an impl's figures in its group."""

    impl: str
    median_s: float
    gbps: float | None
    copy_fraction: float | None
    peak_mem_bytes: int | None
    info: dict  # the benchmark's extra_info

    def figures(self, by_impl: dict[str, Row]) -> dict[str, float | None]:
        """The table's figures, the speed-ups against the baselines of the same group, and the
        ratios of peak memory to theirs ("peak / <baseline>")."""
        figures = {
            "median ms": 1e3 * self.median_s,
            "GB/s": self.gbps,
            "% copy": self.copy_fraction,
            "peak MiB": None if self.peak_mem_bytes is None else self.peak_mem_bytes / 2**20,
        }
        for name in BASELINES:
            base = by_impl.get(name)
            figures[f"vs {name}"] = None if base is None else base.median_s / self.median_s
            peaks = None if base is None else (self.peak_mem_bytes, base.peak_mem_bytes)
            usable = peaks is not None and None not in peaks and peaks[1] > 0
            figures[f"peak / {name}"] = peaks[0] / peaks[1] if usable else None
        return figures


def columns(rows: list[Row]) -> tuple[str, ...]:
    """The table's columns: a speed-up for each baseline among ``rows``."""
    present = {r.impl for r in rows}
    speedups = [f"vs {name}" for name in BASELINES if name in present]
    return ("median ms", "GB/s", "% copy", *speedups, "peak MiB")


def _format(figure: str, value: float | None) -> str:
    if value is None:
        return "-"
    if figure == "% copy":
        return f"{100 * value:.0f}%"
    if figure.startswith("vs "):
        return f"{value:.2f}x"
    if figure.startswith("peak / "):
        return f"{value:.2f}"
    return f"{value:.3f}" if figure == "median ms" else f"{value:.1f}"


@dataclass(frozen=True)
class Group:
    """The benchmarks of one op on one device, dtype, shape, variant and mode; the variant
    (extra_info's, may be empty) tells apart cases of one shape, e.g. skip_fusion's layers."""

    op: str
    device: str
    device_name: str
    dtype: str
    shape: tuple[int, ...]
    variant: str
    mode: str

    def title(self) -> str:
        device = f"{self.device} ({self.device_name})"
        shape = "x".join(map(str, self.shape))
        parts = (self.op, device, self.dtype, shape, self.variant, self.mode)
        return " · ".join(p for p in parts if p)

    def sort_key(self) -> tuple:
        size = math.prod(self.shape)
        return (
            self.op,
            self.device,
            self.device_name,
            self.dtype,
            size,
            self.shape,
            self.variant,
            self.mode,
        )


def load(data: dict) -> tuple[dict, dict[Group, list[Row]]]:
    """machine_info and the op benchmarks by group, groups in report order, of a pytest-benchmark
    JSON (``data``, parsed)."""
    groups: dict[Group, list[Row]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not {"op", "impl", "mode", "shape"} <= info.keys():
            continue  # not an op benchmark
        shape = tuple(info["shape"])
        device = (info["device"], info["device_name"])
        group = Group(
            info["op"], *device, info["dtype"], shape, info.get("variant", ""), info["mode"]
        )
        median = bench["stats"]["median"]
        figures = (info.get("gbps"), info.get("copy_fraction"), info.get("peak_mem_bytes"))
        row = Row(info["impl"], median, *figures, info)
        groups.setdefault(group, []).append(row)
    return data.get("machine_info", {}), {g: groups[g] for g in sorted(groups, key=Group.sort_key)}


def _impl_order(row: Row) -> tuple:
    """Fused backends first, then the baselines in ``BASELINES``'s order."""
    baseline = row.impl in BASELINES
    return (baseline, BASELINES.index(row.impl) if baseline else -1, row.impl)


def render_ops(
    groups: dict[Group, list[Row]], markdown: bool
) -> tuple[list[str], list[tuple[str, bool]]]:
    """The op tables' lines, and (fused impl on its group, passed) for each one checked."""
    lines: list[str] = []
    checked: list[tuple[str, bool]] = []
    for group, rows in groups.items():
        rows = sorted(rows, key=_impl_order)
        by_impl = {r.impl: r for r in rows}
        lines += [f"### {group.title()}" if markdown else f"== {group.title()}", ""]
        names = columns(rows)
        table = [[r.impl] + [_format(c, r.figures(by_impl)[c]) for c in names] for r in rows]
        lines += format_table(("impl", *names), table, markdown) + [""]
        fused = [r for r in rows if r.impl not in BASELINES]
        if not fused:
            lines.append("targets: no fused backend in this run")
        for r in fused:
            targets = [t for t in TARGETS if t.applies(r.info)]
            figures = r.figures(by_impl)
            passed = all(t.met(figures[t.figure]) for t in targets)
            checked.append((f"{r.impl} on {group.title()}", passed))
            detail = "; ".join(t.describe(figures[t.figure]) for t in targets) or "none here"
            lines.append(f"targets {r.impl}: {'PASS' if passed else 'FAIL'}: {detail}")
        lines.append("")
    return lines, checked
