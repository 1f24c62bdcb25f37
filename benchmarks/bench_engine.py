"""Benchmarks of ``mtlfast.engine.multi_branch_step``: peak memory and step time against the
number of tasks, for plain autograd, the recompute engine and ``torch.utils.checkpoint``.

Setup (``benchmarks/engine_models.py``): a ResNet-50 trunk in plain PyTorch (bottlenecks
[3, 4, 6, 3], 64..2048 channels, BN and ReLU, in train mode) at output stride 16 as DeepLab-v3
trains (the last stage dilated; its output (4, 2048, 16, 16)), as an ``nn.Sequential`` of its 17
top-level blocks; T task heads of three layers (conv3x3 2048->256, ReLU, conv3x3 256->256, ReLU,
conv1x1 256->C), each prediction upsampled bilinearly to the 256x256 image where its loss is
computed, as UberNet does; tasks ``t0``..``t15`` cycle through the six kinds of the synthetic
scenes (C = 21 semseg, 7 parts with cross-entropy; 1 saliency, 1 edge with BCE; 3 normals,
1 depth with L1). Batch of N=4 random 256x256 images, random targets, float32, CPU.

Cases, all in one session so that their ratios are fair:

* every sample labelled for every task, T in {1, 2, 4, 8, 16}, strategies:
  ``naive`` (``multi_branch_step(strategy="naive")``: plain autograd, one backward),
  ``recompute`` (the engine, UberNet Sec. 4: trunk under no_grad keeping round(sqrt(17)) = 4
  anchors, one branch at a time, then the trunk's backward recomputing its segments), and
  ``checkpoint`` (not an engine strategy: ``torch.utils.checkpoint.checkpoint_sequential`` over
  the trunk with 4 segments, non-reentrant, plain heads, one backward;
  :func:`engine_models.checkpoint_step`);
* partially labelled: T=7 tasks, sample i labelled for task ``t<i mod 7>`` only (so with the
  issue's batch of N=4 only four tasks have a label in the batch, each on one sample).
  ``recompute`` skips the tasks without labels and runs each head on its labelled sample only
  (lazy evaluation). ``naive_all_rows`` computes every head on every sample, forward and backward:
  ``naive`` given no labels (``labeled=None``), the work of a network without lazy evaluation
  that masks its losses (its losses take every row, a negligible difference); it is the issue's
  baseline. For reference: ``naive`` with the labels (the engine skips the three tasks without a
  label in both strategies, then runs each remaining head on every sample, each loss on its
  labelled rows), and ``recompute_all_rows``, ``recompute`` given no labels, whose time over
  ``recompute``'s is what lazy evaluation saves within the engine.

Each case: one untimed step (it also allocates every ``.grad``), one untimed step measured with
:func:`mtlfast.profiling.memory` (the profiler slows it: memory and time never come from the
same step), then pytest-benchmark's rounds (full: 1 warm-up and 3 rounds). Quick mode
(``--quick`` or ``MTLFAST_BENCH_QUICK=1``), a smoke test of the pipeline and not a measurement:
128x128 images, T in {1, 2} and the partial cases, no warm-up, 1 round. A step is the forward,
the backward, and the gradients accumulated into ``.grad`` (no optimizer).

Figures in each benchmark's ``extra_info`` (``benchmarks/report.py`` prints them and checks the
targets; ``python benchmarks/bench_engine.py --plot RESULTS.json`` writes them as
``memory_vs_tasks.json`` and plots ``memory_vs_tasks.png``):

* ``suite`` "engine", ``strategy``, ``T``, ``labels`` ("all" or "one_per_sample"), ``n``,
  ``size``, ``output_stride``, ``segments``, ``device``, ``device_name``;
* ``peak_extra_bytes``: the peak of the bytes allocated during the step above those allocated
  before it (``mtlfast.profiling.memory``; on CPU from the profiler's allocation events). The
  ``.grad`` of every parameter already exists (the untimed step made it), so it counts the
  activations, gradient signals and workspaces of the step, not the parameters' gradients, which
  every strategy needs alike: ``param_bytes`` gives their size (parameters of the trunk and the T
  heads; their ``.grad`` is as large);
* ``end_extra_bytes``: what the step left allocated (0: every ``.grad`` existed before);
* ``saved_bytes``: the bytes of the distinct tensors autograd saved for backward over the step,
  in total, not at once (the engine's recomputation saves each segment's activations anew). For
  ``checkpoint`` it leaves out what ``torch.utils.checkpoint`` handles with its own hooks (the
  checkpointed segments' tensors) and keeps (their inputs);
* ``step_s``: the time of a step, the fastest of the timed rounds (other work on a shared machine
  only ever adds time: the fastest round is the least disturbed one, as ``harness.copy_gbps``
  takes its best round); ``step_median_s``: their median; ``other_cpu_fraction``: the share of
  the machine's CPU that other work took during the timed rounds (harness.CpuTimes);
* ratios, once the cases they compare with have run: ``time_vs_naive`` and ``peak_vs_naive`` (the
  same T and labels), ``peak_vs_T1`` (the same strategy at T=1).

Targets (the issue's; report.py): recompute's peak at T=16 at most 1.15x its peak at T=1, while
naive's grows with T; recompute's step time at most 1.35x naive's at every T; with partial
labels, recompute (lazy) at least 2x faster than naive_all_rows (every head on every sample).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: python benchmarks/bench_engine.py --plot ...
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

from benchmarks import engine_models, harness, report
from mtlfast import profiling

N = 4
SIZE = (256, 256)
QUICK_SIZE = (128, 128)
OUTPUT_STRIDE = 16
TASKS = (1, 2, 4, 8, 16)
QUICK_TASKS = (1, 2)
STRATEGIES = ("naive", "recompute", "checkpoint")
PARTIAL_TASKS = 7
PARTIAL_STRATEGIES = ("naive_all_rows", "naive", "recompute", "recompute_all_rows")
ROUNDS = {"full": (1, 3), "quick": (0, 1)}  # (warm-up rounds, timed rounds)


@dataclass(frozen=True)
class Case:
    """One benchmark: a strategy's training step with T tasks, every sample labelled for every
    task ("all") or for one task each ("one_per_sample")."""

    strategy: str
    tasks: int
    labels: str = "all"
    n: int = N
    size: tuple[int, int] = SIZE
    output_stride: int = OUTPUT_STRIDE

    @property
    def id(self) -> str:
        return f"{self.labels}-T{self.tasks}-{self.strategy}"

    @property
    def group(self) -> str:
        size = "x".join(map(str, self.size))
        return f"engine cpu {self.n}x3x{size} os{self.output_stride} {self.labels} T={self.tasks}"

    @property
    def segments(self) -> int:
        return max(1, round(math.sqrt(engine_models.TRUNK_BLOCKS)))


def cases(quick: bool) -> list[Case]:
    """Every benchmark of the session: naive first for each T (the ratios' reference), T=1 first
    for each strategy."""
    size = QUICK_SIZE if quick else SIZE
    full = [Case(s, t, size=size) for t in (QUICK_TASKS if quick else TASKS) for s in STRATEGIES]
    partial = [Case(s, PARTIAL_TASKS, "one_per_sample", size=size) for s in PARTIAL_STRATEGIES]
    return full + partial


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        selected = cases(harness.is_quick(metafunc.config))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@functools.lru_cache(maxsize=1)
def network(tasks: int, size: tuple[int, int], output_stride: int):
    """The trunk and ``tasks`` heads, seeded, in train mode; kept for the session, as every case
    uses the first T of the same heads."""
    torch.manual_seed(0)
    trunk = engine_models.resnet50_trunk(output_stride).train()
    heads = engine_models.make_heads(tasks, size).train()
    return trunk, heads


def make_step(case: Case, max_tasks: int | None = None) -> tuple[Callable[[], object], int]:
    """One training step of ``case`` as a call, and the bytes of the parameters it trains."""
    trunk, all_heads = network(
        max(case.tasks, max_tasks or max(TASKS)), case.size, case.output_stride
    )
    names = list(engine_models.task_kinds(case.tasks))
    heads = {name: all_heads[name] for name in names}
    images, targets = engine_models.batch(case.tasks, case.n, case.size)
    losses = engine_models.loss_fns(case.tasks)
    labeled = None
    if case.labels == "one_per_sample" and not case.strategy.endswith("_all_rows"):
        labeled = engine_models.one_task_per_sample(case.tasks, case.n)
    params = [*trunk.parameters(), *(p for h in heads.values() for p in h.parameters())]
    param_bytes = sum(p.nbytes for p in params)

    if case.strategy == "checkpoint":

        def step():
            return engine_models.checkpoint_step(
                trunk, heads, images, targets, losses, labeled, segments=case.segments
            )

    else:
        from mtlfast.engine import multi_branch_step

        strategy = case.strategy.removesuffix("_all_rows")

        def step():
            return multi_branch_step(
                trunk,
                heads,
                images,
                targets,
                losses,
                labeled=labeled,
                strategy=strategy,
                segments=case.segments,
            )

    return step, param_bytes


def measure_memory(step: Callable[[], object]) -> dict[str, int | None]:
    """The figures of :func:`mtlfast.profiling.memory` over one step (module docstring)."""
    with profiling.memory("cpu") as stats:
        step()
    return {
        "peak_extra_bytes": stats.peak_extra_bytes,
        "end_extra_bytes": stats.end_extra_bytes,
        "saved_bytes": stats.saved_bytes,
    }


# (labels, strategy, T) -> (median step seconds or None, peak_extra_bytes) of this session's cases
_MEASURED: dict[tuple[str, str, int], tuple[float | None, int]] = {}


def ratios(case: Case, seconds: float | None, peak: int) -> dict[str, float]:
    """The case's ratios to the cases measured before it (module docstring)."""
    out = {}
    naive = _MEASURED.get((case.labels, "naive", case.tasks))
    if naive is not None and case.strategy != "naive":
        if seconds is not None and naive[0]:
            out["time_vs_naive"] = seconds / naive[0]
        if naive[1]:
            out["peak_vs_naive"] = peak / naive[1]
    single = _MEASURED.get((case.labels, case.strategy, 1))
    if single is not None and case.tasks != 1 and single[1]:
        out["peak_vs_T1"] = peak / single[1]
    return out


@pytest.fixture(scope="module")
def rounds(pytestconfig) -> tuple[int, int]:
    return ROUNDS["quick" if harness.is_quick(pytestconfig) else "full"]


def test_engine(benchmark, case, rounds):
    benchmark.group = case.group
    step, param_bytes = make_step(case)
    step()  # oneDNN's primitives, every .grad allocated
    memory = measure_memory(step)
    benchmark.extra_info.update(
        suite="engine",
        strategy=case.strategy,
        T=case.tasks,
        labels=case.labels,
        n=case.n,
        size=list(case.size),
        output_stride=case.output_stride,
        segments=case.segments,
        device="cpu",
        device_name=harness.device_name("cpu"),
        param_bytes=param_bytes,
        **memory,
    )
    warmup, timed = rounds
    start = harness.CpuTimes.now()
    benchmark.pedantic(step, rounds=timed, warmup_rounds=warmup, iterations=1)
    seconds = benchmark.stats.stats.min if benchmark.stats else None
    median = benchmark.stats.stats.median if benchmark.stats else None
    benchmark.extra_info.update(
        step_s=seconds, step_median_s=median, other_cpu_fraction=start.other_fraction_since()
    )
    benchmark.extra_info.update(ratios(case, seconds, memory["peak_extra_bytes"]))
    _MEASURED[(case.labels, case.strategy, case.tasks)] = (seconds, memory["peak_extra_bytes"])


# --- Figures: memory_vs_tasks.json and memory_vs_tasks.png ---


def plot(figures: dict, path: str) -> None:
    """Peak extra memory (MiB) against T, one line per strategy, from
    :func:`report.engine_figures`; written to ``path`` (PNG) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = {"naive": "o", "recompute": "s", "checkpoint": "^"}
    for strategy, by_t in figures["peak_extra_bytes"].items():
        ts = sorted(by_t, key=int)
        ax.plot(
            [int(t) for t in ts],
            [by_t[t] / 2**20 for t in ts],
            marker=markers.get(strategy, "x"),
            label=strategy,
        )
    ax.set_xscale("log", base=2)
    ts = sorted({int(t) for by_t in figures["peak_extra_bytes"].values() for t in by_t})
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tasks T")
    ax.set_ylabel("peak memory of a training step (MiB)")
    setup = figures.get("setup", {})
    ax.set_title(
        f"ResNet-50 trunk (output stride {setup.get('output_stride')}), 3-layer heads, "
        f"batch {setup.get('n')} at {'x'.join(map(str, setup.get('size', [])))}\n"
        "peak allocated above the model and its .grad, CPU, float32",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.text(
        0.01,
        0.01,
        f"{figures.get('device_name', '')}; torch {figures.get('torch', '?')}",
        fontsize=7,
        alpha=0.7,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_figures(results: str, out_dir: str | None = None) -> tuple[str, str]:
    """``memory_vs_tasks.json`` (:func:`report.engine_figures` of the pytest-benchmark JSON
    ``results``) and ``memory_vs_tasks.png`` (:func:`plot`) in ``out_dir`` (default: the
    directory of ``results``); returns their paths."""
    with open(results) as f:
        figures = report.engine_figures(json.load(f))
    if not figures["peak_extra_bytes"]:
        raise ValueError(f"{results}: no engine benchmark (benchmarks/bench_engine.py) in it")
    out_dir = out_dir or os.path.dirname(os.path.abspath(results))
    json_path = os.path.join(out_dir, "memory_vs_tasks.json")
    png_path = os.path.join(out_dir, "memory_vs_tasks.png")
    with open(json_path, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
        f.write("\n")
    plot(figures, png_path)
    return json_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Figures of the engine benchmarks.")
    parser.add_argument(
        "--plot",
        metavar="RESULTS.json",
        required=True,
        help="pytest-benchmark JSON of a run of benchmarks/bench_engine.py",
    )
    parser.add_argument(
        "--out-dir",
        help="where to write memory_vs_tasks.{json,png} (default: next to RESULTS.json)",
    )
    args = parser.parse_args(argv)
    for path in write_figures(args.plot, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
