"""resize_bilinear against F.interpolate(mode="bilinear", align_corners=False)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mtlfast.ops import resize as resize_module
from mtlfast.ops import resize_bilinear, use_backend

SHAPES = [  # (N, C, H, W) -> (h, w): up, down, odd factors, one-pixel sides, non-square
    ((2, 3, 8, 8), (32, 32)),
    ((1, 5, 7, 9), (29, 13)),
    ((3, 2, 1, 1), (5, 7)),
    ((2, 4, 16, 12), (5, 3)),
    ((1, 1, 64, 64), (256, 256)),
    ((2, 3, 5, 6), (1, 1)),
    ((1, 2, 1, 17), (3, 1)),
]


def _aten(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("shape", "size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_interpolate_forward_and_backward(shape, size, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    grad = torch.randn(shape[0], shape[1], *size, generator=g, dtype=dtype)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = resize_bilinear(a, size), _aten(b, size)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, atol=tol * 10, rtol=tol)
    assert ya.dtype == dtype


def test_bfloat16_close_to_interpolate():
    x = torch.randn(2, 3, 16, 16)
    got = resize_bilinear(x.bfloat16(), (64, 48))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _aten(x, (64, 48)), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x.transpose(2, 3),
        lambda x: x[:, ::2],
        lambda x: x[:1].expand(3, -1, -1, -1),
        lambda x: x.contiguous(memory_format=torch.channels_last)[:, 1:3],
    ],
    ids=["channels_last", "transposed", "strided", "expanded", "channels_last_slice"],
)
def test_any_strides(make):
    x = make(torch.randn(3, 4, 10, 10))
    torch.testing.assert_close(resize_bilinear(x, (23, 17)), _aten(x, (23, 17)))


@pytest.mark.parametrize(("shape", "size"), SHAPES)
@pytest.mark.parametrize("grad_format", ["channels_last", "contiguous"])
def test_channels_last_in_channels_last_out(shape, size, grad_format):
    """A channels-last x is resized over its NHWC storage: result and gradient channels-last (as
    aten's), equal to F.interpolate, whatever the layout of the incoming gradient."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape[0], shape[1], *size, generator=g, dtype=torch.float64)
    if grad_format == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    a = x.clone(memory_format=torch.channels_last).requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = resize_bilinear(a, size), _aten(b, size)
    torch.testing.assert_close(ya, yb, atol=1e-12, rtol=1e-12)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-11, rtol=1e-12)
    if not a.is_contiguous():  # C = 1 or 1x1 maps: both layouts at once, either result will do
        assert ya.is_contiguous(memory_format=torch.channels_last)
        assert a.grad.is_contiguous(memory_format=torch.channels_last)


def test_contiguous_x_gets_a_contiguous_gradient_from_a_channels_last_one():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    grad = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = resize_bilinear(x, (32, 32))
    assert y.is_contiguous()
    y.backward(grad)
    assert x.grad.is_contiguous()
    (expected,) = torch.autograd.grad(_aten(x, (32, 32)), x, grad)
    torch.testing.assert_close(x.grad, expected)


def test_gradcheck():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_bilinear(t, (7, 9)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: resize_bilinear(t, (7, 9)), (x,))
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: resize_bilinear(t, (7, 9)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: resize_bilinear(t, (3, 2)), (x,))


def test_saves_no_activation():
    """The backward is the adjoint: the graph keeps no tensor of the input's or output's size."""
    saved = []
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        resize_bilinear(x, (64, 64)).sum().backward()
    assert saved == []


def test_same_size_is_identity_and_autocast_keeps_dtype():
    x = torch.randn(1, 2, 8, 8)
    assert resize_bilinear(x, (8, 8)) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resize_bilinear(x, (16, 16)).dtype == torch.float32


def test_falls_back_to_aten(monkeypatch):
    """Long sides and the reference backend go to F.interpolate itself."""
    calls = []
    real = resize_module._ResizeBilinear.apply
    monkeypatch.setattr(
        resize_module._ResizeBilinear, "apply", lambda *a: calls.append(1) or real(*a)
    )
    resize_bilinear(torch.randn(1, 1, 8, 8), (16, 16))
    assert calls == [1]
    resize_bilinear(torch.randn(1, 1, 128, 8), (130, 16))
    resize_bilinear(torch.randn(1, 1, 8, 8), (512, 16))
    with use_backend("reference"):
        resize_bilinear(torch.randn(1, 1, 8, 8), (16, 16))
    assert calls == [1]


@pytest.mark.parametrize(
    ("x", "size", "match"),
    [
        (torch.randn(2, 8, 8), (4, 4), "x must be a 4-d tensor"),
        ("image", (4, 4), "x must be a 4-d tensor"),
        (torch.randn(1, 1, 8, 8), (0, 4), "size must be two positive ints"),
        (torch.randn(1, 1, 8, 8), (4,), "size must be two positive ints"),
    ],
)
def test_errors_name_the_argument(x, size, match):
    with pytest.raises(ValueError, match=match):
        resize_bilinear(x, size)
