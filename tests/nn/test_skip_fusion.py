"""SkipScoreFusion against nn.BatchNorm2d + nn.Conv2d 1x1 per layer, F.interpolate and a weighted sum."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtlfast.nn import SkipScoreFusion


def randomised(in_channels, out_channels):
    layer = SkipScoreFusion(in_channels, out_channels).double()
    with torch.no_grad():
        for bn in layer.norms:
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def naive_modules(layer):
    norms, convs = [], []
    for bn in layer.norms:
        copy = nn.BatchNorm2d(bn.num_features).double()
        copy.load_state_dict(bn.state_dict())
        norms.append(copy.train(layer.training))
    for proj in layer.projections:
        conv = nn.Conv2d(proj.in_channels, proj.out_channels, 1, bias=False).double()
        conv.load_state_dict(proj.state_dict())
        convs.append(conv)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    return norms, convs, weight, bias


def naive(norms, convs, weight, bias, features, size):
    out = bias[None, :, None, None]
    for k, f in enumerate(features):
        if k < len(norms):
            f = norms[k](f)
        score = F.interpolate(convs[k](f), size=size, mode="bilinear", align_corners=False)
        out = out + weight[k][None, :, None, None] * score
    return out


CASES = [
    # in_channels, out_channels, feature sizes, output size
    ([1, 3, 2], 4, [(7, 5), (4, 3), (2, 2)], (13, 9)),
    ([4], 1, [(3, 3)], (7, 5)),
    ([2, 5], 3, [(9, 8), (1, 1)], (4, 6)),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("in_channels, out_channels, sizes, size", CASES)
def test_forward_gradients_and_running_stats_equal_naive(
    training, in_channels, out_channels, sizes, size
):
    layer = randomised(in_channels, out_channels).train(training)
    norms, convs, weight, bias = naive_modules(layer)
    features = [
        torch.randn(3, c, *hw, dtype=torch.float64, requires_grad=True)
        for c, hw in zip(in_channels, sizes)
    ]
    features2 = [f.detach().clone().requires_grad_() for f in features]

    out = layer(features, size)
    expected = naive(norms, convs, weight, bias, features2, size)
    torch.testing.assert_close(out, expected)
    for bn, copy in zip(layer.norms, norms):
        torch.testing.assert_close(bn.state_dict(), copy.state_dict())

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    for f, f2 in zip(features, features2):
        torch.testing.assert_close(f.grad, f2.grad)
    pairs = [(layer.weight, weight), (layer.bias, bias)]
    pairs += [(p.weight, c.weight) for p, c in zip(layer.projections, convs)]
    for bn, copy in zip(layer.norms, norms):
        pairs += [(bn.weight, copy.weight), (bn.bias, copy.bias)]
    for got, want in pairs:
        torch.testing.assert_close(got.grad, want.grad)


def test_folded_projection_equals_batch_norm_then_projection():
    layer = randomised([3, 2], 4).eval()
    f = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    w, shift = layer.folded_projection(0)
    torch.testing.assert_close(
        F.conv2d(f, w) + shift[:, None, None], layer.projections[0](layer.norms[0](f))
    )
    w, shift = layer.folded_projection(1)
    assert w is layer.projections[1].weight and not shift.any()


def test_initial_fusion_is_a_plain_sum():
    layer = SkipScoreFusion([3, 2], 4).eval()
    assert layer.weight.shape == (2, 4) and bool((layer.weight == 1).all()) and not layer.bias.any()
    assert all(p.bias is None for p in layer.projections) and len(layer.norms) == 1
    features = [torch.randn(2, 3, 6, 6), torch.randn(2, 2, 3, 3)]
    scores = [layer.projections[0](layer.norms[0](features[0])), layer.projections[1](features[1])]
    expected = sum(
        F.interpolate(s, size=(6, 6), mode="bilinear", align_corners=False) for s in scores
    )
    torch.testing.assert_close(layer(features, (6, 6)), expected)


def test_channels_last_features():
    layer = randomised([3, 4], 5)
    features = [
        torch.randn(2, 3, 7, 5, dtype=torch.float64),
        torch.randn(2, 4, 4, 3, dtype=torch.float64),
    ]
    for training in (False, True):
        layer.train(training)
        expected = layer(features, (9, 8))
        got = layer([f.to(memory_format=torch.channels_last) for f in features], (9, 8))
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_matches_eager(training):
    features = [
        torch.randn(2, 3, 7, 5, requires_grad=True),
        torch.randn(2, 4, 4, 3, requires_grad=True),
    ]
    eager_layer = SkipScoreFusion([3, 4], 5).train(training)
    layer = SkipScoreFusion([3, 4], 5).train(training)
    layer.load_state_dict(eager_layer.state_dict())
    eager = eager_layer(features, (9, 8))
    grads_eager = torch.autograd.grad(eager.square().sum(), features)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(features, (9, 8))
    grads = torch.autograd.grad(out.square().sum(), features)
    torch.testing.assert_close(out, eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)
    torch.testing.assert_close(layer.state_dict(), eager_layer.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_channels must be a non-empty list of positive ints"):
        SkipScoreFusion([], 3)
    with pytest.raises(ValueError, match="in_channels must be a non-empty list of positive ints"):
        SkipScoreFusion([2, 0], 3)
    with pytest.raises(ValueError, match="out_channels must be >= 1"):
        SkipScoreFusion([2], 0)
    layer = SkipScoreFusion([2, 3], 4)
    good = [torch.randn(2, 2, 5, 5), torch.randn(2, 3, 3, 3)]
    with pytest.raises(ValueError, match="features must be a list of 2 tensors"):
        layer(good[:1], (5, 5))
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \(N, C_1=3, H, W\)"):
        layer([good[0], torch.randn(2, 2, 3, 3)], (5, 5))
    with pytest.raises(
        ValueError, match=r"features\[1\] must have shape .* with the N of features\[0\]"
    ):
        layer([good[0], torch.randn(1, 3, 3, 3)], (5, 5))
    with pytest.raises(TypeError, match=r"features\[0\] must be a torch.Tensor"):
        layer([None, good[1]], (5, 5))
    with pytest.raises(ValueError, match="size must be a pair of positive ints"):
        layer(good, (5, 0))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 2\)"):
        layer.folded_projection(2)
