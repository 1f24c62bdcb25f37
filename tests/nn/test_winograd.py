"""use_winograd / WinogradConv2d: which layers switch, state dicts kept, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlfast._extension import has_extension
from mtlfast.backbones._blocks import PointwiseConv2d
from mtlfast.nn import MultiModalDistillation, WinogradConv2d, use_winograd


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(128, 128, 3, padding=1)  # switched
        self.narrow = nn.Conv2d(128, 64, 3, padding=1, bias=False)  # too few output channels
        self.strided = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(128, 128, 3, padding=2, dilation=2)  # switched: 'same'
        self.shrinking = nn.Conv2d(128, 128, 3, padding=1, dilation=2)  # not 'same'
        self.pointwise = PointwiseConv2d(128, 128, 1)
        self.distill = MultiModalDistillation(2, 128)

    def forward(self, x):
        y = self.big(x)
        y = self.strided(self.narrow(y))
        y = self.dilated(y)
        y = nn.functional.pad(self.shrinking(y), (1, 1, 1, 1))
        a, b = self.distill([y, self.pointwise(y)])
        return a + b


def test_switches_eligible_layers_and_back():
    net = _Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert use_winograd(net) == 3  # big, dilated, distill
    assert type(net.big) is WinogradConv2d and net.distill.winograd
    assert type(net.dilated) is WinogradConv2d
    assert type(net.narrow) is nn.Conv2d and type(net.strided) is nn.Conv2d
    assert type(net.shrinking) is nn.Conv2d and type(net.pointwise) is PointwiseConv2d
    assert use_winograd(net) == 0  # already switched
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert use_winograd(net, enabled=False) == 3
    assert type(net.big) is nn.Conv2d and type(net.dilated) is nn.Conv2d
    assert not net.distill.winograd


@pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")
def test_outputs_and_gradients_match_direct():
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(1, 128, 32, 32, dtype=torch.float64)  # the dilated layer's phases 16x16
    want = net(x)
    grads_want = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    use_winograd(net)
    got = net(x)
    assert not torch.equal(got, want)  # the Winograd path ran
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got.square().sum(), list(net.parameters()))
    for g, r in zip(grads, grads_want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_winograd_conv2d_refuses_other_geometry():
    for bad in ({"stride": 2, "padding": 1}, {"padding": 1, "dilation": 2}):
        with pytest.raises(ValueError, match="WinogradConv2d: needs kernel_size=3, stride=1"):
            WinogradConv2d(8, 8, 3, **bad)
    with pytest.raises(ValueError, match="the same dilation along both axes"):
        WinogradConv2d(8, 8, 3, padding=(2, 1), dilation=(2, 1))
    assert WinogradConv2d(8, 8, 3, padding=1).weight.shape == (8, 8, 3, 3)
    assert WinogradConv2d(8, 8, 3, padding=3, dilation=3).dilation == (3, 3)


@pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")
def test_dilated_layer_matches_nn_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=2, dilation=2)
    fast = WinogradConv2d(128, 128, 3, padding=2, dilation=2)
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(1, 128, 32, 32)
    got, want = fast(x), conv(x)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


def test_bad_model():
    with pytest.raises(TypeError, match="use_winograd: model must be an nn.Module"):
        use_winograd("not a model")
