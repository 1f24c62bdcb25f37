"""The per-task table a run prints at its end (``mtlfast report RUN_DIR``)."""

from __future__ import annotations

from ..metrics import DEFAULT_METRIC, LOWER_IS_BETTER

__all__ = ["results_table"]


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
