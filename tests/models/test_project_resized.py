"""project_resized, fuse_scales: a 1x1 convolution of resized, concatenated pieces, projected before resizing."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtlfast.models._common import fuse_scales, project_resized


def _reference(conv, pieces, size):
    resized = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pieces]
    return conv(torch.cat(resized, 1))


def _pieces(shapes, channels_last=False, dtype=torch.float64):
    torch.manual_seed(0)
    out = []
    for c, h, w in shapes:
        p = torch.randn(2, c, h, w, dtype=dtype)
        if channels_last:
            p = p.contiguous(memory_format=torch.channels_last)
        out.append(p.requires_grad_())
    return out


CASES = [
    # (pieces' (C, H, W), output size): HRNet-like, odd sizes, a piece larger than the output,
    # no piece at the output size, one piece
    ([(3, 8, 8), (5, 4, 4), (2, 2, 2), (4, 1, 1)], (8, 8)),
    ([(3, 7, 9), (2, 4, 5), (5, 2, 3)], (7, 9)),
    ([(2, 6, 6), (3, 12, 12), (1, 3, 3)], (6, 6)),
    ([(2, 5, 5), (3, 3, 3)], (10, 7)),
    ([(4, 6, 5)], (6, 5)),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shapes, size", CASES)
def test_matches_concatenation_forward_and_backward(shapes, size, bias, channels_last):
    pieces = _pieces(shapes, channels_last)
    total = sum(c for c, _, _ in shapes)
    conv = nn.Conv2d(total, 6, 1, bias=bias).double()
    out = project_resized(conv, pieces, size)
    ref = _reference(conv, pieces, size)
    assert out.shape == ref.shape == (2, 6, *size)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    params = [*pieces, *conv.parameters()]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


class _Fuse(nn.Module):
    def __init__(self, conv, size):
        super().__init__()
        self.conv, self.size = conv, size

    def forward(self, *pieces):
        return project_resized(self.conv, pieces, self.size)


def test_gradcheck():
    pieces = _pieces([(2, 4, 4), (3, 2, 2), (1, 3, 3)])
    fuse = _Fuse(nn.Conv2d(6, 3, 1).double(), (4, 4))
    weight, bias = (p.detach().clone().requires_grad_() for p in fuse.conv.parameters())

    def fn(w, b, *ps):
        return torch.func.functional_call(fuse, {"conv.weight": w, "conv.bias": b}, ps)

    assert torch.autograd.gradcheck(fn, (weight, bias, *pieces))


def test_not_pointwise_falls_back_to_the_concatenation():
    pieces = _pieces([(2, 4, 4), (3, 2, 2)])
    for conv in (
        nn.Conv2d(5, 3, 3, padding=1),
        nn.Conv2d(5, 3, 1, stride=2),
        nn.Conv2d(5, 5, 1, groups=5),
    ):
        conv = conv.double()
        torch.testing.assert_close(
            project_resized(conv, pieces, (4, 4)), _reference(conv, pieces, (4, 4))
        )


def test_float32_hrnet_shapes_within_rounding():
    torch.manual_seed(0)
    pieces = [torch.randn(2, c, s, s) for c, s in ((18, 16), (36, 8), (72, 4), (144, 2))]
    conv = nn.Conv2d(270, 270, 1)
    torch.testing.assert_close(
        project_resized(conv, pieces, (16, 16)),
        _reference(conv, pieces, (16, 16)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_fuse_scales_runs_the_rest_of_the_layers():
    pieces = _pieces([(2, 4, 4), (3, 2, 2)])
    layers = nn.Sequential(nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    layers = layers.double().eval()
    torch.testing.assert_close(
        fuse_scales(layers, pieces, (4, 4)), _reference(layers, pieces, (4, 4))
    )


def test_bf16_autocast_matches_the_concatenation_within_bf16_rounding():
    torch.manual_seed(0)
    pieces = [torch.randn(2, c, s, s) for c, s in ((4, 8), (6, 4), (8, 2))]
    conv = nn.Conv2d(18, 5, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = project_resized(conv, pieces, (8, 8)), _reference(conv, pieces, (8, 8))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
