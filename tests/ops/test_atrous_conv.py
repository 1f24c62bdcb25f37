"""atrous_conv2d against F.conv2d with the same dilation and 'same' padding."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mtlfast.ops import atrous_conv as atrous_module
from mtlfast.ops import atrous_conv2d, use_backend

from .conftest import make

# (N, C, H, W) has one outer dim: conftest's outer_strided needs two
LAYOUTS = ("contiguous", "channels_last", "inner_strided")

CASES = [  # (N, C_in, H, W), C_out, k, dilation: taps path (cover <= 0.4) unless marked
    ((4, 8, 16, 16), 5, 3, 18),  # only the centre tap: a 1x1 convolution
    ((4, 8, 16, 16), 5, 3, 12),  # edges on 4 of 16 rows / columns
    ((2, 3, 7, 11), 4, 3, 5),  # non-square, odd sides
    ((1, 6, 9, 30), 2, 3, 9),  # dilation = H: the vertical taps read padding only
    ((2, 4, 13, 13), 3, 5, 4),  # a 5x5 kernel
    ((3, 2, 1, 1), 3, 3, 1),  # 1x1 maps
    ((2, 4, 16, 16), 3, 3, 6),  # cover 0.56: one F.conv2d
    ((2, 4, 9, 9), 3, 3, 2),  # ordinary dilated convolution: F.conv2d
]


def _aten(x, w, d, b=None):
    return F.conv2d(x, w, b, padding=d * (w.shape[-1] // 2), dilation=d)


@pytest.mark.parametrize(("shape", "cout", "k", "d"), CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_conv2d_forward_and_backward(shape, cout, k, d, layout, dtype):
    torch.manual_seed(0)
    x = make(shape, dtype, layout)
    w = torch.randn(cout, shape[1], k, k, dtype=dtype)
    b = torch.randn(cout, dtype=dtype)
    xa, wa, ba = (t.detach().clone().requires_grad_() for t in (x, w, b))
    xb, wb, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ya, yb = atrous_conv2d(xa, wa, d, ba), _aten(xb, wb, d, bb)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    grad = torch.randn_like(yb)
    ya.backward(grad)
    yb.backward(grad)
    for got, want in ((xa, xb), (wa, wb), (ba, bb)):
        torch.testing.assert_close(got.grad, want.grad, atol=tol * 10, rtol=tol)


def test_cover_and_which_path(monkeypatch):
    """The ASPP's rates at 16x16 (output stride 16 of a 256x256 image): 18 and 12 in taps, 6 not."""
    assert atrous_module._cover(3, 18, 16, 16) == pytest.approx(1 / 9)
    assert atrous_module._cover(3, 12, 16, 16) == pytest.approx(0.25)
    assert atrous_module._cover(3, 6, 16, 16) == pytest.approx(1296 / 2304)
    calls = []
    real = F.conv2d
    monkeypatch.setattr(atrous_module.F, "conv2d", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, w = torch.randn(1, 2, 16, 16), torch.randn(3, 2, 3, 3)
    atrous_conv2d(x, w, 18)
    assert len(calls) == 1 and "dilation" not in calls[0]  # the centre tap alone
    calls.clear()
    atrous_conv2d(x, w, 12)
    assert len(calls) == 9  # the centre and 8 edge or corner windows
    calls.clear()
    atrous_conv2d(x, w, 6)
    with use_backend("reference"):
        atrous_conv2d(x, w, 18)
    assert [c["dilation"] for c in calls] == [6, 18]


def test_channels_last_stays_channels_last():
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    y = atrous_conv2d(x, torch.randn(4, 8, 3, 3), 12)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_and_double_backward():
    """ASTMT's adversarial term backpropagates through the decoder with ``create_graph``."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for d in (4, 5):
        assert atrous_module._use_taps(x, 3, d)
        assert torch.autograd.gradcheck(lambda *t, d=d: atrous_conv2d(*t[:2], d, t[2]), (x, w, b))
        assert torch.autograd.gradgradcheck(
            lambda *t, d=d: atrous_conv2d(*t[:2], d, t[2]), (x, w, b)
        )


def test_autocast_bfloat16_close_to_conv2d():
    x, w = torch.randn(2, 16, 16, 16), torch.randn(8, 16, 3, 3)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = atrous_conv2d(xa, wa, 12)
        want = _aten(xb, wb, 12)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.25, rtol=2e-2)
    got.float().sum().backward()
    want.float().sum().backward()
    for a, b in ((xa, xb), (wa, wb)):  # the gradients arrive in the leaves' float32
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, atol=0.25, rtol=2e-2)


def test_weight_not_kept_for_backward():
    """Only x's slices and the C_out x C_in tap copies are saved, never the full weight."""
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    merged = w * 2  # a weight built on the fly, as an adapter merged into the shared one
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        atrous_conv2d(x, merged, 12).sum().backward()
    assert saved and all(t.data_ptr() != merged.data_ptr() for t in saved)
    assert all(t.shape[-2:] != (3, 3) for t in saved)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 3, 4), torch.randn(1, 3, 3, 3), 2), "x must be a 4-d tensor"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 2, 3, 3), 2), "weight must have shape"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2), 2), "k odd"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 3, 3, 3), 0), "dilation must be an int >= 1"),
        ((torch.randn(1, 3, 4, 4), torch.randn(1, 3, 3, 3), 2.0), "dilation must be an int"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        atrous_conv2d(*args)


def test_backward_keeps_x_layout_and_equals_the_composite():
    """The taps' backward (one gradient of x, in x's layout, and one of the weight) against
    autograd over the same taps in plain ops, which torch.func transforms take."""
    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 16, 16, dtype=torch.float64).contiguous(memory_format=fmt)
        w = torch.randn(4, 6, 3, 3, dtype=torch.float64)
        b = torch.randn(4, dtype=torch.float64)
        g = torch.randn(2, 4, 16, 16, dtype=torch.float64)
        xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
        atrous_conv2d(xa, wa, 12, ba).backward(g)
        assert xa.grad.is_contiguous(memory_format=fmt)

        def loss(x, w, b, g=g):
            return (atrous_conv2d(x, w, 12, b) * g).sum()

        # torch.func wraps the tensors: atrous_conv2d runs the composite under it
        want = torch.func.grad(loss, argnums=(0, 1, 2))(x, w, b)
        for got, ref in zip((xa.grad, wa.grad, ba.grad), want):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
