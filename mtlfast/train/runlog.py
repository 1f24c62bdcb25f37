"""A run's scalar log: ``log.csv`` (step, wall time, tag, value), TensorBoard events when the
optional ``tensorboard`` package is installed, and PNG plots drawn from the CSV.

Tags are ``train/loss/<task>``, ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/images_per_s``, ``val/<task>/<metric>``, ``val/delta_m`` and ``train/weight/<task>``
(every step: ``loss.weights`` times the balancing method's weight, see ``mtlfast.balancing``).
On resume, rows and events after the checkpoint's step are dropped, so nothing is duplicated.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import defaultdict
from pathlib import Path

from ._runtime import Runtime, atomic_write_bytes

__all__ = ["RunLog", "draw_plots", "read_log"]

_HEADER = ["step", "time", "tag", "value"]


def read_log(path: str | Path) -> list[dict]:
    """The rows of a ``log.csv``: dicts with int step, float time, str tag, float value."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append(
                    {
                        "step": int(r["step"]),
                        "time": float(r["time"]),
                        "tag": r["tag"],
                        "value": float(r["value"]),
                    }
                )
            except (KeyError, TypeError, ValueError):
                continue  # a row cut short by a crash
    return rows


class RunLog:
    """Appends scalars to ``run_dir/log.csv`` and TensorBoard (main process only).

    ``resume_step``: the step of the checkpoint a resumed run starts from; rows after it are
    dropped from the CSV and TensorBoard purges its events after it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        runtime: Runtime,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.path = Path(run_dir) / "log.csv"
        self.writer = None
        self.start = time.time()
        self._file = None
        if not runtime.is_main:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_log(self.path) if r["step"] <= resume_step]
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(_HEADER)
            for r in kept:
                w.writerow([r["step"], f"{r['time']:.3f}", r["tag"], repr(r["value"])])
            atomic_write_bytes(self.path, buf.getvalue())
            if kept:
                self.start -= max(r["time"] for r in kept)
        elif not self.path.exists() or resume_step is None:
            atomic_write_bytes(self.path, ",".join(_HEADER) + "\n")
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (open for the whole run; closed by close())
        self._csv = csv.writer(self._file)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                runtime.warn(
                    "tensorboard is not installed: logging to log.csv only "
                    "(pip install tensorboard, or train.tensorboard=false)"
                )
            else:
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Logs ``values`` (tag -> number) at ``step``; non-finite numbers are kept as nan/inf."""
        if self._file is None:
            return
        now = time.time() - self.start
        for tag, v in values.items():
            v = float(v)
            self._csv.writerow([step, f"{now:.3f}", tag, repr(v)])
            if self.writer is not None:
                self.writer.add_scalar(tag, v, step)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _ema(values: list[float], alpha: float = 0.2) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def draw_plots(run_dir: str | Path, references: dict[str, dict] | None = None) -> list[Path]:
    """PNG plots of ``run_dir/log.csv`` in ``run_dir/plots``: ``train_loss.png`` (each task's
    unweighted training loss, raw and smoothed), ``learning_rate.png``, ``val_metrics.png``
    (each task's delta_m metric over steps, with ``references``, name -> task -> {metric:
    value}, as dashed lines, e.g. the constant predictor and the single-task networks) and
    ``task_weights.png`` when weights were logged. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..metrics import DEFAULT_METRIC, LOWER_IS_BETTER

    run_dir = Path(run_dir)
    rows = read_log(run_dir / "log.csv")
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        if math.isfinite(r["value"]):
            series[r["tag"]][0].append(r["step"])
            series[r["tag"]][1].append(r["value"])
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def save(fig, name):
        path = out_dir / name
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)

    # final tasks only: deep-supervision losses (tags with a further '/') stay in the CSV
    losses = sorted(t for t in series if t.startswith("train/loss/") and t.count("/") == 2)
    if losses:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, tag in enumerate(losses):
            steps, values = series[tag]
            colour = f"C{i % 10}"
            ax.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
            # about 20 points' worth of memory whatever the run's length; short runs barely smoothed
            ax.plot(
                steps,
                _ema(values, min(1.0, 20 / len(values))),
                color=colour,
                label=tag.removeprefix("train/loss/"),
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (unweighted; smoothed and raw)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "train_loss.png")
    if "train/lr" in series:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*series["train/lr"])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        save(fig, "learning_rate.png")
    tasks = sorted({t.split("/")[1] for t in series if t.startswith("val/") and t.count("/") == 2})
    tasks = [t for t in tasks if f"val/{t}/{DEFAULT_METRIC.get(t, '')}" in series]
    if tasks:
        n = len(tasks)
        cols = min(n, 3)
        nrows = (n + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            metric = DEFAULT_METRIC[task]
            ax.plot(*series[f"val/{task}/{metric}"], marker="o", ms=3, label="this run")
            for j, (name, results) in enumerate((references or {}).items()):
                value = (results or {}).get(task, {}).get(metric)
                if value is not None:
                    ax.axhline(value, ls="--", lw=1, color=f"C{j + 1}", label=name)
            better = "lower" if metric in LOWER_IS_BETTER else "higher"
            ax.set_title(f"{task}: {metric} ({better} is better)", fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        save(fig, "val_metrics.png")
    weights = sorted(t for t in series if t.startswith("train/weight/"))
    if weights:
        fig, ax = plt.subplots(figsize=(7, 4))
        for tag in weights:
            ax.plot(*series[tag], label=tag.removeprefix("train/weight/"))
        ax.set_xlabel("step")
        ax.set_ylabel("task weight")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "task_weights.png")
    return written
