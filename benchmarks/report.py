"""Tables and target checks from pytest-benchmark JSONs of the op and engine benchmarks.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--markdown]
    python -m benchmarks.report RESULTS.json [MORE.json ...] [--markdown]

Each RESULTS.json comes from ``pytest benchmarks/bench_<suite>.py --benchmark-json=RESULTS.json``
(``make bench`` runs each suite in its own process and file; several files are reported as one
run, ``read``). For every
(op, device, dtype, shape, variant, mode) the report prints one row per impl: median time, GB/s
of the ideal traffic, that bandwidth as a % of a plain device copy moving as many bytes,
speed-up over each baseline of the group (``eager_loop``, ``naive_head``, ``eager``,
``compile``: its median time over the impl's), and peak extra memory (what each figure means:
``benchmarks/bench_attention_distill.py``). Then one line per fused backend against its targets
(``TARGETS``):

* CPU: >= 2x ``eager`` (``task_se``: >= 2x ``eager_loop``, ASTMT's per-task loop) and
  >= 1.0x ``compile``;
* CUDA: >= 80% of copy bandwidth and >= 1.3x ``compile``;
* ``skip_fusion`` at K=6 layers, forward_backward: peak extra memory <= 1/4 of ``naive_head``'s.

Then the engine benchmarks (``benchmarks/bench_engine.py``): peak memory and step time of each
strategy against the number of tasks T, the partially labelled case, and their targets
(``engine_figures``):

* recompute's peak memory at the largest T (16 in a full run) <= 1.15x its peak at T=1, while
  naive's grows with T;
* recompute's step time <= 1.35x naive's, at every T;
* partial labels (each sample labelled for one of 7 tasks): recompute (lazy) >= 2x faster than
  ``naive_all_rows`` (every head on every sample).

It is a report: the exit status is 0 whatever the targets say (2 for unusable arguments).
Only the standard library is used, so it runs anywhere the JSON is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

BASELINES = ("eager_loop", "naive_head", "eager", "compile")
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # benchmarks/harness.py pins them
BUSY_FRACTION = 0.05  # share of the CPU taken by other work above which timings are suspect


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
    Target("peak / naive_head", 0.25, upper=True, ops=("skip_fusion",), mode="forward_backward",
           k=6),
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
        return (self.op, self.device, self.device_name, self.dtype, size, self.shape, self.variant,
                self.mode)


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
    return {"machine_info": machine_info,
            "benchmarks": [b for r in runs for b in r.get("benchmarks", [])]}


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
        group = Group(info["op"], *device, info["dtype"], shape, info.get("variant", ""),
                      info["mode"])
        median = bench["stats"]["median"]
        figures = (info.get("gbps"), info.get("copy_fraction"), info.get("peak_mem_bytes"))
        row = Row(info["impl"], median, *figures, info)
        groups.setdefault(group, []).append(row)
    return data.get("machine_info", {}), {g: groups[g] for g in sorted(groups, key=Group.sort_key)}


def _table(header: Sequence[str], rows: list[list[str]], markdown: bool) -> list[str]:
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


def _impl_order(row: Row) -> tuple:
    """Fused backends first, then the baselines in ``BASELINES``'s order."""
    baseline = row.impl in BASELINES
    return (baseline, BASELINES.index(row.impl) if baseline else -1, row.impl)


def _header(machine_info: dict) -> list[str]:
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
    lines.append("glibc malloc: " + (", ".join(f"{k}={v}" for k, v in pinned.items()) or "defaults"))
    if set(pinned) != set(MALLOC_ENV):
        lines.append("WARNING: glibc malloc not pinned (benchmarks/harness.py MALLOC_ENV): large tensors may be "
                     "faulted in afresh on some calls and not others; CPU timings of one case varied 4x.")
    return lines + [""]


def render(machine_info: dict, groups: dict[Group, list[Row]], markdown: bool,
           engine: dict | None = None) -> list[str]:
    """The report's lines; ``engine``: :func:`engine_figures` of the same JSON."""
    lines = _header(machine_info)
    checked: list[tuple[str, bool]] = []
    for group, rows in groups.items():
        rows = sorted(rows, key=_impl_order)
        by_impl = {r.impl: r for r in rows}
        lines += [f"### {group.title()}" if markdown else f"== {group.title()}", ""]
        names = columns(rows)
        table = [[r.impl] + [_format(c, r.figures(by_impl)[c]) for c in names] for r in rows]
        lines += _table(("impl", *names), table, markdown) + [""]
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
    if engine is not None and engine["peak_extra_bytes"]:
        engine_lines, engine_checked = render_engine(engine, markdown)
        lines += engine_lines
        checked += engine_checked
    failed = [name for name, ok in checked if not ok]
    if checked:
        lines.append(f"Targets: {len(checked) - len(failed)}/{len(checked)} passed.")
        lines += [f"  FAIL: {name}" for name in failed]
    else:
        lines.append("Targets: nothing to check, no fused backend was benchmarked.")
    return lines


# --- The engine benchmarks (benchmarks/bench_engine.py) ---

ENGINE_STRATEGIES = ("naive", "recompute", "checkpoint")
RECOMPUTE_GROWTH = 1.15  # recompute's peak at the largest T over its peak at T=1, at most
RECOMPUTE_TIME = 1.35  # recompute's step time over naive's, at most
PARTIAL_SPEEDUP = 2.0  # naive's step time over recompute's with one label per sample, at least


def engine_figures(data: dict) -> dict:
    """The engine benchmarks of a pytest-benchmark JSON (``data``, parsed) as one figures dict:
    setup, machine, per strategy and T (keys are strings, as in JSON) the peak extra memory,
    saved bytes and step time (``step_s``), the partially labelled cases, and the targets,
    each ``{"name", "value", "bound", "upper", "met"}`` (``value`` None when not measured)."""
    machine = data.get("machine_info", {})
    figures: dict = {
        "machine": machine.get("node"), "torch": machine.get("torch"),
        "other_cpu_fraction": machine.get("other_cpu_fraction"), "device_name": None,
        "setup": {}, "peak_extra_bytes": {}, "saved_bytes": {},
        "step_s": {}, "other_cpu_fraction_by_case": {}, "param_bytes": {}, "partial": {},
        "targets": [],
    }
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("suite") != "engine":
            continue
        # the fastest round (bench_engine.py's step_s), else the median
        seconds = info.get("step_s", (bench.get("stats") or {}).get("median"))
        figures["device_name"] = info.get("device_name")
        figures["setup"] = {k: info.get(k) for k in ("n", "size", "output_stride", "segments")}
        strategy, t = info["strategy"], str(info["T"])
        if info["labels"] != "all":
            figures["partial"][strategy] = {
                "T": info["T"], "labels": info["labels"], "step_s": seconds,
                "peak_extra_bytes": info.get("peak_extra_bytes"),
                "saved_bytes": info.get("saved_bytes"),
                "other_cpu_fraction": info.get("other_cpu_fraction"),
            }
            continue
        for key in ("peak_extra_bytes", "saved_bytes", "other_cpu_fraction"):
            name = "other_cpu_fraction_by_case" if key == "other_cpu_fraction" else key
            figures[name].setdefault(strategy, {})[t] = info.get(key)
        figures["step_s"].setdefault(strategy, {})[t] = seconds
        figures["param_bytes"][t] = info.get("param_bytes")
    figures["targets"] = _engine_targets(figures)
    return figures


def _engine_targets(figures: dict) -> list[dict]:
    peaks, times = figures["peak_extra_bytes"], figures["step_s"]

    def target(name, value, bound, upper, met=None):
        if met is None:
            met = value is not None and (value <= bound if upper else value >= bound)
        return {"name": name, "value": value, "bound": bound, "upper": upper, "met": met}

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = []
    recompute = peaks.get("recompute", {})
    top = max(recompute, key=int, default="?")
    growth = ratio(recompute.get(top), recompute.get("1"))
    out.append(target(f"recompute peak T={top} / T=1", growth, RECOMPUTE_GROWTH, True))
    # naive grows with T: its peak strictly increases from each T measured to the next; the
    # value shown is the last over the first
    naive = peaks.get("naive", {})
    ts = sorted(naive, key=int)
    grows = len(ts) > 1 and all(naive[b] > naive[a] for a, b in zip(ts, ts[1:]))
    growth = ratio(naive.get(ts[-1]), naive.get(ts[0])) if ts else None
    name = f"naive peak T={ts[-1] if ts else '?'} / T=1, increasing in T"
    out.append(target(name, growth, 1.0, False, met=grows))
    for t in sorted(times.get("recompute", {}), key=int):
        value = ratio(times["recompute"].get(t), times.get("naive", {}).get(t))
        out.append(target(f"recompute / naive time T={t}", value, RECOMPUTE_TIME, True))
    partial = figures["partial"]
    baseline = "naive_all_rows" if "naive_all_rows" in partial else "naive"  # older files: naive
    speedup = ratio(partial.get(baseline, {}).get("step_s"),
                    partial.get("recompute", {}).get("step_s"))
    t = partial.get("recompute", {}).get("T", "?")
    out.append(target(f"partial labels T={t}: {baseline} / recompute (lazy) time", speedup,
                      PARTIAL_SPEEDUP, False))
    return out


def render_engine(figures: dict, markdown: bool) -> tuple[list[str], list[tuple[str, bool]]]:
    """The engine section's lines, and (target, passed) for each target."""
    setup = figures["setup"]
    size = "x".join(map(str, setup.get("size") or ()))
    where = f"cpu ({figures['device_name']})"
    title = (f"engine · {where} · batch {setup.get('n')} at {size} · ResNet-50 trunk, output "
             f"stride {setup.get('output_stride')}, {setup.get('segments')} segments")
    lines = [f"### {title}" if markdown else f"== {title}", ""]
    strategies = [s for s in ENGINE_STRATEGIES if s in figures["peak_extra_bytes"]]
    ts = sorted({t for by_t in figures["peak_extra_bytes"].values() for t in by_t}, key=int)

    def mib(value):
        return "-" if value is None else f"{value / 2**20:.0f}"

    busy = []

    def sec(value, other=None):
        if value is None:
            return "-"
        if other is not None and other >= BUSY_FRACTION:
            busy.append(other)
            return f"{value:.2f}*"
        return f"{value:.2f}"

    def other(strategy, t):
        return figures["other_cpu_fraction_by_case"].get(strategy, {}).get(t)

    header = ["T", *(f"{s} peak MiB" for s in strategies), *(f"{s} s" for s in strategies),
              "recompute/naive time", "params MiB"]
    table = []
    for t in ts:
        naive_s = figures["step_s"].get("naive", {}).get(t)
        recompute_s = figures["step_s"].get("recompute", {}).get(t)
        ratio = f"{recompute_s / naive_s:.2f}x" if naive_s and recompute_s else "-"
        table.append([t, *(mib(figures["peak_extra_bytes"][s].get(t)) for s in strategies),
                      *(sec(figures["step_s"].get(s, {}).get(t), other(s, t)) for s in strategies),
                      ratio,
                      mib(figures["param_bytes"].get(t))])
    lines += ["every sample labelled for every task; peak: above the model and its .grad", ""]
    lines += _table(header, table, markdown) + [""]
    partial = figures["partial"]
    if partial:
        t = next(iter(partial.values()))["T"]
        lines += [f"partial labels: T={t}, each sample labelled for one task", ""]
        rows = [[s, sec(p["step_s"], p.get("other_cpu_fraction")), mib(p["peak_extra_bytes"])]
                for s, p in partial.items()]
        lines += _table(["strategy", "step s", "peak MiB"], rows, markdown) + [""]
        lazy = partial.get("recompute", {}).get("step_s")
        for name, what in (("naive_all_rows", "every head on every sample"),
                           ("naive", "naive, tasks without labels skipped"),
                           ("recompute_all_rows", "recompute, every head on every sample")):
            other = partial.get(name, {}).get("step_s")
            if lazy and other:
                lines.append(f"{what} ({name}) / recompute (lazy) time: {other / lazy:.2f}x")
        # Amdahl: a lazy step still runs the trunk forward and backward on every sample and one
        # head per sample, the work of naive at T=1 with every sample labelled (same N and trunk)
        floor = figures["step_s"].get("naive", {}).get("1")
        every = partial.get("naive_all_rows", {}).get("step_s")
        if floor and every:
            lines.append(f"bound: no lazy step beats naive at T=1 ({floor:.2f} s: the trunk and one head "
                         f"per sample), so naive_all_rows / lazy is at most {every / floor:.2f}x here")
        lines.append("")
    if busy:
        lines += [f"* other work took {BUSY_FRACTION:.0%} or more of the CPU during these rounds "
                  f"(up to {max(busy):.0%}): unreliable timings.", ""]
    checked = []
    for target in figures["targets"]:
        relation = "<=" if target["upper"] else ">="
        value = "not measured" if target["value"] is None else f"{target['value']:.2f}"
        verdict = "PASS" if target["met"] else "FAIL"
        bound = f"{target['bound']:.2f}"
        lines.append(f"targets engine: {verdict}: {target['name']} {value} ({relation} {bound})")
        checked.append((f"engine: {target['name']}", target["met"]))
    lines.append("")
    return lines, checked


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSONs (--benchmark-json=...)")
    parser.add_argument("--markdown", action="store_true", help="GitHub-flavoured markdown tables")
    args = parser.parse_args(argv)
    data = read(args.json)
    machine_info, groups = load(data)
    print("\n".join(render(machine_info, groups, args.markdown, engine_figures(data))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
