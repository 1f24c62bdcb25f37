"""channel_norm against torch.linalg.vector_norm over dim 1: values, gradients, dtypes, edges."""

from __future__ import annotations

import pytest
import torch

from mtlfast.ops import channel_norm, use_backend

from .conftest import make

LAYOUTS = ("contiguous", "channels_last", "inner_strided")
SHAPES = [(4, 3, 17, 9), (2, 1, 5, 5), (3, 256, 8, 8), (1, 3, 1, 1), (0, 3, 4, 4)]


def _aten(x):
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_vector_norm_forward_and_backward(shape, layout, dtype):
    torch.manual_seed(0)
    x = make(shape, dtype, layout)
    xa, xb = (x.detach().clone().requires_grad_() for _ in range(2))
    ya, yb = channel_norm(xa), _aten(xb)
    assert ya.shape == yb.shape and ya.dtype == yb.dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    grad = torch.randn_like(yb)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 4), (2, 3, 2, 3, 4)])
def test_other_ranks(shape):
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(channel_norm(x), _aten(x))


def test_zero_vectors_get_zero_gradient_like_vector_norm():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x[0, :, 1, 2] = 0
    x[1, :, :, 0] = 0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    channel_norm(xa).sum().backward()
    _aten(xb).sum().backward()
    assert torch.isfinite(xa.grad).all()
    assert (xa.grad[0, :, 1, 2] == 0).all() and (xa.grad[1, :, :, 0] == 0).all()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_nan_and_inf_propagate_as_in_vector_norm():
    x = torch.randn(1, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 1, 1] = float("inf")
    got, want = channel_norm(x), _aten(x)
    assert torch.isnan(got[0, 0, 0, 0]) and torch.isnan(want[0, 0, 0, 0])
    assert got[0, 0, 1, 1] == float("inf") == want[0, 0, 1, 1]
    torch.testing.assert_close(got, want, equal_nan=True)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_norm, (x,))
    assert torch.autograd.gradgradcheck(channel_norm, (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sums_in_fp32_returns_its_dtype(dtype):
    torch.manual_seed(1)
    x = torch.randn(2, 64, 6, 6).to(dtype)
    got = channel_norm(x)
    assert got.dtype == dtype
    want = _aten(x.double()).to(dtype)  # the exact norm, rounded once
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, _aten(x), atol=0, rtol=1e-2)


def test_autocast_matches_vector_norm_dtype():
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert channel_norm(x).dtype == _aten(x).dtype
        assert channel_norm(x.bfloat16()).dtype == _aten(x.bfloat16()).dtype


def test_reference_backend_is_vector_norm_itself(monkeypatch):
    calls = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(
        torch.linalg, "vector_norm", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x = torch.randn(2, 3, 4, 4)
    channel_norm(x)
    assert not calls
    with use_backend("reference"):
        channel_norm(x)
    assert calls == [1]


@pytest.mark.parametrize("bad", [torch.ones(2, 3, dtype=torch.long), torch.ones(3), "x"])
def test_bad_input_names_the_argument(bad):
    with pytest.raises(TypeError, match="channel_norm: x"):
        channel_norm(bad)
