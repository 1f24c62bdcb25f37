"""Benchmarks of ``mtlfast.ops.task_se`` against ASTMT's per-task loop, eager PyTorch and
``torch.compile``.

Cases, all in one session so that their ratios are fair:

* shapes: the tail of an SE-ResNet bottleneck (SE gating with reduction 16, + residual, ReLU) at
  (C, H, W) in (2048,7,7), (1024,14,14), (512,28,28), (256,56,56), for T in {1, 5, 10} tasks.
  The batch is ASTMT's: B images, each task's copy of them, N = B*T samples with task ids
  0..T-1 (copy t is samples t*B..(t+1)*B-1); random values, as the copies differ after the first
  task-specific layer. B=2 on CPU (float32 NCHW, and channels-last at (512,28,28), T=5); B=16 on
  CUDA (float32 and bfloat16, NCHW and that channels-last case) when it is available;
* impls: every backend ``mtlfast.ops.available_backends(device)`` lists except ``reference``
  (forced through ``MTLFAST_BACKEND``); ``eager_loop``: ASTMT's way without batching, T separate
  SE modules each run on its own task's copy of the batch (:class:`EagerLoop`);
  ``eager`` (``mtlfast.ops.reference.task_se``, plain PyTorch with autograd) and ``compile``
  (``torch.compile`` of that same function, compiled and warmed up, backward included, before
  timing). Triton on CPU is its interpreter, a correctness tool, and is left out. All four
  compute the same function with the same weights;
* modes: ``forward`` under ``torch.no_grad``, and ``forward_backward``: x, residual and the
  parameters require grad, and ``torch.autograd.grad(out, inputs, grad_out)`` with a fixed
  random ``grad_out`` computes all their grads.

Timing, rounds and quick mode (here: (2048,7,7) at T=1 and T=5) as in
``benchmarks/bench_attention_distill.py``, whose docstring also defines the figures stored in
``extra_info``. Here ``shape`` is x's [N, C, H, W], ``T`` the number of tasks, ``variant``
"T=<T>" (and "channels_last"), and ``bytes`` the traffic of the fused kernels' passes over x:
forward: x read twice (pooling, then gating), residual read and out written, 4 x-sized tensors;
backward: its two passes (gate gradient, input gradient) each read grad_out, x and residual and
write one x-sized grad (grad_residual, grad_x), 8 more. The parameters (T, C, R) count once per
read or write (forward: read; backward: read and their grads written); they are not negligible at
7x7. The (N, C) pooled means are left out.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from benchmarks import harness
from mtlfast.ops import BACKENDS, reference, task_se

REDUCTION = 16
# (C, H, W), smallest first: the bottlenecks' last stage of SE-ResNet-50's four stages.
SHAPES = ((2048, 7, 7), (1024, 14, 14), (512, 28, 28), (256, 56, 56))
TASKS = (1, 5, 10)
CHANNELS_LAST = ((512, 28, 28), 5)  # the one (shape, T) also benchmarked channels-last
QUICK = (((2048, 7, 7), 1), ((2048, 7, 7), 5))
IMAGES = {"cpu": 2, "cuda": 16}
MODES = ("forward", "forward_backward")
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}
BASELINES = ("eager_loop", "eager", "compile")


@dataclass(frozen=True)
class Case:
    """One benchmark: an impl of the op in one mode on inputs of one shape, task count, layout,
    dtype and device."""

    device: str
    dtype: torch.dtype
    chw: tuple[int, int, int]
    tasks: int
    channels_last: bool
    mode: str
    impl: str

    @property
    def n(self) -> int:
        return IMAGES[self.device] * self.tasks

    @property
    def hidden(self) -> int:
        return self.chw[0] // REDUCTION

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def variant(self) -> str:
        return f"T={self.tasks}" + (" channels_last" if self.channels_last else "")

    @property
    def id(self) -> str:
        layout = "-cl" if self.channels_last else ""
        shape = "x".join(map(str, self.chw)) + f"-T{self.tasks}{layout}"
        return f"{self.device}-{self.dtype_name}-{shape}-{self.mode}-{self.impl}"

    @property
    def group(self) -> str:
        shape = "x".join(map(str, (self.n, *self.chw)))
        return f"{self.device} {self.dtype_name} {shape} {self.variant} {self.mode}"

    def bytes_moved(self) -> int:
        """Bytes the fused kernels read and write (module docstring, ``bytes``)."""
        c, h, w = self.chw
        r = self.hidden
        x = self.n * c * h * w
        params = self.tasks * (2 * r * c + r + c)
        numel = 4 * x + params if self.mode == "forward" else 12 * x + 3 * params
        return numel * self.dtype.itemsize


def impls(device: str) -> list[str]:
    return [*harness.fused_backends(device), *BASELINES]


def cases(quick: bool) -> list[Case]:
    """Every benchmark of the session, those sharing inputs next to each other."""
    layouts = [(chw, t, False) for chw in SHAPES for t in TASKS] + [(*CHANNELS_LAST, True)]
    selected = [(chw, t, False) for chw, t in QUICK] if quick else layouts
    return [
        Case(device, dtype, chw, t, channels_last, mode, impl)
        for device in harness.devices()
        for dtype in DTYPES[device]
        for chw, t, channels_last in selected
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


@functools.lru_cache(maxsize=1)
def inputs(
    device: str, dtype: torch.dtype, chw: tuple[int, int, int], tasks: int, channels_last: bool
) -> tuple:
    """x, residual, task, (w1, b1, w2, b2), grad_out; kept for the consecutive cases sharing
    them."""
    c, h, w = chw
    n, r = IMAGES[device] * tasks, c // REDUCTION
    generator = torch.Generator(device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def randn():
        x = torch.randn((n, c, h, w), generator=generator, device=device, dtype=dtype)
        return x.contiguous(memory_format=fmt)

    def uniform(fan_in, *shape):  # nn.Linear's default initialisation, as TaskSE's
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return (2 * u - 1) / fan_in**0.5

    params = (
        uniform(c, tasks, r, c),
        uniform(c, tasks, r),
        uniform(r, tasks, c, r),
        uniform(r, tasks, c),
    )
    task = torch.arange(tasks, device=device).repeat_interleave(IMAGES[device])
    return randn(), randn(), task, params, randn()


def case_inputs(case: Case) -> tuple:
    return inputs(case.device, case.dtype, case.chw, case.tasks, case.channels_last)


class SELayer(nn.Module):
    """Hu et al.'s squeeze-and-excitation block, as ASTMT's release writes it."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y


class EagerLoop(nn.Module):
    """ASTMT's task-specific SE without batching: task t's SELayer (the weights w1[t], b1[t],
    w2[t], b2[t]) on its own copy of the batch, then the bottleneck's tail (+= residual, ReLU),
    the T outputs concatenated."""

    def __init__(self, w1, b1, w2, b2) -> None:
        super().__init__()
        tasks, hidden, channels = w1.shape
        self.se = nn.ModuleList(SELayer(channels, hidden) for _ in range(tasks))
        self.to(w1.device, w1.dtype)
        with torch.no_grad():
            for t, layer in enumerate(self.se):
                for param, value in zip(layer.parameters(), (w1[t], b1[t], w2[t], b2[t])):
                    param.copy_(value)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        b = x.shape[0] // len(self.se)
        outs = []
        for t, layer in enumerate(self.se):
            out = layer(x[t * b : (t + 1) * b])
            out += residual[t * b : (t + 1) * b]
            outs.append(torch.relu_(out))
        return torch.cat(outs)


def make_impl(case: Case) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], list]:
    """``case.impl`` as a function of (x, residual), and the parameters it uses; fused backends
    are forced by the caller."""
    _, _, task, params, _ = case_inputs(case)
    if case.impl == "eager_loop":
        loop = EagerLoop(*params)
        return loop, list(loop.parameters())
    if case.impl == "eager":
        fn = reference.task_se
    elif case.impl == "compile":
        # A fresh cache per case: every case compiles its own static-shape graphs and never
        # reaches dynamo's recompile limit, past which it would silently run eager.
        torch._dynamo.reset()
        fn = torch.compile(reference.task_se, fullgraph=True, dynamic=False)
    else:
        fn = task_se
    leaves = [p.detach().requires_grad_() for p in params]
    return (lambda x, residual: fn(x, task, *leaves, residual, True)), leaves


def make_call(case: Case) -> Callable[[], None]:
    """One synchronized call of ``case.impl`` in ``case.mode`` on the case's inputs."""
    x, residual, _, _, grad_out = case_inputs(case)
    op, params = make_impl(case)

    if case.mode == "forward":

        def forward():
            with torch.no_grad():
                op(x, residual)
            harness.synchronize(case.device)

        return forward

    leaves = [x.detach().requires_grad_(), residual.detach().requires_grad_()]

    def forward_backward():
        out = op(*leaves)
        torch.autograd.grad(out, [*leaves, *params], grad_out)
        harness.synchronize(case.device)

    return forward_backward


def test_task_se(benchmark, case, budget, copy_bandwidth, monkeypatch):
    if case.impl in BACKENDS:
        # The environment variable rather than use_backend(): it also holds on autograd's
        # worker threads (see bench_attention_distill.py).
        monkeypatch.setenv("MTLFAST_BACKEND", case.impl)
    benchmark.group = case.group
    harness.measure(
        benchmark,
        make_call(case),
        device=case.device,
        nbytes=case.bytes_moved(),
        budget=budget,
        copy_bandwidth=copy_bandwidth,
        op="task_se",
        impl=case.impl,
        mode=case.mode,
        shape=[case.n, *case.chw],
        dtype=case.dtype_name,
        T=case.tasks,
        variant=case.variant,
    )


@pytest.mark.parametrize("mode", MODES)
def test_bytes_moved(mode):
    """The traffic model at C=16 (R=1), 1x1, T=1, B=2: x-sized tensors of 32 elements (4 in
    forward, 12 in forward_backward) and the parameters' 49 elements (once, three times)."""
    case = Case("cpu", torch.float32, (16, 1, 1), 1, False, mode, "eager")
    xs, params = {"forward": (4, 1), "forward_backward": (12, 3)}[mode]
    assert case.bytes_moved() == 4 * (xs * 32 + params * 49)


@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "channels_last"))
def test_eager_loop_matches_op(channels_last):
    """EagerLoop computes task_se with residual and ReLU: same output and same grads (on CPU, in
    float64 so that the different orders of summation agree to float64's default tolerance)."""
    case = Case("cpu", torch.float64, (64, 8, 8), 3, channels_last, "forward_backward", "")
    x, residual, task, params, grad_out = case_inputs(case)
    loop = EagerLoop(*params)
    xl, rl = x.detach().requires_grad_(), residual.detach().requires_grad_()
    out = loop(xl, rl)
    grads = torch.autograd.grad(out, [xl, rl, *loop.parameters()], grad_out)
    per_task = [torch.stack(grads[2 + i :: 4]) for i in range(4)]  # w1, b1, w2, b2 over tasks
    leaves = [t.detach().requires_grad_() for t in (x, residual, *params)]
    expected = task_se(leaves[0], task, *leaves[2:], leaves[1], relu=True)
    torch.testing.assert_close(
        (out, *grads[:2], *per_task),
        (expected, *torch.autograd.grad(expected, leaves, grad_out)),
    )
