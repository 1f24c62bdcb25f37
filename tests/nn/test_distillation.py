"""MultiModalDistillation against the authors' per-pair SABlock loop with the same weights, and
its memory, which grows linearly in the number of tasks."""

import pytest
import torch
from torch import nn

import mtlfast
from mtlfast.nn import MultiModalDistillation


class SABlock(nn.Module):
    """MTI-Net's release: sigmoid(conv3x3(x)) * conv3x3(x), no biases."""

    def __init__(self, channels):
        super().__init__()
        self.attention = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.Sigmoid()
        )
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


@pytest.mark.parametrize("t, c, hw", [(2, 1, (7, 5)), (3, 4, (6, 6)), (5, 3, (1, 1))])
def test_equals_per_pair_loop(t, c, hw):
    torch.manual_seed(1)
    layer = MultiModalDistillation(t, c).double()
    feats = [torch.randn(2, c, *hw, dtype=torch.float64) for _ in range(t)]
    got = layer(feats)
    assert isinstance(got, list) and len(got) == t
    for g, e in zip(got, naive(layer, feats)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("recompute", [True, False])
def test_gradients_equal_per_pair_loop(recompute):
    layer = MultiModalDistillation(3, 4, recompute=recompute).double()
    feats = [torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    sum(o.square().sum() for o in layer(feats)).backward()
    fused = [f.grad.clone() for f in feats] + [
        layer.mask_weight.grad.clone(),
        layer.message_weight.grad.clone(),
    ]
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
                acc = acc + torch.sigmoid(
                    nn.functional.conv2d(feats[l], mw, padding=1)
                ) * nn.functional.conv2d(feats[l], vw, padding=1)
        outs.append(acc)
    sum(o.square().sum() for o in outs).backward()
    naive_grads = [f.grad for f in feats] + [layer.mask_weight.grad, layer.message_weight.grad]
    for a, b in zip(fused, naive_grads):
        torch.testing.assert_close(a, b)


def naive_plain(layer, feats):
    """The per-pair loop in plain differentiable ops on the layer's own weights (their views)."""
    t = layer.num_tasks
    outs = []
    for k in range(t):
        acc = feats[k]
        for l in range(t):
            if l != k:
                mw, vw = layer.pair_weights(k, l)
                mask = torch.sigmoid(nn.functional.conv2d(feats[l], mw, padding=1))
                acc = acc + mask * nn.functional.conv2d(feats[l], vw, padding=1)
        outs.append(acc)
    return outs


@pytest.mark.parametrize("stacked", [False, True])
def test_gradcheck(stacked):
    torch.manual_seed(2)
    layer = MultiModalDistillation(3, 2).double()
    feats = torch.randn(2, 3, 2, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, mask_weight, message_weight):
        inp = x if stacked else list(x.unbind(1))
        out = torch.func.functional_call(
            layer, {"mask_weight": mask_weight, "message_weight": message_weight}, (inp,)
        )
        return out if stacked else tuple(out)

    weights = [
        p.detach().clone().requires_grad_() for p in (layer.mask_weight, layer.message_weight)
    ]
    assert torch.autograd.gradcheck(f, (feats, *weights), fast_mode=True)


def test_gradient_of_some_inputs_only():
    """Frozen weights, and features of which only some need a gradient."""
    layer = MultiModalDistillation(3, 4).double().requires_grad_(False)
    feats = [torch.randn(1, 4, 6, 5, dtype=torch.float64, requires_grad=(i != 1)) for i in range(3)]
    grad_out = [torch.randn(1, 4, 6, 5, dtype=torch.float64) for _ in range(3)]
    got = torch.autograd.grad(layer(feats), [feats[0], feats[2]], grad_out)
    expected = torch.autograd.grad(naive_plain(layer, feats), [feats[0], feats[2]], grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    layer.requires_grad_(True)
    x = torch.randn(1, 3, 4, 6, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    naive_mask, naive_message = torch.autograd.grad(
        sum(o.square().sum() for o in naive_plain(layer, list(x.unbind(1)))),
        [layer.mask_weight, layer.message_weight],
    )
    torch.testing.assert_close(layer.mask_weight.grad, naive_mask)
    torch.testing.assert_close(layer.message_weight.grad, naive_message)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
def test_dtypes_forward_and_backward(dtype, tol):
    torch.manual_seed(3)
    layer = MultiModalDistillation(3, 8)
    x = torch.randn(2, 3, 8, 7, 5)
    grad_out = torch.randn_like(x)
    low = MultiModalDistillation(3, 8).to(dtype)
    low.load_state_dict(layer.state_dict())
    xl = x.to(dtype, copy=True).requires_grad_()
    out = low(xl)
    out.backward(grad_out.to(dtype))
    ref_layer = layer.double()
    xd = x.to(torch.float64, copy=True).requires_grad_()
    ref = ref_layer(xd)
    ref.backward(grad_out.double())
    assert out.dtype == dtype and xl.grad.dtype == dtype and low.mask_weight.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(xl.grad.double(), xd.grad, rtol=tol, atol=tol * 4)
    scale = ref_layer.message_weight.grad.abs().max()
    torch.testing.assert_close(
        low.message_weight.grad.double() / scale,
        ref_layer.message_weight.grad / scale,
        rtol=tol,
        atol=tol * 4,
    )


def test_non_contiguous_inputs():
    layer = MultiModalDistillation(3, 4)
    base = torch.randn(2, 4, 3, 9, 6)  # (N, C, T, H, W): the tasks are strided views
    feats = [base[:, :, i, :, ::2] for i in range(3)]
    expected = layer([f.contiguous() for f in feats])
    for g, e in zip(layer(feats), expected):
        torch.testing.assert_close(g, e)
    x = base.transpose(1, 2)
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


def test_stacked_input_returns_stacked():
    layer = MultiModalDistillation(3, 4)
    x = torch.randn(2, 3, 4, 5, 5)
    out = layer(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    torch.testing.assert_close(torch.stack(layer(list(x.unbind(1))), 1), out)


def test_channels_last_features():
    layer = MultiModalDistillation(3, 4)
    feats = [
        torch.randn(2, 4, 6, 5).to(memory_format=torch.channels_last).requires_grad_()
        for _ in range(3)
    ]
    plain = [f.detach().contiguous().requires_grad_() for f in feats]
    expected = layer(plain)
    got = layer(feats)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    sum(o.square().sum() for o in got).backward()
    sum(o.square().sum() for o in expected).backward()
    for f, p in zip(feats, plain):
        torch.testing.assert_close(f.grad, p.grad)


@pytest.mark.parametrize("recompute", [True, False])
def test_channels_last_keeps_its_layout_and_weight_gradients(recompute):
    """Channels-last features: channels-last outputs, kernels handed to the convolutions
    channels-last (no conversion inside them), and the NCHW run's weight gradients."""
    from mtlfast.nn.distillation import _source_weights

    torch.manual_seed(0)
    layer = MultiModalDistillation(3, 4, recompute=recompute).double()
    feats = [torch.randn(2, 4, 6, 5, dtype=torch.float64) for _ in range(3)]
    grads = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer.zero_grad(set_to_none=True)
        out = layer([f.clone(memory_format=fmt) for f in feats])
        assert all(o.is_contiguous(memory_format=fmt) for o in out)
        sum((o * o).sum() for o in out).backward()
        grads[fmt] = (layer.mask_weight.grad.clone(), layer.message_weight.grad.clone())
    for a, b in zip(grads[torch.contiguous_format], grads[torch.channels_last]):
        torch.testing.assert_close(a, b)
    f = feats[0].contiguous(memory_format=torch.channels_last)
    w = _source_weights(layer.mask_weight, [(1, 0), (2, 0)], f)
    assert w.shape == (8, 4, 3, 3) and w.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(w, torch.cat([layer.mask_weight[1, 0], layer.mask_weight[2, 0]]))


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
    assert (
        sum(p.numel() for p in MultiModalDistillation(t, c).parameters())
        == t * (t - 1) * 2 * c * c * 9
    )


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


# ---- memory: linear in T ---------------------------------------------------------------------------
# The per-pair maps (mask logits and messages of T*(T-1) pairs) are never all alive: one pair's at a
# time. Measured here (C=4, 32x32, one map = 16 KiB): inference T + 11 maps, training without the
# weights' gradients 2T + 12 maps, where 9 of the constant are the convolution's im2col buffer. For
# comparison, the layer that built all pairs' maps at once (mtlfast before this loop) measured 65
# and 81 maps at T=4, 292 and 356 at T=8.

MAP = (1, 4, 32, 32)  # small channels, so that the maps, not the weights, dominate
MAP_BYTES = 4 * 32 * 32 * 4


def _peaks(t):
    torch.manual_seed(0)
    layer = MultiModalDistillation(t, MAP[1])
    feats = [torch.randn(MAP) for _ in range(t)]
    with torch.no_grad():
        layer(feats)
        with mtlfast.profiling.memory("cpu") as inference:
            out = layer(feats)
    del out
    feats = [f.requires_grad_() for f in feats]
    grads = [torch.randn(MAP) for _ in range(t)]
    with mtlfast.profiling.memory("cpu") as training:
        torch.autograd.backward(layer(feats), grads)
    weight_grads = 2 * layer.mask_weight.numel() * 4
    return (
        inference.peak_extra_bytes,
        training.peak_extra_bytes - weight_grads,
        training.saved_bytes,
    )


@pytest.mark.parametrize("t", [2, 4, 8])
def test_peak_memory_is_linear_in_tasks(t):
    inference, training, saved = _peaks(t)
    # inference: the T outputs, one source's T-1 pairs' logits and messages, the convolution's
    # workspace (measured 3T + 7 maps; the all-pairs layer took 292 at T = 8)
    assert inference <= (3 * t + 8) * MAP_BYTES, inference / MAP_BYTES
    # training: the outputs, the gradients of the outputs and the inputs, one source's
    # recomputation and its gradient maps (measured 16, 26, 51 maps at T = 2, 4, 8)
    assert training <= (6 * t + 6) * MAP_BYTES, training / MAP_BYTES
    # saved for backward: the inputs and the weights only
    weights = 2 * t * (t - 1) * MAP[1] ** 2 * 9 * 4
    assert saved <= t * MAP_BYTES + weights + 1024, saved / MAP_BYTES


def test_recompute_false_saves_the_maps_for_the_same_gradients():
    torch.manual_seed(4)
    layers = [MultiModalDistillation(4, 4, recompute=r) for r in (True, False)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(*MAP[:1], 4, *MAP[1:])
    grads, saved = [], []
    for layer in layers:
        xi = x.clone().requires_grad_()
        with mtlfast.profiling.memory("cpu") as m:
            layer(xi).square().sum().backward()
        grads.append((xi.grad, layer.mask_weight.grad, layer.message_weight.grad))
        saved.append(m.saved_bytes - 2 * layer.mask_weight.numel() * 4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # the inputs and the output (that square() saves); without recomputation also 2 maps per pair
    assert saved[0] <= 8 * MAP_BYTES + 1024 and saved[1] >= (8 + 2 * 12) * MAP_BYTES
    assert "recompute=False" in repr(layers[1])


@pytest.mark.parametrize("strategy", [None, "recompute", "naive"])
def test_default_follows_the_engine_strategy(strategy):
    """recompute=None saves the maps inside a naive engine step only, for the same gradients."""
    from mtlfast.engine._context import running

    torch.manual_seed(6)
    layer = MultiModalDistillation(4, 4)
    reference = MultiModalDistillation(4, 4, recompute=True)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(*MAP[:1], 4, *MAP[1:])
    grads, saved = [], []
    for module, mode in ((layer, strategy), (reference, None)):
        xi = x.clone().requires_grad_()
        with mtlfast.profiling.memory("cpu") as m:
            if mode is None:
                out = module(xi)
            else:
                with running(mode):
                    out = module(xi)
            out.square().sum().backward()
        grads.append((xi.grad, module.mask_weight.grad, module.message_weight.grad))
        saved.append(m.saved_bytes - 2 * module.mask_weight.numel() * 4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    if strategy == "naive":
        assert saved[0] >= (8 + 2 * 12) * MAP_BYTES
    else:
        assert saved[0] <= 8 * MAP_BYTES + 1024
    assert "recompute=None" in repr(layer)


def test_recompute_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="recompute"):
        MultiModalDistillation(3, 4, recompute="yes")


def test_autocast_forward_then_backward_outside_it():
    """The memory engine runs backward with autocast off: the recomputation replays the bf16 casts."""
    torch.manual_seed(5)
    layers = [MultiModalDistillation(3, 4, recompute=r) for r in (True, False)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 3, 4, 6, 5)
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        grads.append((xi.grad, layer.mask_weight.grad, layer.message_weight.grad))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        # bf16 rounds each path's sums in its own order (and, without AVX512-BF16, through
        # other kernels): single entries differ by up to 15%, the gradients as wholes by < 1%
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 4 * 5 * 7 * 8])  # one pair a chunk; two pairs
@pytest.mark.parametrize("stacked", [False, True])
def test_chunked_pairs_equal_per_pair_loop(monkeypatch, chunk_bytes, stacked):
    """Large maps run their pairs in chunks (here forced small): the same outputs and gradients."""
    from mtlfast.nn import distillation

    monkeypatch.setattr(distillation, "_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(5)
    layer = MultiModalDistillation(4, 4).double()
    feats = [torch.randn(2, 4, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    grads = [torch.randn(2, 4, 5, 7, dtype=torch.float64) for _ in range(4)]
    x = torch.stack(feats, 1) if stacked else feats
    out = layer(x)
    got = list(out.unbind(1)) if stacked else out
    for g, e in zip(got, naive(layer, feats)):
        torch.testing.assert_close(g, e)
    torch.autograd.backward(got, grads)
    ours = [f.grad.clone() for f in feats] + [layer.mask_weight.grad, layer.message_weight.grad]
    for f in feats:
        f.grad = None
    layer.zero_grad()
    torch.autograd.backward(
        distillation._differentiable(False, False, layer.mask_weight, layer.message_weight, *feats),
        grads,
    )
    expected = [f.grad for f in feats] + [layer.mask_weight.grad, layer.message_weight.grad]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        for g, e in zip(layer(feats), naive(layer, feats)):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_winograd_equals_per_pair_loop(recompute, stacked, channels_last):
    """winograd=True (the trainer's default): 128 channels at 16x16 take the F(4x4, 3x3) path,
    the mask and message kernels of a chunk in one convolution; values and every gradient as the
    per-pair loop's, to the transforms' rounding (fp64 here)."""
    if not mtlfast._extension.has_extension():
        pytest.skip("mtlfast._C is not built")
    torch.manual_seed(3)
    layer = MultiModalDistillation(3, 128, recompute=recompute).double()
    layer.winograd = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [
        torch.randn(2, 128, 16, 16, dtype=torch.float64)
        .contiguous(memory_format=fmt)
        .requires_grad_()
        for _ in range(3)
    ]
    out = layer(torch.stack(feats, 1)) if stacked else layer(feats)
    outs = list(out.unbind(1)) if stacked else out
    loss = sum((o * o.detach().sin()).sum() for o in outs)
    params = [layer.mask_weight, layer.message_weight]
    got = torch.autograd.grad(loss, [*feats, *params])
    want_outs = naive_plain(layer, feats)
    want = torch.autograd.grad(
        sum((o * o.detach().sin()).sum() for o in want_outs), [*feats, *params]
    )
    for g, e in zip([*outs, *got], [*want_outs, *want]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    assert not torch.equal(outs[0], want_outs[0])  # the Winograd path ran
