"""Tables and target checks from a pytest-benchmark JSON of the op benchmarks.

    python benchmarks/report.py RESULTS.json [--markdown]
    python -m benchmarks.report RESULTS.json [--markdown]

RESULTS.json comes from ``pytest benchmarks/... --benchmark-json=RESULTS.json``. For every
(op, device, dtype, shape, mode) the report prints one row per impl: median time, GB/s of the
ideal traffic, that bandwidth as a % of a plain device copy moving as many bytes, speed-up over
``eager`` and over ``compile`` (their median over the impl's), and peak extra memory (see
``benchmarks/bench_attention_distill.py`` for what each figure means). Then one line per fused
backend against its targets:

* CPU: >= 2x ``eager`` and >= 1.0x ``compile``;
* CUDA: >= 80% of copy bandwidth and >= 1.3x ``compile``.

It is a report: the exit status is 0 whatever the targets say (2 only for unusable arguments).
Only the standard library is used, so it runs anywhere the JSON is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BASELINES = ("eager", "compile")
BUSY_FRACTION = 0.05  # share of the machine's CPU time taken by other work that makes timings suspect
TARGETS_TEXT = {
    "cpu": ">= 2x eager and >= 1.0x compile",
    "cuda": ">= 80% of copy bandwidth and >= 1.3x compile",
}


@dataclass(frozen=True)
class Row:
    """One benchmark of the JSON: an impl's figures in one group."""

    impl: str
    median_s: float
    gbps: float | None
    copy_fraction: float | None
    peak_mem_bytes: int | None


def _group_key(info: dict) -> tuple:
    return (info["op"], info["device"], info["device_name"], info["dtype"], tuple(info["shape"]), info["mode"])


def _sort_key(key: tuple) -> tuple:
    op, device, device_name, dtype, shape, mode = key
    volume = 1
    for size in shape:
        volume *= size
    return (op, device, device_name, dtype, volume, shape, mode)


def load_groups(path: str) -> tuple[dict, dict[tuple, list[Row]]]:
    """The JSON's machine_info, and its op benchmarks grouped by (op, device, ..., mode)."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[tuple, list[Row]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not {"op", "impl", "mode", "shape"} <= info.keys():
            continue  # not one of the op benchmarks
        row = Row(
            impl=info["impl"],
            median_s=bench["stats"]["median"],
            gbps=info.get("gbps"),
            copy_fraction=info.get("copy_fraction"),
            peak_mem_bytes=info.get("peak_mem_bytes"),
        )
        groups.setdefault(_group_key(info), []).append(row)
    ordered = {key: groups[key] for key in sorted(groups, key=_sort_key)}
    return data.get("machine_info", {}), ordered


def _speedup(base: Row | None, row: Row) -> float | None:
    return base.median_s / row.median_s if base is not None else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def check_targets(device: str, row: Row, by_impl: dict[str, Row]) -> tuple[bool, list[str]] | None:
    """(passed, the measured figures against their targets) for a fused backend's row, or None
    when the device has no targets."""
    vs_eager = _speedup(by_impl.get("eager"), row)
    vs_compile = _speedup(by_impl.get("compile"), row)
    if device == "cpu":
        checks = [("eager", vs_eager, 2.0, "x"), ("compile", vs_compile, 1.0, "x")]
    elif device == "cuda":
        checks = [("copy", row.copy_fraction, 0.8, ""), ("compile", vs_compile, 1.3, "x")]
    else:
        return None
    passed, parts = True, []
    for name, value, target, unit in checks:
        ok = value is not None and value >= target
        passed &= ok
        if unit == "x":
            parts.append(f"{_fmt(value, '.2f', 'x')} {name} (>= {target:g}x){'' if ok else ' FAIL'}")
        else:
            parts.append(f"{_fmt(None if value is None else 100 * value, '.0f', '%')} of {name} "
                         f"(>= {100 * target:.0f}%){'' if ok else ' FAIL'}")
    return passed, parts


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool) -> list[str]:
    rows = [list(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]

    def line(cells):
        first, *rest = cells
        return "  ".join([first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])])

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _impl_order(impl: str) -> tuple[bool, int, str]:
    return (impl in BASELINES, BASELINES.index(impl) if impl in BASELINES else 0, impl)


def render(machine_info: dict, groups: dict[tuple, list[Row]], markdown: bool) -> list[str]:
    """The report's lines."""
    lines = []
    torch_version = machine_info.get("torch", "?")
    extension = machine_info.get("mtlfast_extension_error") or f"loaded (cpu isa {machine_info.get('mtlfast_cpu_isa')})"
    other = machine_info.get("other_cpu_fraction")
    other_text = "unknown" if other is None else f"{100 * other:.0f}%"
    lines.append(f"torch {torch_version}; mtlfast._C: {extension}; other work's share of the CPU during the run: {other_text}")
    if other is not None and other >= BUSY_FRACTION:
        lines.append("WARNING: other work ran on the machine during the benchmarks; their timings are unreliable.")
    lines.append("")
    results: list[tuple[str, bool]] = []
    header = ["impl", "median ms", "GB/s", "% copy", "vs eager", "vs compile", "peak MiB"]
    for (op, device, device_name, dtype, shape, mode), rows in groups.items():
        n, t, *chw = shape
        title = f"{op} · {device} ({device_name}) · {dtype} · N={n} T={t} C,H,W={','.join(map(str, chw))} · {mode}"
        lines.append(f"### {title}" if markdown else f"== {title}")
        lines.append("")
        rows = sorted(rows, key=lambda r: _impl_order(r.impl))
        by_impl = {r.impl: r for r in rows}
        table = [
            [
                r.impl,
                f"{1e3 * r.median_s:.3f}",
                _fmt(r.gbps, ".1f"),
                _fmt(None if r.copy_fraction is None else 100 * r.copy_fraction, ".0f", "%"),
                _fmt(_speedup(by_impl.get("eager"), r), ".2f", "x"),
                _fmt(_speedup(by_impl.get("compile"), r), ".2f", "x"),
                _fmt(None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20, ".1f"),
            ]
            for r in rows
        ]
        lines += _table(header, table, markdown)
        lines.append("")
        fused = [r for r in rows if r.impl not in BASELINES]
        if not fused:
            lines.append("targets: no compiled backend in this run")
        for r in fused:
            verdict = check_targets(device, r, by_impl)
            if verdict is None:
                lines.append(f"targets: none for {device}")
                continue
            passed, parts = verdict
            results.append((f"{r.impl} on {title}", passed))
            lines.append(f"targets {r.impl}: {'PASS' if passed else 'FAIL'}: " + "; ".join(parts))
        lines.append("")
    failed = [name for name, ok in results if not ok]
    if results:
        lines.append(f"Targets: {len(results) - len(failed)}/{len(results)} passed "
                     f"(CPU: {TARGETS_TEXT['cpu']}; CUDA: {TARGETS_TEXT['cuda']}).")
        lines += [f"  FAIL: {name}" for name in failed]
    else:
        lines.append("Targets: nothing to check, no compiled backend was benchmarked.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=...)")
    parser.add_argument("--markdown", action="store_true", help="GitHub-flavoured markdown tables")
    args = parser.parse_args(argv)
    machine_info, groups = load_groups(args.json)
    print("\n".join(render(machine_info, groups, args.markdown)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
