"""MultiModalDistillation against the authors' per-pair SABlock loop with the same weights."""

import pytest
import torch
from torch import nn

from mtlfast.nn import MultiModalDistillation
from mtlfast.ops import available_backends, use_backend


class SABlock(nn.Module):
    """MTI-Net's release: sigmoid(conv3x3(x)) * conv3x3(x), no biases."""

    def __init__(self, channels):
        super().__init__()
        self.attention = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.Sigmoid())
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return self.attention(x) * self.conv(x)


def naive(layer, features):
    """out_k = F_k + sum_{l != k} SABlock_{k,l}(F_l), one module per ordered pair."""
    t = layer.num_tasks
    out = []
    for k in range(t):
        acc = features[k]
        for l in range(t):
            if l == k:
                continue
            block = SABlock(layer.channels).to(features[0].dtype)
            mask_w, msg_w = layer.pair_weights(k, l)
            block.attention[0].weight = nn.Parameter(mask_w.detach().clone())
            block.conv.weight = nn.Parameter(msg_w.detach().clone())
            acc = acc + block(features[l])
        out.append(acc)
    return out


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("t, c, hw", [(2, 1, (7, 5)), (3, 4, (6, 6)), (5, 3, (1, 1))])
def test_equals_per_pair_loop(backend, t, c, hw):
    torch.manual_seed(1)
    layer = MultiModalDistillation(t, c).double()
    feats = [torch.randn(2, c, *hw, dtype=torch.float64) for _ in range(t)]
    with use_backend(backend):
        got = layer(feats)
    assert isinstance(got, list) and len(got) == t
    for g, e in zip(got, naive(layer, feats)):
        torch.testing.assert_close(g, e)


def test_gradients_equal_per_pair_loop():
    layer = MultiModalDistillation(3, 4).double()
    feats = [torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    sum(o.square().sum() for o in layer(feats)).backward()
    fused = [f.grad.clone() for f in feats] + [layer.mask_weight.grad.clone(), layer.message_weight.grad.clone()]
    for f in feats:
        f.grad = None
    # The naive loop's weights are views of the layer's, so its gradients land in the layer too.
    layer.zero_grad()
    t = layer.num_tasks
    outs = []
    for k in range(t):
        acc = feats[k]
        for l in range(t):
            if l != k:
                mw, vw = layer.pair_weights(k, l)
                acc = acc + torch.sigmoid(nn.functional.conv2d(feats[l], mw, padding=1)) * nn.functional.conv2d(feats[l], vw, padding=1)
        outs.append(acc)
    sum(o.square().sum() for o in outs).backward()
    naive_grads = [f.grad for f in feats] + [layer.mask_weight.grad, layer.message_weight.grad]
    for a, b in zip(fused, naive_grads):
        torch.testing.assert_close(a, b)


def test_stacked_input_returns_stacked():
    layer = MultiModalDistillation(3, 4)
    x = torch.randn(2, 3, 4, 5, 5)
    out = layer(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    torch.testing.assert_close(torch.stack(layer(list(x.unbind(1))), 1), out)


def test_channels_last_features():
    layer = MultiModalDistillation(3, 4)
    feats = [torch.randn(2, 4, 6, 5).to(memory_format=torch.channels_last) for _ in range(3)]
    expected = layer([f.contiguous() for f in feats])
    for g, e in zip(layer(feats), expected):
        torch.testing.assert_close(g, e)


def test_compile_fullgraph_matches_eager():
    layer = MultiModalDistillation(3, 4)
    x = torch.randn(2, 3, 4, 9, 7, requires_grad=True)
    eager = layer(x)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    (gc,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)


def test_parameter_count_equals_pairs_of_convs():
    t, c = 4, 8
    assert sum(p.numel() for p in MultiModalDistillation(t, c).parameters()) == t * (t - 1) * 2 * c * c * 9


@pytest.mark.parametrize(
    "args, match",
    [((1, 4), "num_tasks must be >= 2"), ((3, 0), "channels must be >= 1")],
)
def test_bad_construction(args, match):
    with pytest.raises(ValueError, match=match):
        MultiModalDistillation(*args)


def test_bad_features():
    layer = MultiModalDistillation(3, 4)
    with pytest.raises(ValueError, match="expected a list of 3 task features, got 2"):
        layer([torch.randn(1, 4, 5, 5)] * 2)
    with pytest.raises(ValueError, match="T=3 tasks of C=4 channels"):
        layer(torch.randn(1, 3, 5, 5, 5))
    with pytest.raises(ValueError, match="one shape"):
        layer([torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 6)])
    with pytest.raises(ValueError, match="no distillation pair"):
        layer.pair_weights(1, 1)
