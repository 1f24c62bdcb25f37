"""Benchmarks of ``mtlfast.ops.skip_fusion`` against UberNet's naive head, eager PyTorch and
``torch.compile``.

Cases, all in one session so that their ratios are fair:

* fusions: N=4 images' score maps of C=21 channels (PASCAL VOC semantic segmentation), fused to
  an output of (128, 128), and for ``vgg`` also of C=40 channels (NYUD semantic segmentation):
  - ``vgg``: UberNet's K=6 VGG skip layers C1..C6 (a 1024 image at output stride 8), of
    (128,128), (64,64), (32,32), (16,16), (16,16), (16,16);
  - ``pyramid``: K=3 layers of (128,128), (96,96), (64,64);
  - ``sweep``: K in {1, 2, 4, 6} layers of (64,64) each, to show peak memory against K;
* devices: ``cpu`` (float32), and ``cuda`` (float32, bfloat16) when it is available;
* impls: every backend ``mtlfast.ops.available_backends(device)`` lists except ``reference``
  (forced through ``MTLFAST_BACKEND``); ``naive_head``: the head as people write it (every layer
  interpolated to full size, concatenated along channels, a 1x1 convolution: :func:`naive_head`);
  ``eager`` (``mtlfast.ops.reference.skip_fusion``, plain PyTorch with autograd) and ``compile``
  (``torch.compile`` of that same function, compiled and warmed up, backward included, before
  timing). Triton on CPU is its interpreter, a correctness tool, and is left out;
* modes: ``forward`` under ``torch.no_grad``, and ``forward_backward``: scores, weight and bias
  require grad, and ``torch.autograd.grad(out, inputs, grad_out)`` with a fixed random
  ``grad_out`` computes all their grads.

Timing, rounds and quick mode (here: the sweep's K=1 and K=2) as in
``benchmarks/bench_attention_distill.py``, whose docstring also defines the figures stored in
``extra_info``. Here ``shape`` is the output's [N, C, H, W]; ``K`` and ``layers`` (each layer's
[H_k, W_k]) describe the fusion, ``variant`` labels it; ``bytes`` is the traffic of ideal fused
kernels, each reading its inputs once and writing its outputs once. forward: the scores, weight
and bias read, out written. forward_backward: that, plus grad_out, the scores and weight read
and grad_scores, grad_weight and grad_bias written.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from mtlfast.ops import BACKENDS, reference, skip_fusion

N = 4
SIZE = (128, 128)
MODES = ("forward", "forward_backward")
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}
BASELINES = ("naive_head", "eager", "compile")


@dataclass(frozen=True)
class Fusion:
    """K layers of scores, of sizes ``layers``, fused to ``SIZE``."""

    name: str
    layers: tuple[tuple[int, int], ...]

    @property
    def k(self) -> int:
        return len(self.layers)

    @property
    def label(self) -> str:
        sizes = ",".join(str(h) if h == w else f"{h}x{w}" for h, w in self.layers)
        return f"K={self.k} {self.name}: {sizes}"


def sweep(k: int) -> Fusion:
    return Fusion("sweep", ((64, 64),) * k)


VGG = Fusion("vgg", ((128, 128), (64, 64), (32, 32), (16, 16), (16, 16), (16, 16)))
PYRAMID = Fusion("pyramid", ((128, 128), (96, 96), (64, 64)))
PASCAL, NYUD = 21, 40  # score channels: semantic classes (with background) of each dataset
FUSIONS = (*((PASCAL, f) for f in (VGG, PYRAMID, *map(sweep, (1, 2, 4, 6)))), (NYUD, VGG))
QUICK_FUSIONS = ((PASCAL, sweep(1)), (PASCAL, sweep(2)))


@dataclass(frozen=True)
class Case:
    """One benchmark: an impl of the op in one mode on inputs of one fusion of ``channels`` score
    channels, dtype and device."""

    device: str
    dtype: torch.dtype
    channels: int
    fusion: Fusion
    mode: str
    impl: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def id(self) -> str:
        fusion = f"c{self.channels}-{self.fusion.name}{self.fusion.k}"
        return f"{self.device}-{self.dtype_name}-{fusion}-{self.mode}-{self.impl}"

    @property
    def group(self) -> str:
        fusion = f"C={self.channels} {self.fusion.label}"
        return f"{self.device} {self.dtype_name} {fusion} {self.mode}"

    def numels(self) -> tuple[int, int, int, int]:
        """Elements of out, of all the scores, of weight and of bias."""
        c = self.channels
        layers = sum(h * w for h, w in self.fusion.layers)
        return N * c * SIZE[0] * SIZE[1], N * c * layers, self.fusion.k * c, c

    def bytes_moved(self) -> int:
        """Bytes ideal fused kernels read and write (module docstring, ``bytes``)."""
        out, scores, weight, bias = self.numels()
        forward = scores + weight + bias + out
        backward = out + scores + weight + scores + weight + bias
        numel = forward if self.mode == "forward" else forward + backward
        return numel * self.dtype.itemsize


def impls(device: str) -> list[str]:
    return [*harness.fused_backends(device), *BASELINES]


def cases(quick: bool) -> list[Case]:
    """Every benchmark of the session, those sharing inputs next to each other."""
    return [
        Case(device, dtype, channels, fusion, mode, impl)
        for device in harness.devices()
        for dtype in DTYPES[device]
        for channels, fusion in (QUICK_FUSIONS if quick else FUSIONS)
        for mode in MODES
        for impl in impls(device)
    ]


@pytest.fixture(scope="module")
def budget(budget: harness.Budget) -> harness.Budget:
    """Half the shared budget's seconds of rounds: the full CPU runs of this suite and its
    sibling (bench_skip_fusion.py, bench_task_se.py) stay near 6 minutes together on 2 cores."""
    return dataclasses.replace(budget, seconds=budget.seconds / 2)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        selected = cases(harness.is_quick(metafunc.config))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])
    if "fused" in metafunc.fixturenames:
        fused = [(d, b) for d in harness.devices() for b in harness.fused_backends(d)]
        params = [pytest.param(f, id=f"{f[0]}-{f[1]}") for f in fused] or [
            pytest.param(None, marks=pytest.mark.skip(reason="no compiled mtlfast backend here"))
        ]
        metafunc.parametrize("fused", params)


@functools.lru_cache(maxsize=1)
def inputs(device: str, dtype: torch.dtype, c: int, fusion: Fusion) -> tuple:
    """scores (K tensors), weight, bias, grad_out; kept for the consecutive cases sharing them."""
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    scores = [randn(N, c, h, w) for h, w in fusion.layers]
    return scores, randn(fusion.k, c), randn(c), randn(N, c, *SIZE)


def naive_head(
    scores: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """UberNet's head as usually written: every layer's scores interpolated to full size, the
    maps concatenated along channels, then a 1x1 convolution. Concatenated channel by channel
    (channel c of every layer side by side) and grouped per channel (groups=C), the convolution
    computes exactly ``skip_fusion``'s per-channel combination of layers."""
    k, c = weight.shape
    ups = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in scores]
    stacked = torch.stack(ups, dim=2).flatten(1, 2)  # (N, C*K, H, W)
    return F.conv2d(stacked, weight.T.reshape(c, k, 1, 1), bias, groups=c)


def make_op(impl: str) -> Callable[..., torch.Tensor]:
    """The function benchmarked as ``impl``; fused backends are forced by the caller."""
    if impl == "naive_head":
        return naive_head
    if impl == "eager":
        return reference.skip_fusion
    if impl == "compile":
        # A fresh cache per case: every case compiles its own static-shape graphs and never
        # reaches dynamo's recompile limit, past which it would silently run eager.
        torch._dynamo.reset()
        return torch.compile(reference.skip_fusion, fullgraph=True, dynamic=False)
    return skip_fusion


def make_call(case: Case, op: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """One synchronized call of ``op`` in ``case.mode`` on the case's inputs."""
    scores, weight, bias, grad_out = inputs(case.device, case.dtype, case.channels, case.fusion)

    if case.mode == "forward":

        def forward():
            with torch.no_grad():
                op(scores, weight, bias, SIZE)
            harness.synchronize(case.device)

        return forward

    leaves = [t.detach().requires_grad_() for t in (*scores, weight, bias)]
    *score_leaves, weight_leaf, bias_leaf = leaves

    def forward_backward():
        out = op(score_leaves, weight_leaf, bias_leaf, SIZE)
        torch.autograd.grad(out, leaves, grad_out)
        harness.synchronize(case.device)

    return forward_backward


def test_skip_fusion(benchmark, case, budget, copy_bandwidth, monkeypatch):
    if case.impl in BACKENDS:
        # The environment variable rather than use_backend(): it also holds on autograd's
        # worker threads (see bench_attention_distill.py).
        monkeypatch.setenv("MTLFAST_BACKEND", case.impl)
    benchmark.group = case.group
    harness.measure(
        benchmark,
        make_call(case, make_op(case.impl)),
        device=case.device,
        nbytes=case.bytes_moved(),
        budget=budget,
        copy_bandwidth=copy_bandwidth,
        op="skip_fusion",
        impl=case.impl,
        mode=case.mode,
        shape=[N, case.channels, *SIZE],
        dtype=case.dtype_name,
        K=case.fusion.k,
        layers=[list(hw) for hw in case.fusion.layers],
        variant=case.fusion.label,
    )


@pytest.mark.parametrize("mode", MODES)
def test_bytes_moved(mode):
    """The traffic model on one layer as large as the output (K=1): forward 2 maps (scores, out)
    and 2 vectors of C (weight, bias); forward_backward 5 maps and 5 vectors."""
    case = Case("cpu", torch.float32, PASCAL, Fusion("one", (SIZE,)), mode, "eager")
    maps, vectors = {"forward": (2, 2), "forward_backward": (5, 5)}[mode]
    assert case.bytes_moved() == 4 * PASCAL * (maps * N * SIZE[0] * SIZE[1] + vectors)


@pytest.mark.parametrize("fusion", (VGG, PYRAMID), ids=lambda f: f.name)
def test_naive_head_matches_op(fusion):
    """naive_head computes skip_fusion: same output and same grads (on CPU, in float64 so that
    the different orders of summation agree to float64's default tolerance)."""
    scores, weight, bias, grad_out = inputs("cpu", torch.float64, PASCAL, fusion)
    results = []
    for op in (naive_head, skip_fusion):
        leaves = [t.detach().requires_grad_() for t in (*scores, weight, bias)]
        out = op(leaves[:-2], leaves[-2], leaves[-1], SIZE)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    torch.testing.assert_close(*results)


def test_fused_memory_flat_in_k(fused, monkeypatch):
    """The fused forward_backward's peak extra memory, less the outputs and grads that must
    exist, is the same at K=6 as at K=1 (within 10%, plus 1/16 of the output for small per-layer
    workspaces): no full-size map per layer, unlike naive_head."""
    device, backend = fused
    monkeypatch.setenv("MTLFAST_BACKEND", backend)
    extra = {}
    for k in (1, 6):
        case = Case(device, torch.float32, PASCAL, sweep(k), "forward_backward", backend)
        call = make_call(case, skip_fusion)
        call()
        required = sum(case.numels()) * case.dtype.itemsize  # out, the grads of the inputs
        extra[k] = harness.peak_mem_bytes(call, device) - required
    out_bytes = case.numels()[0] * case.dtype.itemsize
    assert extra[6] <= 1.1 * extra[1] + out_bytes / 16, extra
