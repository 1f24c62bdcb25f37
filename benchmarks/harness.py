"""Measurement helpers shared by the benchmark suites: devices and fused backends to benchmark,
device names, timing, copy bandwidth, peak memory, the round budget, and one benchmark's run."""

from __future__ import annotations

import functools
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import malloc_env as _malloc
from mtlfast import profiling

__all__ = [
    "FULL",
    "MALLOC_ENV",
    "QUICK",
    "Budget",
    "CpuTimes",
    "copy_gbps",
    "device_name",
    "devices",
    "fused_backends",
    "is_quick",
    "malloc_env",
    "measure",
    "peak_mem_bytes",
    "synchronize",
    "time_once",
]

# glibc's malloc settings the CPU benchmarks run under: defined in benchmarks/malloc_env.py
# (the Makefile reads them there too); recorded with each run by benchmarks/conftest.py.
MALLOC_ENV = _malloc.MALLOC_ENV


def malloc_env() -> dict[str, str | None]:
    """The values of :data:`MALLOC_ENV`'s variables in this process's environment."""
    return _malloc.current()


@dataclass(frozen=True)
class Budget:
    """How long to time one benchmark: about ``seconds`` of timed rounds, within the bounds."""

    seconds: float
    min_rounds: int
    max_rounds: int

    def rounds(self, seconds_per_call: float) -> int:
        """Rounds that fit ``seconds`` for a call taking ``seconds_per_call``, clamped."""
        wanted = math.ceil(self.seconds / max(seconds_per_call, 1e-9))
        return max(self.min_rounds, min(self.max_rounds, wanted))


FULL = Budget(seconds=1.0, min_rounds=3, max_rounds=1000)
QUICK = Budget(seconds=0.1, min_rounds=2, max_rounds=5)


def is_quick(config) -> bool:
    """Quick mode: pytest's ``--quick`` (benchmarks/conftest.py), or ``MTLFAST_BENCH_QUICK`` set
    to anything but empty or 0."""
    env = os.environ.get("MTLFAST_BENCH_QUICK", "").strip()
    return bool(config.getoption("--quick")) or env not in ("", "0")


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used by the whole machine and by this process (with its reaped children)."""

    wall: float
    machine_busy: float | None  # None where /proc/stat is missing
    own: float

    @staticmethod
    def now() -> CpuTimes:
        own = sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        )
        return CpuTimes(time.monotonic(), _machine_busy_seconds(), own)

    def other_fraction_since(self) -> float | None:
        """Share of the machine's CPU time since ``self`` used by other work than this process
        (other processes, and the hypervisor's steal): timings are unreliable when it is large."""
        end = CpuTimes.now()
        if self.machine_busy is None or end.machine_busy is None:
            return None
        capacity = (end.wall - self.wall) * (os.cpu_count() or 1)
        other = (end.machine_busy - self.machine_busy) - (end.own - self.own)
        return max(0.0, other / capacity) if capacity > 0 else None


def _machine_busy_seconds() -> float | None:
    """Busy CPU seconds of all cores since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


INTERPRETED = frozenset({("cpu", "triton")})  # (device, backend) pairs only run in an interpreter


def devices() -> list[str]:
    """cpu, and cuda when torch sees a GPU."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def fused_backends(device: str) -> list[str]:
    """The mtlfast backends benchmarked on ``device``: every one ``available_backends`` lists here
    but ``reference`` and interpreted ones (Triton on CPU is a correctness tool)."""
    from mtlfast.ops import available_backends

    backends = available_backends(device)
    return [b for b in backends if b != "reference" and (device, b) not in INTERPRETED]


@functools.cache
def device_name(device: str) -> str:
    """The CUDA device's name, or the CPU model (/proc/cpuinfo) and torch's thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def time_once(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn`` (which synchronizes its device itself)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_gbps(device: str, nbytes: int, budget: Budget) -> float:
    """GB/s (1e9 bytes) of ``dst.copy_(src)`` on ``device`` moving ``nbytes`` in all.

    src and dst hold ``nbytes / 2`` each, so the copy reads and writes as many bytes as the
    benchmarked call and has the same working set. The best of ``budget``'s rounds after one
    warm-up: the yardstick is what the device can do, and the best round is the one least
    disturbed by other work.
    """
    numel = max(1, nbytes // 8)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)

    def copy():
        dst.copy_(src)
        synchronize(device)

    rounds = budget.rounds(time_once(copy))
    seconds = min(time_once(copy) for _ in range(rounds))
    return 2 * src.nbytes / seconds / 1e9


def peak_mem_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory allocated during one call of ``fn`` beyond what was allocated before it:
    ``peak_extra_bytes`` of :func:`mtlfast.profiling.memory` (CUDA: the caching allocator's peak
    statistic; CPU: the peak of the running sum of the allocation and free events the profiler
    records over the call)."""
    with profiling.memory(device, saved_tensors=False) as stats:
        fn()
    return stats.peak_extra_bytes


def measure(
    benchmark,
    call: Callable[[], object],
    *,
    device: str,
    nbytes: int,
    budget: Budget,
    copy_bandwidth: Callable[[str, int], float],
    **info,
) -> None:
    """Benchmark ``call`` (one synchronized call of an impl) as bench_attention_distill.py does.

    One untimed call first (lazy initialisation, compilation of forward and backward), two timed
    to size the rounds by ``budget`` (by the slower: one call made fast or slow by other work on
    the machine must not size a run of 1000 slow rounds), one for the peak memory; then
    pytest-benchmark's rounds, those four calls being their warm-up. ``extra_info`` gets ``info``
    and the figures of the docstring of ``benchmarks/bench_attention_distill.py``: device,
    device_name, bytes (``nbytes``, the ideal traffic), peak_mem_bytes, gbps, copy_gbps,
    copy_fraction.
    """
    call()
    seconds = max(time_once(call), time_once(call))
    peak = peak_mem_bytes(call, device)
    benchmark.extra_info.update(
        info, device=device, device_name=device_name(device), bytes=nbytes, peak_mem_bytes=peak
    )
    benchmark.pedantic(call, rounds=budget.rounds(seconds), warmup_rounds=0)
    if not benchmark.stats:  # --benchmark-disable: one plain call, nothing measured
        return
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    copy = copy_bandwidth(device, nbytes)
    benchmark.extra_info.update(gbps=gbps, copy_gbps=copy, copy_fraction=gbps / copy)
