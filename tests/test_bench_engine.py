"""Smoke test of benchmarks/bench_engine.py: it imports, a tiny configuration of every case runs,
and its figures, report and plot come out of a pytest-benchmark JSON."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks import bench_engine, engine_models, report

TINY = {"n": 2, "size": (32, 32), "output_stride": 32}


def _grads(case):
    step, _ = bench_engine.make_step(case, max_tasks=2)
    trunk, heads = bench_engine.network(2, case.size, case.output_stride)
    for p in [*trunk.parameters(), *heads.parameters()]:
        p.grad = None
    step()
    return [p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]]


def test_strategies_run_and_agree():
    """Every strategy of the benchmark trains the same tiny network to the same gradients."""
    naive, *others = [
        _grads(bench_engine.Case(strategy, 2, **TINY)) for strategy in bench_engine.STRATEGIES
    ]
    for grads in others:
        torch.testing.assert_close(grads, naive, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", bench_engine.PARTIAL_STRATEGIES)
def test_partial_labels_and_memory(strategy):
    case = bench_engine.Case(strategy, 3, "one_per_sample", **TINY)
    step, param_bytes = bench_engine.make_step(case, max_tasks=3)
    step()
    memory = bench_engine.measure_memory(step)
    assert memory["peak_extra_bytes"] > 0 and memory["saved_bytes"] > 0
    assert param_bytes > 23_000_000 * 4  # the ResNet-50 trunk at least


def test_trunk_shape():
    trunk = engine_models.resnet50_trunk(16)
    assert len(trunk) == engine_models.TRUNK_BLOCKS == 17
    with torch.no_grad():
        assert trunk.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


def test_cases():
    quick = bench_engine.cases(quick=True)
    assert {c.tasks for c in quick if c.labels == "all"} == set(bench_engine.QUICK_TASKS)
    assert {c.size for c in quick} == {bench_engine.QUICK_SIZE}
    full = bench_engine.cases(quick=False)
    assert len(full) == 3 * 5 + 4 and full[0].strategy == "naive"


def _fake_results():
    benchmarks = []
    for labels, strategies, ts in (
        ("all", bench_engine.STRATEGIES, (1, 2, 4)),
        ("one_per_sample", bench_engine.PARTIAL_STRATEGIES, (7,)),
    ):
        for t in ts:
            for strategy in strategies:
                peak = {
                    "naive": 100 + 10 * t,
                    "recompute": 50,
                    "checkpoint": 60 + 10 * t,
                    "naive_all_rows": 100,
                    "recompute_all_rows": 50,
                }
                seconds = {"naive": 1.0, "recompute": 1.3, "checkpoint": 1.25}
                if labels != "all":
                    seconds = {
                        "naive_all_rows": 2.5,
                        "naive": 2.0,
                        "recompute": 1.0,
                        "recompute_all_rows": 1.5,
                    }
                info = {
                    "suite": "engine",
                    "strategy": strategy,
                    "T": t,
                    "labels": labels,
                    "n": 4,
                    "size": [256, 256],
                    "output_stride": 16,
                    "segments": 4,
                    "device_name": "test CPU",
                    "param_bytes": 1000 * t,
                    "peak_extra_bytes": peak[strategy] * 2**20,
                    "saved_bytes": 1,
                    "other_cpu_fraction": 0.0,
                }
                benchmarks.append({"extra_info": info, "stats": {"median": seconds[strategy]}})
    return {"machine_info": {"torch": "x", "other_cpu_fraction": 0.01}, "benchmarks": benchmarks}


def test_report_and_figures(tmp_path):
    data = _fake_results()
    figures = report.engine_figures(data)
    assert figures["peak_extra_bytes"]["naive"] == {
        "1": 110 * 2**20,
        "2": 120 * 2**20,
        "4": 140 * 2**20,
    }
    met = {t["name"]: t["met"] for t in figures["targets"]}
    assert all(met.values()), met
    lines = report.render({}, {}, False, figures)
    assert any("targets engine: PASS: partial labels T=7" in line for line in lines)
    assert "every head on every sample (naive_all_rows) / recompute (lazy) time: 2.50x" in lines
    assert lines[-1].startswith("Targets: ")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: the plot is not tested")
    json_path, png_path = bench_engine.write_figures(str(path))
    assert json.loads(Path(json_path).read_text())["partial"]["recompute"]["step_s"] == 1.0
    assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
