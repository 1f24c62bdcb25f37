"""The per-task table a run prints at its end (``mtlfast report RUN_DIR``), and the comparison
of several runs (``mtlfast report RUN_DIR RUN_DIR ... [--plot FILE]``)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path

from ..metrics import DEFAULT_METRIC, LOWER_IS_BETTER

__all__ = ["comparison_table", "draw_comparison", "results_table"]

WHICH = ("best", "final")


def _value(results: dict | None, task: str, metric: str) -> str:
    if not results:
        return "-"
    value = results.get("tasks", {}).get(task, {}).get(metric)
    return "-" if value is None else f"{value:.4g}"


def results_table(results: dict, baselines: dict | None = None) -> str:
    """A plain-text table: per task its delta_m metric before training, after training (final
    and best), the constant predictor's and the single-task baseline's; then delta_m."""
    final = results.get("final") or {}
    best = (results.get("best") or {}).get("results")
    tasks = list(final.get("tasks", {}))
    header = ["task", "metric", "before", "final", "best", "constant", "single-task"]
    rows = []
    for t in tasks:
        m = DEFAULT_METRIC.get(t, next(iter(final["tasks"][t])))
        arrow = "(lower better)" if m in LOWER_IS_BETTER else "(higher better)"
        base = "-"
        if baselines and t in baselines and m in baselines[t]:
            base = f"{baselines[t][m]:.4g}"
        rows.append(
            [
                t,
                f"{m} {arrow}",
                _value(results.get("before_training"), t, m),
                _value(final, t, m),
                _value(best, t, m),
                _value(results.get("constant_predictor"), t, m),
                base,
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = []
    if final.get("delta_m") is not None:
        extra.append(f"delta_m vs single-task (final): {100 * final['delta_m']:+.2f}%")
    if best and best.get("delta_m") is not None:
        extra.append(
            f"delta_m vs single-task (best, step {results['best']['step']}): {100 * best['delta_m']:+.2f}%"
        )
    steps = results.get("steps")
    if steps:
        t = results.get("train_time_s") or 0.0
        extra.append(
            f"{steps} steps in {t:.0f} s of training ({results.get('images_per_s') or 0:.1f} images/s, "
            f"{results.get('threads')} threads, peak memory {results.get('peak_memory_bytes', 0) / 2**20:.0f} MiB)"
        )
    return "\n".join(lines + extra)


def _scores(results: dict, which: str) -> dict | None:
    """The evaluation ``which`` ("best" or "final") of one run's ``results.json``."""
    if which == "final":
        return results.get("final")
    return (results.get("best") or {}).get("results")


def _task_metrics(runs: Mapping[str, dict], which: str) -> list[tuple[str, str]]:
    """(task, metric) of every task any run evaluated, in order of first appearance: the task's
    delta_m metric, else the first one its first run reports."""
    out: dict[str, str] = {}
    for results in runs.values():
        for task, values in ((_scores(results, which) or {}).get("tasks") or {}).items():
            if task not in out and values:
                out[task] = DEFAULT_METRIC.get(task, next(iter(values)))
    return list(out.items())


def _metric(results: dict, which: str, task: str, metric: str) -> float | None:
    value = ((_scores(results, which) or {}).get("tasks") or {}).get(task, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def comparison_table(
    runs: Mapping[str, dict],
    which: str = "best",
    details: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A plain-text table comparing runs side by side, a column per run.

    Args:
        runs: name -> the run's ``results.json`` (as a dict), in the columns' order.
        which: "best" (each run's best evaluation, as checkpoints/best.pt holds it) or "final".
        details: name -> row label -> text shown above the metrics (e.g. {"model": "mtinet"}).

    Rows: each task's delta_m metric (the best value among the runs marked ``*``, ``-`` where a
    run did not evaluate the task), delta_m against the single-task baselines, the step of the
    evaluation, training steps, time, images/s and peak memory.

    Raises:
        ValueError: ``which`` not "best" or "final"; fewer than one run.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if not runs:
        raise ValueError("runs must hold at least one run")
    names = list(runs)
    header = ["", *names]
    rows: list[list[str]] = []
    for label in {k: None for d in (details or {}).values() for k in d}:
        rows.append([label, *((details or {}).get(n, {}).get(label, "-") for n in names)])
    for task, metric in _task_metrics(runs, which):
        values = [_metric(runs[n], which, task, metric) for n in names]
        known = [v for v in values if v is not None]
        top = (min if metric in LOWER_IS_BETTER else max)(known) if len(known) > 1 else None
        arrow = "lower" if metric in LOWER_IS_BETTER else "higher"
        rows.append(
            [
                f"{task} {metric} ({arrow} better)",
                *("-" if v is None else f"{v:.4g}{' *' if v == top else ''}" for v in values),
            ]
        )

    def delta(results: dict) -> str:
        d = (_scores(results, which) or {}).get("delta_m")
        return "-" if d is None else f"{100 * d:+.2f}%"

    def step(results: dict) -> str:
        s = (results.get("best") or {}).get("step") if which == "best" else results.get("steps")
        return "-" if s is None else str(s)

    def number(results: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        v = results.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "-"
        return format(v / scale if scale != 1.0 else v, fmt)

    rows += [
        ["delta_m vs single-task", *(delta(runs[n]) for n in names)],
        [f"step of the {which} evaluation", *(step(runs[n]) for n in names)],
        ["training steps", *(number(runs[n], "steps", "d") for n in names)],
        ["training time (s)", *(number(runs[n], "train_time_s", ".0f") for n in names)],
        ["images/s", *(number(runs[n], "images_per_s", ".2f") for n in names)],
        ["peak memory (MiB)", *(number(runs[n], "peak_memory_bytes", ".0f", 2**20) for n in names)],
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def draw_comparison(runs: Mapping[str, dict], path: str | Path, which: str = "best") -> Path:
    """A PNG at ``path``: one panel per task, a bar per run of the task's delta_m metric
    (``which`` evaluation), the constant predictor's value as a dashed line where the runs
    recorded one. Returns ``path``."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._runtime import atomic_write_bytes

    tasks = _task_metrics(runs, which)
    if not tasks:
        raise ValueError("none of the runs holds a per-task evaluation to plot")
    names = list(runs)
    cols = min(len(tasks), 3)
    nrows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(
        nrows, cols, figsize=(max(3.0, 0.9 * len(names) + 1.6) * cols, 3.2 * nrows), squeeze=False
    )
    for ax, (task, metric) in zip(axes.flat, tasks):
        values = [_metric(runs[n], which, task, metric) for n in names]
        xs = range(len(names))
        ax.bar(xs, [0.0 if v is None else v for v in values], color=[f"C{i % 10}" for i in xs])
        for x, v in zip(xs, values):
            ax.annotate(
                "-" if v is None else f"{v:.3g}",
                (x, v or 0.0),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        constant = next(
            (
                v
                for n in names
                if (
                    v := ((runs[n].get("constant_predictor") or {}).get("tasks") or {})
                    .get(task, {})
                    .get(metric)
                )
                is not None
            ),
            None,
        )
        if constant is not None:
            ax.axhline(constant, ls="--", lw=1, color="grey", label="constant predictor")
            ax.legend(fontsize=7)
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{task}: {metric} ({better} is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
