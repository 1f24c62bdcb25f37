"""Multi-task performance Delta_m (MTI-Net Eq. 2, ASTMT Eq. 4)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DEFAULT_METRIC", "HIGHER_IS_BETTER", "LOWER_IS_BETTER", "delta_m"]

#: task -> the metric MTI-Net's ``calculate_multi_task_performance`` compares.
DEFAULT_METRIC = {
    "semseg": "mIoU",
    "parts": "mIoU",
    "saliency": "mIoU",
    "normals": "mean",
    "depth": "rmse",
    "edge": "odsF",
}
#: metric names where lower is better (l_i = 1).
LOWER_IS_BETTER = frozenset({"mean", "median", "rmse", "log_rmse", "abs_rel", "mErr", "loss"})
#: metric names where higher is better (l_i = 0).
HIGHER_IS_BETTER = frozenset(
    {"mIoU", "maxF", "odsF", "oisF", "AP", "pixel_acc"}
    | {"delta1", "delta2", "delta3", "11.25", "22.5", "30"}
)


def delta_m(
    results: Mapping[str, float | Mapping[str, float]],
    baselines: Mapping[str, float | Mapping[str, float]],
    metrics: Mapping[str, str] | None = None,
    lower_is_better: Mapping[str, bool] | None = None,
) -> float:
    """``(1/T) sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i`` over the T tasks of ``results``.

    Positive means better than the baselines (MTI-Net's sign; ASTMT's tables print the drop,
    i.e. minus this). A fraction: multiply by 100 for percent.

    Args:
        results, baselines: task -> value, or task -> {metric: value} (a meter's ``compute()``).
        metrics: task -> metric name to compare; default :data:`DEFAULT_METRIC`, or the task's
            key itself when it is a metric name and the value is a number.
        lower_is_better: overrides of l_i, keyed by task or by metric name (task wins).
    """
    metrics = dict(metrics or {})
    override = dict(lower_is_better or {})
    if not results:
        raise ValueError("results is empty")
    missing = set(results) - set(baselines)
    if missing:
        raise ValueError(f"no baseline for tasks {sorted(missing)}")
    total = 0.0
    for task, value in results.items():
        name = metrics.get(task, DEFAULT_METRIC.get(task, task))
        m, b = _pick(value, name, task, "results"), _pick(baselines[task], name, task, "baselines")
        if task in override:
            lower = bool(override[task])
        elif name in override:
            lower = bool(override[name])
        elif name in LOWER_IS_BETTER:
            lower = True
        elif name in HIGHER_IS_BETTER:
            lower = False
        else:
            raise ValueError(
                f"direction of metric {name!r} (task {task!r}) unknown; pass lower_is_better"
            )
        if b == 0:
            raise ValueError(f"baseline of task {task!r} ({name}) is 0")
        rel = (m - b) / b
        total += -rel if lower else rel
    return total / len(results)


def _pick(value, name: str, task: str, where: str) -> float:
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(
                f"{where}[{task!r}] has no metric {name!r}; pass metrics={{{task!r}: ...}}"
            )
        value = value[name]
    return float(value)
