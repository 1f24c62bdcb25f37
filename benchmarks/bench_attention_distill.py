"""Benchmarks of ``mtlfast.ops.attention_distill`` against eager PyTorch and ``torch.compile``.

Cases, all in one session so that their ratios are fair:

* shapes: N=8 images, T=5 tasks, and (C, H, W) of MTI-Net's HRNet-18 scales (18,64,64),
  (36,32,32), (72,16,16), (144,8,8), and of PAD-Net (256,64,64);
* devices: ``cpu`` (float32), and ``cuda`` (float32, bfloat16) when it is available;
* impls: every backend ``mtlfast.ops.available_backends(device)`` lists except ``reference``
  (forced through ``MTLFAST_BACKEND``), plus ``eager`` (``mtlfast.ops.reference.attention_distill``,
  plain PyTorch with autograd) and ``compile`` (``torch.compile`` of that same function, compiled
  and warmed up, backward included, before timing). Triton on CPU is its interpreter, a
  correctness tool, and is left out;
* modes: ``forward`` under ``torch.no_grad``, and ``forward_backward``: the three inputs require
  grad, the forward is followed by ``torch.autograd.grad(out, inputs, grad_out)`` with a fixed
  random ``grad_out``, so every impl computes all three grads. That runs the same kernels as
  ``out.backward(grad_out)`` into ``.grad`` fields reset to None each round, without the clone of
  ``grad_out`` into ``feats.grad`` that ``backward`` makes because the benchmark keeps it alive.

Each timed call synchronizes its device before returning. Rounds: about a second of them per
benchmark (3 to 1000, after one untimed round); quick mode (``--quick`` or
``MTLFAST_BENCH_QUICK=1``) runs the two smallest shapes with 2 to 5 rounds.

Figures stored in each benchmark's ``extra_info`` (``benchmarks/report.py`` prints them):

* ``device``, ``device_name`` (CPU model and torch's thread count, or the CUDA device name),
  ``impl``, ``mode``, ``shape`` ([N, T, C, H, W]), ``dtype``;
* ``bytes``: the traffic of an ideal fused kernel, every input read once and every output
  written once. forward: feats + mask_logits + messages read, out written.
  forward_backward: that, plus grad_out + mask_logits + messages read and grad_mask_logits +
  grad_messages written (grad_feats is grad_out itself and costs nothing);
* ``gbps``: ``bytes`` / median time, in 1e9 bytes per second;
* ``copy_gbps``: bandwidth of ``dst.copy_(src)`` on the same device moving the same ``bytes``
  (src and dst of ``bytes / 2`` each), the best of its rounds, measured in the same session;
* ``copy_fraction``: ``gbps / copy_gbps``, how close the impl runs to a plain copy;
* ``peak_mem_bytes``: peak memory allocated during one call beyond the inputs (and grad_out)
  already allocated; the outputs count, e.g. a fused forward allocates exactly its output.
  CUDA: the caching allocator's peak statistic; CPU: the peak of the running sum of the
  profiler's allocation and free events.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from benchmarks import harness
from mtlfast.ops import BACKENDS, attention_distill, available_backends, reference

N, T = 8, 5
# (C, H, W), smallest first: HRNet-18's four scales in MTI-Net, then PAD-Net's.
SHAPES = ((144, 8, 8), (72, 16, 16), (36, 32, 32), (18, 64, 64), (256, 64, 64))
QUICK_SHAPES = SHAPES[:2]
MODES = ("forward", "forward_backward")
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}
BASELINES = ("eager", "compile")
INTERPRETED = {("cpu", "triton")}  # (device, backend) pairs that only run in an interpreter


@dataclass(frozen=True)
class Case:
    """One benchmark: an impl of the op in one mode on inputs of one shape, dtype and device."""

    device: str
    dtype: torch.dtype
    chw: tuple[int, int, int]
    mode: str
    impl: str

    @property
    def shape_label(self) -> str:
        return "x".join(map(str, self.chw))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def group(self) -> str:
        return f"{self.device} {self.dtype_name} {self.shape_label} {self.mode}"

    @property
    def id(self) -> str:
        return f"{self.device}-{self.dtype_name}-{self.shape_label}-{self.mode}-{self.impl}"

    def bytes_moved(self) -> int:
        """Bytes an ideal fused kernel reads and writes (module docstring, ``bytes``)."""
        c, h, w = self.chw
        feats = N * T * c * h * w * self.dtype.itemsize  # feats, out, grad_out
        pairs = feats * (T - 1)  # mask_logits, messages and their grads
        forward = 2 * feats + 2 * pairs
        return forward if self.mode == "forward" else forward + feats + 4 * pairs


def devices() -> list[str]:
    """cpu, and cuda when torch sees a GPU."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def impls(device: str) -> list[str]:
    """The fused backends that run on ``device`` here (but ``reference``), then the baselines."""
    fused = [
        b for b in available_backends(device) if b != "reference" and (device, b) not in INTERPRETED
    ]
    return [*fused, *BASELINES]


def cases(quick: bool) -> list[Case]:
    """Every benchmark of the session, those sharing inputs next to each other."""
    shapes = QUICK_SHAPES if quick else SHAPES
    return [
        Case(device, dtype, chw, mode, impl)
        for device in devices()
        for dtype in DTYPES[device]
        for chw in shapes
        for mode in MODES
        for impl in impls(device)
    ]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        selected = cases(harness.is_quick(metafunc.config))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@functools.lru_cache(maxsize=1)
def inputs(device: str, dtype: torch.dtype, chw: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """feats, mask_logits, messages, grad_out; kept for the consecutive cases that share them."""
    c, h, w = chw
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    feats, grad_out = randn(N, T, c, h, w), randn(N, T, c, h, w)
    return feats, randn(N, T, T - 1, c, h, w), randn(N, T, T - 1, c, h, w), grad_out


def make_op(impl: str) -> Callable[..., torch.Tensor]:
    """The function benchmarked as ``impl``; fused backends are forced by the caller."""
    if impl == "eager":
        return reference.attention_distill
    if impl == "compile":
        # A fresh cache per case: every case compiles its own static-shape graphs and never
        # reaches dynamo's recompile limit, past which it would silently run eager.
        torch._dynamo.reset()
        return torch.compile(reference.attention_distill, fullgraph=True, dynamic=False)
    return attention_distill


def make_call(case: Case, op: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """One synchronized call of ``op`` in ``case.mode`` on the case's inputs."""
    feats, mask_logits, messages, grad_out = inputs(case.device, case.dtype, case.chw)

    if case.mode == "forward":

        def forward():
            with torch.no_grad():
                op(feats, mask_logits, messages)
            harness.synchronize(case.device)

        return forward

    leaves = tuple(t.detach().requires_grad_() for t in (feats, mask_logits, messages))

    def forward_backward():
        out = op(*leaves)
        torch.autograd.grad(out, leaves, grad_out)
        harness.synchronize(case.device)

    return forward_backward


def test_attention_distill(benchmark, case, budget, copy_bandwidth, monkeypatch):
    if case.impl in BACKENDS:
        # The environment variable rather than use_backend(): autograd runs the backward of
        # CUDA tensors on its own worker thread, which does not see the caller's contextvars.
        monkeypatch.setenv("MTLFAST_BACKEND", case.impl)
    call = make_call(case, make_op(case.impl))
    call()  # lazy initialisation; compilation of forward and backward for "compile"
    seconds = harness.time_once(call)
    peak = harness.peak_mem_bytes(call, case.device)

    nbytes = case.bytes_moved()
    benchmark.group = case.group
    benchmark.extra_info.update(
        op="attention_distill",
        device=case.device,
        device_name=harness.device_name(case.device),
        impl=case.impl,
        mode=case.mode,
        shape=[N, T, *case.chw],
        dtype=case.dtype_name,
        bytes=nbytes,
        peak_mem_bytes=peak,
    )
    benchmark.pedantic(call, rounds=budget.rounds(seconds), warmup_rounds=1)
    if not benchmark.stats:  # --benchmark-disable: one plain call, nothing measured
        return
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    copy_gbps = copy_bandwidth(case.device, nbytes)
    benchmark.extra_info.update(gbps=gbps, copy_gbps=copy_gbps, copy_fraction=gbps / copy_gbps)


@pytest.mark.parametrize("mode", MODES)
def test_bytes_moved(mode):
    """The traffic model on a tiny case: 10 (forward) and 27 (forward_backward) feats-sized
    tensors of float32 at T=5."""
    case = Case("cpu", torch.float32, (1, 1, 1), mode, "eager")
    feats = N * T * 4
    assert case.bytes_moved() == {"forward": 10, "forward_backward": 27}[mode] * feats
