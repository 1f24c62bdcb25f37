"""PointwiseConv2d (stride by subsampling) against nn.Conv2d with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlfast.backbones import ResNet
from mtlfast.backbones._blocks import PointwiseConv2d
from mtlfast.ops import use_backend


def _pair(cin, cout, stride, bias, dtype=torch.float64):
    torch.manual_seed(0)
    ours = PointwiseConv2d(cin, cout, stride=stride, bias=bias).to(dtype)
    theirs = nn.Conv2d(cin, cout, 1, stride=stride, bias=bias).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("stride", [1, 2, 3, (2, 1)])
@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (3, 4, 7, 9), (1, 6, 1, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_conv2d_forward_and_backward(stride, shape, layout, bias):
    ours, theirs = _pair(shape[1], 3, stride, bias)
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1] + 2, *shape[2:], dtype=torch.float64)[:, 1:-1]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    if layout == "channels_last" and shape[1] > 1 and shape[-1] * shape[-2] > 1:
        # x's layout, not the NCHW one of a slice's backward (autograd adds it to x's other
        # gradients: a mixed-layout sum is 10x slower)
        assert xa.grad.is_contiguous(memory_format=torch.channels_last)
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_float32_and_bf16_autocast_agree_with_conv2d():
    ours, theirs = _pair(16, 8, 2, False, torch.float32)
    x = torch.randn(2, 16, 10, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_double_backward():
    ours, _ = _pair(3, 2, 2, True)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w, b = ours.weight, ours.bias
    # through the layer itself: its subsampling's backward is differentiable too
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,)),
        (x, w.detach().requires_grad_(), b.detach().requires_grad_()),
    )
    y = ours(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gx.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_reference_backend_and_stride_one_call_conv2d_itself(monkeypatch):
    calls = []
    real = nn.Conv2d._conv_forward
    monkeypatch.setattr(
        nn.Conv2d, "_conv_forward", lambda self, *a: calls.append(self.stride) or real(self, *a)
    )
    ours, _ = _pair(4, 2, 2, False)
    ours(torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert calls == []
    with use_backend("reference"):
        ours(torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert calls == [(2, 2)]
    one, _ = _pair(4, 2, 1, False)
    one(torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert calls == [(2, 2), (1, 1)]


def test_resnet_uses_it_for_its_strided_1x1_convolutions():
    for stride_in_1x1 in (False, True):  # projections only; the first 1x1 convs too (ASTMT)
        net = ResNet(depth=26, stride_in_1x1=stride_in_1x1)
        strided = [
            m
            for m in net.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
        ]
        assert len(strided) == (6 if stride_in_1x1 else 3)  # output stride 32: layers 2-4
        assert all(isinstance(m, PointwiseConv2d) for m in strided)
