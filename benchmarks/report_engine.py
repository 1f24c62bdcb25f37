"""The engine benchmarks' report (``benchmarks/bench_engine.py``): peak memory and step time of
each strategy against the number of tasks T, the partially labelled case, and their targets.
Standard library only."""

from __future__ import annotations

import itertools

from benchmarks.report_run import BUSY_FRACTION, format_table

__all__ = [
    "ENGINE_STRATEGIES",
    "PARTIAL_SPEEDUP",
    "RECOMPUTE_GROWTH",
    "RECOMPUTE_TIME",
    "engine_figures",
    "render_engine",
]

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
        "machine": machine.get("node"),
        "torch": machine.get("torch"),
        "other_cpu_fraction": machine.get("other_cpu_fraction"),
        "device_name": None,
        "setup": {},
        "peak_extra_bytes": {},
        "saved_bytes": {},
        "step_s": {},
        "other_cpu_fraction_by_case": {},
        "param_bytes": {},
        "partial": {},
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
                "T": info["T"],
                "labels": info["labels"],
                "step_s": seconds,
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
    grows = len(ts) > 1 and all(naive[b] > naive[a] for a, b in itertools.pairwise(ts))
    growth = ratio(naive.get(ts[-1]), naive.get(ts[0])) if ts else None
    name = f"naive peak T={ts[-1] if ts else '?'} / T=1, increasing in T"
    out.append(target(name, growth, 1.0, False, met=grows))
    for t in sorted(times.get("recompute", {}), key=int):
        value = ratio(times["recompute"].get(t), times.get("naive", {}).get(t))
        out.append(target(f"recompute / naive time T={t}", value, RECOMPUTE_TIME, True))
    partial = figures["partial"]
    baseline = "naive_all_rows" if "naive_all_rows" in partial else "naive"  # older files: naive
    speedup = ratio(
        partial.get(baseline, {}).get("step_s"), partial.get("recompute", {}).get("step_s")
    )
    t = partial.get("recompute", {}).get("T", "?")
    out.append(
        target(
            f"partial labels T={t}: {baseline} / recompute (lazy) time",
            speedup,
            PARTIAL_SPEEDUP,
            False,
        )
    )
    return out


def render_engine(figures: dict, markdown: bool) -> tuple[list[str], list[tuple[str, bool]]]:
    """The engine section's lines, and (target, passed) for each target."""
    setup = figures["setup"]
    size = "x".join(map(str, setup.get("size") or ()))
    where = f"cpu ({figures['device_name']})"
    title = (
        f"engine · {where} · batch {setup.get('n')} at {size} · ResNet-50 trunk, output "
        f"stride {setup.get('output_stride')}, {setup.get('segments')} segments"
    )
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

    header = [
        "T",
        *(f"{s} peak MiB" for s in strategies),
        *(f"{s} s" for s in strategies),
        "recompute/naive time",
        "params MiB",
    ]
    table = []
    for t in ts:
        naive_s = figures["step_s"].get("naive", {}).get(t)
        recompute_s = figures["step_s"].get("recompute", {}).get(t)
        ratio = f"{recompute_s / naive_s:.2f}x" if naive_s and recompute_s else "-"
        table.append(
            [
                t,
                *(mib(figures["peak_extra_bytes"][s].get(t)) for s in strategies),
                *(sec(figures["step_s"].get(s, {}).get(t), other(s, t)) for s in strategies),
                ratio,
                mib(figures["param_bytes"].get(t)),
            ]
        )
    lines += ["every sample labelled for every task; peak: above the model and its .grad", ""]
    lines += format_table(header, table, markdown) + [""]
    partial = figures["partial"]
    if partial:
        t = next(iter(partial.values()))["T"]
        lines += [f"partial labels: T={t}, each sample labelled for one task", ""]
        rows = [
            [s, sec(p["step_s"], p.get("other_cpu_fraction")), mib(p["peak_extra_bytes"])]
            for s, p in partial.items()
        ]
        lines += format_table(["strategy", "step s", "peak MiB"], rows, markdown) + [""]
        lazy = partial.get("recompute", {}).get("step_s")
        for name, what in (
            ("naive_all_rows", "every head on every sample"),
            ("naive", "naive, tasks without labels skipped"),
            ("recompute_all_rows", "recompute, every head on every sample"),
        ):
            other = partial.get(name, {}).get("step_s")
            if lazy and other:
                lines.append(f"{what} ({name}) / recompute (lazy) time: {other / lazy:.2f}x")
        # Amdahl: a lazy step still runs the trunk forward and backward on every sample and one
        # head per sample, the work of naive at T=1 with every sample labelled (same N and trunk)
        floor = figures["step_s"].get("naive", {}).get("1")
        every = partial.get("naive_all_rows", {}).get("step_s")
        if floor and every:
            lines.append(
                f"bound: no lazy step beats naive at T=1 ({floor:.2f} s: the trunk and one head "
                f"per sample), so naive_all_rows / lazy is at most {every / floor:.2f}x here"
            )
        lines.append("")
    if busy:
        lines += [
            (
                f"* other work took {BUSY_FRACTION:.0%} or more of the CPU during these rounds "
                f"(up to {max(busy):.0%}): unreliable timings."
            ),
            "",
        ]
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
