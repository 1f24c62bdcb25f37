"""Shared setup of the benchmark suites (``benchmarks/bench_*.py``, run with pytest-benchmark).

Quick mode (``--quick`` or ``MTLFAST_BENCH_QUICK=1``): the suites' smallest cases and few
rounds, a smoke test of the whole pipeline rather than a measurement.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness


def pytest_addoption(parser):
    parser.addoption(
        "--quick",
        action="store_true",
        help="mtlfast benchmarks: smallest cases and few rounds only (also MTLFAST_BENCH_QUICK=1)",
    )


def pytest_collect_file(file_path, parent):
    # pytest's default pattern (test_*.py) misses bench_*.py when a directory is collected;
    # a file named on the command line is collected by pytest itself.
    is_bench = file_path.suffix == ".py" and file_path.name.startswith("bench_")
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_CPU_AT_START = pytest.StashKey[harness.CpuTimes]()


def pytest_sessionstart(session):
    session.config.stash[_CPU_AT_START] = harness.CpuTimes.now()


def pytest_benchmark_update_machine_info(config, machine_info):
    from mtlfast import _extension

    start = config.stash.get(_CPU_AT_START, None)
    machine_info["other_cpu_fraction"] = start.other_fraction_since() if start else None
    machine_info["torch"] = torch.__version__
    machine_info["malloc_env"] = harness.malloc_env()
    machine_info["cuda"] = torch.version.cuda
    machine_info["mtlfast_cpu_isa"] = _extension.cpu_isa()
    machine_info["mtlfast_extension_error"] = _extension.extension_error()


@pytest.fixture(scope="session")
def budget(pytestconfig) -> harness.Budget:
    """How long each benchmark is timed."""
    return harness.QUICK if harness.is_quick(pytestconfig) else harness.FULL


@pytest.fixture(scope="session")
def copy_bandwidth():
    """``copy_bandwidth(device, nbytes)``: GB/s of a plain device copy moving ``nbytes``,
    measured once per (device, nbytes) in this session (see :func:`harness.copy_gbps`) with the
    full budget, quick mode or not: it is cheap next to the benchmarks and is their yardstick."""
    cache: dict[tuple[str, int], float] = {}

    def get(device: str, nbytes: int) -> float:
        key = (device, nbytes)
        if key not in cache:
            cache[key] = harness.copy_gbps(device, nbytes, harness.FULL)
        return cache[key]

    return get
