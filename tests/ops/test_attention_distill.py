"""attention_distill: every backend against the reference, gradients, opcheck, bad input."""

import pytest
import torch

from mtlfast.ops import attention_distill, reference, use_backend
from tests.conftest import require_backend
from tests.ops.conftest import LAYOUTS, make

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_BACKENDS = ("reference", "cpu", "triton")
SIZES = ((1, 1, 1), (1, 7, 5), (144, 7, 5), (3, 1, 1))


def inputs(n, t, chw, dtype, layouts, device="cpu", requires_grad=False):
    f = make((n, t, *chw), dtype, layouts[0], device)
    m = make((n, t, t - 1, *chw), dtype, layouts[1], device, scale=2.0)
    v = make((n, t, t - 1, *chw), dtype, layouts[2], device)
    for x in (f, m, v):
        x.requires_grad_(requires_grad)
    return f, m, v


def check_forward_backward(backend, f, m, v, device="cpu"):
    tol = TOL[f.dtype]
    expected = reference.attention_distill(f, m, v)
    grad = torch.randn(expected.shape, dtype=f.dtype, device=device)
    exp_gm, exp_gv = reference.attention_distill_backward(grad, m, v)
    with use_backend(backend):
        out = attention_distill(f, m, v)
        gf, gm, gv = torch.autograd.grad(out, (f, m, v), grad)
    assert out.dtype == f.dtype and out.shape == f.shape
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(gf, grad, rtol=0, atol=0)
    torch.testing.assert_close(gm, exp_gm, **tol)
    torch.testing.assert_close(gv, exp_gv, **tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chw", SIZES, ids=str)
@pytest.mark.parametrize("t", (2, 3, 5))
def test_matches_reference(backend, dtype, chw, t):
    require_backend(backend)
    f, m, v = inputs(2, t, chw, dtype, ("contiguous",) * 3, requires_grad=True)
    check_forward_backward(backend, f, m, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layouts",
    [(l, l, l) for l in LAYOUTS]
    + [
        ("contiguous", "channels_last", "outer_strided"),
        ("inner_strided", "contiguous", "channels_last"),
    ],
    ids="-".join,
)
def test_any_strides(backend, dtype, layouts):
    require_backend(backend)
    f, m, v = inputs(3, 3, (5, 7, 5), dtype, layouts, requires_grad=True)
    check_forward_backward(backend, f, m, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_block_and_batch(backend):
    require_backend(backend)
    f, m, v = inputs(3, 5, (18, 16, 17), torch.float32, ("contiguous",) * 3, requires_grad=True)
    check_forward_backward(backend, f, m, v)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpu_backward_large_enough_to_stream(dtype):
    # gradients of 8 MiB and more, in memory already mapped in from the calls before, are written
    # with streaming stores (csrc/cpu/stream.h): the same values as ordinary ones, odd tail included
    require_backend("cpu")
    f, m, v = inputs(1, 2, (4, 1024, 1031), dtype, ("contiguous",) * 3, requires_grad=True)
    for _ in range(3):
        check_forward_backward("cpu", f, m, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    require_backend(backend)
    f, m, v = inputs(0, 3, (4, 5, 5), torch.float32, ("contiguous",) * 3)
    with use_backend(backend):
        assert attention_distill(f, m, v).shape == f.shape


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_gradcheck_float64(backend):
    require_backend(backend)
    f, m, v = inputs(
        2,
        3,
        (2, 3, 2),
        torch.float64,
        ("contiguous", "channels_last", "outer_strided"),
        requires_grad=True,
    )
    with use_backend(backend):
        assert torch.autograd.gradcheck(attention_distill, (f, m, v))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_opcheck(backend):
    require_backend(backend)
    for layouts in (("contiguous",) * 3, ("channels_last", "outer_strided", "contiguous")):
        f, m, v = inputs(2, 3, (3, 5, 4), torch.float32, layouts, requires_grad=True)
        g = torch.randn(f.shape)
        with use_backend(backend):
            torch.library.opcheck(torch.ops.mtlfast.attention_distill.default, (f, m, v))
            torch.library.opcheck(
                torch.ops.mtlfast.attention_distill_backward.default, (g, m.detach(), v.detach())
            )


def test_backward_saves_only_inputs():
    f, m, v = inputs(2, 3, (4, 5, 5), torch.float32, ("contiguous",) * 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        attention_distill(f, m, v)
    assert len(saved) == 2
    assert all(any(s.data_ptr() == x.data_ptr() for x in (m, v)) for s in saved)


def test_compile_fullgraph():
    f, m, v = inputs(2, 3, (4, 5, 5), torch.float32, ("contiguous",) * 3)
    compiled = torch.compile(attention_distill, fullgraph=True)
    torch.testing.assert_close(
        compiled(f, m, v), reference.attention_distill(f, m, v), **TOL[torch.float32]
    )


# ---- bad input -----------------------------------------------------------------------------


def good():
    return inputs(2, 3, (4, 5, 5), torch.float32, ("contiguous",) * 3)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda f, m, v: (f[0], m, v), ValueError, r"feats must have shape \(N, T, C, H, W\)"),
        (
            lambda f, m, v: (f, m[:, :, :1], v),
            ValueError,
            r"mask_logits must have shape \(N, T, T-1, C, H, W\)",
        ),
        (lambda f, m, v: (f, m, v[..., :4]), ValueError, r"messages must have shape"),
        (
            lambda f, m, v: (f[:1], m, v),
            ValueError,
            r"mask_logits must have shape .* to match feats",
        ),
        (lambda f, m, v: (f[:, :1], m[:, :1, :0], v[:, :1, :0]), ValueError, r"T >= 2"),
        (lambda f, m, v: (f.long(), m, v), TypeError, r"feats must be a floating-point tensor"),
        (
            lambda f, m, v: (f, m.int(), v),
            TypeError,
            r"mask_logits must be a floating-point tensor",
        ),
        (
            lambda f, m, v: (f, m.double(), v),
            TypeError,
            r"mask_logits has dtype torch.float64 but feats has torch.float32",
        ),
        (
            lambda f, m, v: (f, m, v.to("meta")),
            ValueError,
            r"messages is on meta but feats is on cpu",
        ),
        (lambda f, m, v: (f.numpy(), m, v), TypeError, r"feats must be a torch.Tensor"),
    ],
)
def test_bad_input(mutate, error, match):
    with pytest.raises(error, match=match):
        attention_distill(*mutate(*good()))


# ---- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layouts",
    [(l, l, l) for l in LAYOUTS] + [("contiguous", "channels_last", "outer_strided")],
    ids="-".join,
)
@pytest.mark.parametrize("chw", SIZES + ((18, 64, 64), (256, 33, 31)), ids=str)
def test_gpu_matches_reference(backend, dtype, layouts, chw):
    require_backend(backend, "cuda")
    f, m, v = inputs(2, 5, chw, dtype, layouts, device="cuda", requires_grad=True)
    check_forward_backward(backend, f, m, v, device="cuda")


@pytest.mark.gpu
def test_gpu_picks_compiled_backend():
    from mtlfast.ops import available_backends

    assert available_backends("cuda")[0] in ("cuda", "triton")
