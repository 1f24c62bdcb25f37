"""task_se: every backend against the reference, gradients, opcheck, bad input."""

import pytest
import torch

from mtlfast.ops import reference, task_se, use_backend
from tests.conftest import require_backend

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}
# Parameter gradients are sums over whole maps and batches.
SUM_TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 4e-2, "atol": 4e-2},
    torch.float64: TOL[torch.float64],
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_BACKENDS = ("reference", "cpu", "triton")


def make_inputs(
    n, chw, t, dtype, residual=True, layout="contiguous", device="cpu", grad=True, r=None
):
    c, h, w = chw
    r = r or max(c // 4, 1)

    def act():
        x = torch.randn(n, c, h, w, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.randn(n, c, h, 2 * w, dtype=dtype, device=device)[..., ::2]
        return x.requires_grad_(grad)

    x = act()
    task = torch.arange(n, device=device) % t
    params = [
        (torch.randn(s, dtype=torch.float32, device=device) * 0.5).to(dtype).requires_grad_(grad)
        for s in ((t, r, c), (t, r), (t, c, r), (t, c))
    ]
    return x, task, params, act() if residual else None


def check(backend, x, task, params, residual, relu):
    dtype = x.dtype
    expected = reference.task_se(x, task, *params, residual=residual, relu=relu)
    leaves = [x, *params] + ([residual] if residual is not None else [])
    grad = torch.randn(expected.shape, dtype=dtype, device=x.device)
    exp_grads = torch.autograd.grad(expected, leaves, grad)
    with use_backend(backend):
        out = task_se(x, task, *params, residual=residual, relu=relu)
        grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    for i, (g, e) in enumerate(zip(grads, exp_grads)):
        torch.testing.assert_close(
            g,
            e,
            **(SUM_TOL[dtype] if 1 <= i <= 4 else TOL[dtype]),
            msg=lambda m, i=i: f"grad {i}: {m}",
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chw", ((1, 1, 1), (3, 7, 5), (5, 1, 1), (64, 9, 11)), ids=str)
@pytest.mark.parametrize(
    "residual, relu", [(False, False), (True, True), (True, False), (False, True)]
)
def test_matches_reference(backend, dtype, chw, residual, relu):
    require_backend(backend)
    check(backend, *make_inputs(5, chw, 3, dtype, residual), relu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ("channels_last", "strided"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(backend, layout, dtype):
    require_backend(backend)
    check(backend, *make_inputs(4, (16, 6, 5), 2, dtype, True, layout), True)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("chw", ((8, 300, 301), (150, 3, 5)), ids=str)
def test_cpu_schedules_and_chunks(layout, chw):
    """The cpu kernels' cuts: the by-sample schedule with planes split into chunks (300x301), and
    the by-pass one with channel counts off the vector width (150)."""
    require_backend("cpu")
    check("cpu", *make_inputs(3, chw, 2, torch.float32, True, layout, r=10), True)


@pytest.mark.parametrize("chw", ((16, 30, 30), (512, 7, 7)), ids=("by_sample", "by_pass"))
def test_cpu_same_bits_whatever_the_threads(chw):
    require_backend("cpu")
    x, task, params, res = make_inputs(5, chw, 3, torch.float32, r=8)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with use_backend("cpu"):
                out = task_se(x, task, *params, residual=res, relu=True)
                results.append(
                    [out, *torch.autograd.grad(out, [x, *params, res], torch.ones_like(out))]
                )
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_task_for_the_batch(backend):
    require_backend(backend)
    x, task, params, res = make_inputs(3, (8, 5, 5), 4, torch.float32)
    check(backend, x, torch.full_like(task, 2), params, res, True)


def test_task_batched_pass_equals_single_task_passes():
    """ASTMT's T single-task passes as one batched pass."""
    t = 4
    x, _, params, _ = make_inputs(2, (8, 5, 6), t, torch.float32, residual=False, grad=False)
    batched = task_se(x.repeat(t, 1, 1, 1), torch.arange(t).repeat_interleave(2), *params)
    singles = [task_se(x, torch.full((2,), k), *params) for k in range(t)]
    torch.testing.assert_close(batched, torch.cat(singles))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("residual, relu", [(True, True), (True, False), (False, False)])
def test_gradcheck_float64(backend, residual, relu):
    require_backend(backend)
    x, task, params, res = make_inputs(3, (4, 3, 2), 2, torch.float64, residual)
    extra = (res,) if residual else ()
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, *a: task_se(x, task, *a[:4], residual=a[4] if residual else None, relu=relu),
            (x, *params, *extra),
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("relu", (True, False))
def test_backward_keeps_the_output_not_the_residual(backend, relu):
    """The residual is never kept for backward (a projection shortcut's batch-norm output would
    stay alive for nothing else); with ReLU the output is, for the mask (a bottleneck's output
    is the next block's input, kept by its convolutions anyway)."""
    require_backend(backend)
    x, task, params, res = make_inputs(2, (8, 5, 6), 3, torch.float32)
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with use_backend(backend), hooks:
        out = task_se(x, task, *params, residual=res, relu=relu)
    kept = {t.data_ptr() for t in saved}
    assert res.data_ptr() not in kept
    assert (out.data_ptr() in kept) == relu
    assert x.data_ptr() in kept
    if relu:  # as torch.relu's output: changed in place, backward refuses it, never a wrong mask
        with use_backend(backend):
            out = task_se(x, task, *params, residual=res, relu=True)
        out.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_opcheck(backend):
    require_backend(backend)
    with use_backend(backend):
        for layout in ("contiguous", "channels_last"):
            x, task, params, res = make_inputs(4, (6, 5, 3), 3, torch.float32, True, layout)
            torch.library.opcheck(torch.ops.mtlfast.task_se.default, (x, task, *params, res, True))
            torch.library.opcheck(
                torch.ops.mtlfast.task_se.default, (x, task, *params, None, False)
            )


def test_compile_fullgraph():
    x, task, params, res = make_inputs(4, (6, 5, 3), 3, torch.float32, True, grad=False)
    fn = torch.compile(
        lambda x, r: task_se(x, task, *params, residual=r, relu=True), fullgraph=True
    )
    torch.testing.assert_close(
        fn(x, res), reference.task_se(x, task, *params, residual=res, relu=True)
    )


def good():
    x, task, params, res = make_inputs(2, (4, 3, 3), 2, torch.float32, grad=False)
    return [x, task, *params, res]


def _with(i, value):
    args = good()
    args[i] = value(args[i]) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda: _with(0, lambda x: x[0]), ValueError, r"x must have shape \(N, C, H, W\)"),
        (lambda: _with(1, lambda t: t.int()), TypeError, "task must be an int64 tensor"),
        (lambda: _with(1, lambda t: t.float()), TypeError, "task must be an int64 tensor"),
        (lambda: _with(1, lambda t: t[:1]), ValueError, r"task must have shape \(N,\) = \(2,\)"),
        (lambda: _with(1, torch.tensor([0, 2])), ValueError, r"task indices must lie in \[0, 2\)"),
        (lambda: _with(1, torch.tensor([-1, 0])), ValueError, r"task indices must lie in \[0, 2\)"),
        (lambda: _with(3, lambda b: b[:1]), ValueError, r"b1 must have shape \(2, 1\)"),
        (lambda: _with(4, lambda w: w[:, :3]), ValueError, r"w2 must have shape \(2, 4, 1\)"),
        (lambda: _with(6, lambda r: r[:, :3]), ValueError, "residual must have the shape of x"),
        (lambda: _with(6, lambda r: r.double()), TypeError, "residual has dtype torch.float64"),
        (lambda: _with(0, lambda x: x.long()), TypeError, "x must be a floating-point tensor"),
    ],
)
def test_bad_input(args, error, match):
    x, task, w1, b1, w2, b2, res = args()
    with pytest.raises(error, match=match):
        task_se(x, task, w1, b1, w2, b2, residual=res)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("chw", ((1, 1, 1), (3, 7, 5), (256, 14, 14), (2048, 7, 7)), ids=str)
def test_gpu_matches_reference(backend, dtype, layout, chw):
    require_backend(backend, "cuda")
    check(backend, *make_inputs(6, chw, 3, dtype, True, layout, device="cuda"), True)


# ---- issue 16: crashes and errors --------------------------------------------------------


def _zero_sized(r, c):
    torch.manual_seed(0)
    x = torch.randn(2, c, 3, 3, requires_grad=True)
    task = torch.tensor([0, 1])
    params = [torch.randn(s, requires_grad=True) for s in ((2, r, c), (2, r), (2, c, r), (2, c))]
    return x, task, params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "r, c, match",
    [(0, 4, r"w1 must have shape \(T, R, C\) with R >= 1"), (2, 0, r"x must have C >= 1 channels")],
    ids=("R=0", "C=0"),
)
def test_zero_hidden_units_or_channels_raise_naming_the_argument(backend, r, c, match):
    # R = 0 used to kill the process with SIGFPE on cpu; R = 0 / C = 0 backward raised IndexError.
    require_backend(backend)
    x, task, params = _zero_sized(r, c)
    with use_backend(backend), pytest.raises(ValueError, match=match):
        task_se(x, task, *params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "make_task",
    [lambda: torch.tensor([1]).expand(4), lambda: torch.tensor([0, 9, 1, 9, 1, 9, 0, 9])[::2]],
    ids=("expanded", "sliced"),
)
def test_task_of_any_strides(backend, make_task):
    require_backend(backend)
    x, _, params, res = make_inputs(4, (3, 2, 2), 2, torch.float32, grad=False)
    task = make_task()
    assert not task.is_contiguous()
    with use_backend(backend):
        out = task_se(x, task, *params, residual=res)
    torch.testing.assert_close(out, reference.task_se(x, task.contiguous(), *params, residual=res))


@pytest.mark.parametrize("dtype", (torch.float8_e4m3fn, torch.float8_e5m2), ids=str)
def test_float8_raises_naming_x(dtype):
    x, task, w1, b1, w2, b2, _ = good()
    with pytest.raises(
        TypeError,
        match=r"x must be a floating-point tensor \(float32, float16, bfloat16 or float64\)",
    ):
        task_se(x.to(dtype), task, w1, b1, w2, b2)
    with pytest.raises(TypeError, match="w1 must be a floating-point tensor"):
        task_se(x, task, w1.to(dtype), b1, w2, b2)


def test_meta_tensors_give_shapes():
    x, task, w1, b1, w2, b2, res = (t.to("meta") for t in good())
    out = task_se(x, task, w1, b1, w2, b2, residual=res)
    assert out.is_meta and out.shape == x.shape
