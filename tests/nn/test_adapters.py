"""ResidualAdapter against a shared nn.Conv2d 3x3 plus T nn.Conv2d 1x1 holding the same weights."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtlfast._extension import has_extension
from mtlfast.nn import ResidualAdapter
from mtlfast.nn.adapters import merged_conv2d


def randomised(*args, **kwargs):
    layer = ResidualAdapter(*args, **kwargs).double()
    with torch.no_grad():
        layer.adapter_weight.normal_()
    return layer


def naive_modules(layer):
    conv = nn.Conv2d(
        layer.in_channels, layer.out_channels, 3, stride=layer.stride, padding=1, bias=False
    ).double()
    adapters = [
        nn.Conv2d(
            layer.in_channels, layer.out_channels, 1, stride=layer.stride, bias=False
        ).double()
        for _ in range(layer.num_tasks)
    ]
    with torch.no_grad():
        conv.weight.copy_(layer.conv.weight)
        for t, a in enumerate(adapters):
            a.weight.copy_(layer.adapter_weight[t])
    return conv, adapters


def naive(conv, adapters, x, task):
    tasks = [task] * x.shape[0] if isinstance(task, int) else task.tolist()
    return torch.cat([conv(x[n : n + 1]) + adapters[t](x[n : n + 1]) for n, t in enumerate(tasks)])


@pytest.mark.parametrize("task", [1, "mixed"])
@pytest.mark.parametrize(
    "c_in, c_out, t, hw, stride", [(1, 3, 2, (7, 5), 1), (4, 1, 3, (7, 5), 2), (3, 5, 2, (1, 1), 2)]
)
def test_forward_and_gradients_equal_conv_plus_adapters(task, c_in, c_out, t, hw, stride):
    layer = randomised(c_in, c_out, t, stride=stride)
    conv, adapters = naive_modules(layer)
    task = torch.tensor([1, 0, 1, 1, 0]) if task == "mixed" else task
    x = torch.randn(5, c_in, *hw, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()

    out = layer(x, task)
    expected = naive(conv, adapters, x2, task)
    torch.testing.assert_close(out, expected)
    assert out.shape[2:] == (-(-hw[0] // stride), -(-hw[1] // stride))

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.conv.weight.grad, conv.weight.grad)
    want = torch.stack(
        [torch.zeros_like(a.weight) if a.weight.grad is None else a.weight.grad for a in adapters]
    )
    torch.testing.assert_close(layer.adapter_weight.grad, want)


def test_starts_as_the_shared_convolution():
    layer = ResidualAdapter(3, 4, 2, stride=2)
    assert not layer.adapter_weight.any()
    x = torch.randn(2, 3, 7, 5)
    torch.testing.assert_close(layer(x, torch.tensor([1, 0])), layer.conv(x))


def test_int_task_equals_constant_task_vector():
    layer = randomised(4, 6, 3, stride=2)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, 2), layer(x, torch.full((3,), 2)))


def test_channels_last_input():
    layer = randomised(4, 6, 2)
    x = torch.randn(3, 4, 7, 5, dtype=torch.float64)
    xl = x.to(memory_format=torch.channels_last)
    task = torch.tensor([1, 0, 1])
    torch.testing.assert_close(layer(xl, task), layer(x, task))
    torch.testing.assert_close(layer(xl, 1), layer(x, 1))


def test_parameter_count_equals_conv_plus_t_adapters():
    assert sum(p.numel() for p in ResidualAdapter(8, 16, 5).parameters()) == 16 * 8 * 9 + 5 * 16 * 8


@pytest.mark.parametrize("task", [1, "mixed"])
def test_compile_fullgraph_matches_eager(task):
    layer = ResidualAdapter(4, 6, 2, stride=2)
    with torch.no_grad():
        layer.adapter_weight.normal_()
    task = torch.tensor([0, 1, 1]) if task == "mixed" else task
    x = torch.randn(3, 4, 7, 5, requires_grad=True)
    eager = layer(x, task)
    grads_eager = torch.autograd.grad(eager.square().sum(), (x, layer.adapter_weight))
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, task)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.adapter_weight))
    torch.testing.assert_close(out, eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ResidualAdapter(3, 4, 2, stride=0)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        ResidualAdapter(3, 4, 0)
    layer = ResidualAdapter(3, 4, 2)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C_in=3, H, W\)"):
        layer(torch.randn(2, 4, 5, 5), 0)
    with pytest.raises(ValueError, match=r"task must lie in \[0, 2\), got 5"):
        layer(x, 5)
    with pytest.raises(ValueError, match=r"task indices must lie in \[0, 2\)"):
        layer(x, torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="task must be an int or an"):
        layer(x, [0, 1])


# ---- the int-task path: the merged weight is rebuilt in backward, not kept ------------------------

MERGED_CASES = [  # (c_in, c_out, hw, k, stride, padding, dilation)
    (3, 4, (7, 5), 3, 1, 1, 1),
    (2, 3, (7, 5), 3, 2, 1, 1),
    (1, 2, (9, 6), 3, 1, 2, 2),
    (3, 1, (5, 7), 1, 2, 0, 1),
    (2, 2, (1, 1), 3, 2, 1, 1),
    (2, 3, (8, 6), 3, 1, 2, 2),  # phases under 8 px: dilated
    (2, 3, (16, 17), 3, 1, 2, 2),  # backward over the 2 x 2 phases, padded to 16x18
    (2, 2, (24, 26), 3, 1, 3, 3),  # over 3 x 3 phases, padded to 24x27
    (2, 3, (8, 8), 3, 1, 6, 6),  # mostly padding: mtlfast.ops.atrous_conv2d's taps
    (2, 3, (16, 15), 3, 1, 6, 6),  # phases of 6 (3x3): dilated
]
MERGED_IDS = [f"k{k}s{s}d{d}-{c_in}x{hw[0]}x{hw[1]}" for c_in, _, hw, k, s, _, d in MERGED_CASES]


def plain_merged(x, weight, adapter, stride, padding, dilation):
    k = weight.shape[-1] // 2
    merged = weight + F.pad(adapter, (k, k, k, k))
    return F.conv2d(x, merged, None, stride, padding, dilation)


def merged_inputs(c_in, c_out, hw, k, layout="contiguous", dtype=torch.float64):
    x = torch.randn(3, c_in, *hw, dtype=dtype)
    if layout == "non-contiguous":  # every other sample of a batch twice as large
        x = torch.randn(6, c_in, *hw, dtype=dtype)[::2]
        assert not x.is_contiguous()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, dtype=dtype)
    adapter = torch.randn(c_out, c_in, 1, 1, dtype=dtype)
    return [t.requires_grad_() for t in (x, weight, adapter)]


@pytest.mark.parametrize("layout", ["contiguous", "non-contiguous", "channels_last"])
@pytest.mark.parametrize(
    "c_in, c_out, hw, k, stride, padding, dilation", MERGED_CASES, ids=MERGED_IDS
)
def test_merged_conv_equals_plain_formulation(
    c_in, c_out, hw, k, stride, padding, dilation, layout
):
    inputs = merged_inputs(c_in, c_out, hw, k, layout)
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    out = merged_conv2d(*inputs, stride, padding, dilation)
    expected = plain_merged(*copies, stride, padding, dilation)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    for a, b in zip(inputs, copies):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "c_in, c_out, hw, k, stride, padding, dilation", MERGED_CASES, ids=MERGED_IDS
)
def test_merged_conv_gradcheck_and_gradgradcheck(c_in, c_out, hw, k, stride, padding, dilation):
    x, weight, adapter = merged_inputs(c_in, c_out, hw, k, "non-contiguous")
    x = x[:2].detach().requires_grad_()  # a small batch, still a strided view

    def fn(x, weight, adapter):
        return merged_conv2d(x, weight, adapter, stride, padding, dilation)

    assert torch.autograd.gradcheck(fn, (x, weight, adapter))
    assert torch.autograd.gradgradcheck(fn, (x, weight, adapter))


def test_merged_conv_create_graph_equals_plain_formulation():
    """A gradient taken with create_graph (ASTMT's adversarial term) and differentiated again."""
    inputs = merged_inputs(3, 4, (7, 5), 3)
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    grads = []
    for fn, (x, w, a) in ((merged_conv2d, inputs), (plain_merged, copies)):
        out = fn(x, w, a, 2, 1, 1)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        (g.square().sum() + out.sum()).backward()
        grads.append([x.grad, w.grad, a.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_merged_conv_under_autocast_equals_plain_formulation():
    inputs = merged_inputs(4, 6, (9, 7), 3, dtype=torch.float32)
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    outs = []
    for fn, args in ((merged_conv2d, inputs), (plain_merged, copies)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*args, 1, 1, 1)
        out.float().square().sum().backward()
        outs.append(out)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(inputs, copies):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad)


def saved_storages(fn):
    """The storages autograd saves for backward while ``fn()`` runs: data pointer -> bytes."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("layer_cls", ["plain", "atrous"])
def test_int_task_saves_no_merged_weight(layer_cls):
    """Backward keeps x and the parameters (which exist anyway), not a merged weight."""
    if layer_cls == "plain":
        layer = ResidualAdapter(8, 16, 3, stride=2)
    else:
        from mtlfast.backbones._blocks import AtrousResidualAdapter

        layer = AtrousResidualAdapter(8, 16, 3, dilation=2)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    saved, out = saved_storages(lambda: layer(x, 1))
    own = {t.untyped_storage().data_ptr() for t in (x, layer.conv.weight, layer.adapter_weight)}
    assert set(saved) <= own
    out.sum().backward()  # and backward runs from what was saved
    assert layer.adapter_weight.grad[1].abs().sum() > 0
    assert not layer.adapter_weight.grad[[0, 2]].any()
    # the plain formulation keeps one more storage, the merged weight, as large as the shared one
    opts = (layer.stride, getattr(layer, "padding", 1), getattr(layer, "dilation", 1))
    weights = (layer.conv.weight, layer.adapter_weight[1])
    plain, _ = saved_storages(lambda: plain_merged(x, *weights, *opts))
    extra = set(plain) - own
    assert [plain[p] for p in extra] == [layer.conv.weight.untyped_storage().nbytes()]


def test_dilated_backward_runs_over_the_phases(monkeypatch):
    """A dilated 'same' convolution on maps the dilation divides, into phases of at least 8 px a
    side, back-propagates undilated over its phases (no oneDNN dilated weight-gradient buffer),
    in x's memory format."""
    from mtlfast.nn import adapters

    calls = []
    real = adapters.padded_phases
    monkeypatch.setattr(
        adapters, "padded_phases", lambda t, d, fill: calls.append(d) or real(t, d, fill)
    )
    for layout, fmt in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        x, w, a = merged_inputs(4, 3, (16, 16), 3, layout)
        merged_conv2d(x, w, a, 1, 2, 2).sum().backward()
        assert x.grad.is_contiguous(memory_format=fmt)
    assert calls == [2, 2] * 2
    calls.clear()
    x, w, a = merged_inputs(4, 3, (17, 16), 3)
    merged_conv2d(x, w, a, 1, 2, 2).sum().backward()  # 17 rows: padded to 18
    assert calls == [2, 2]
    calls.clear()
    x, w, a = merged_inputs(4, 3, (5, 5), 3)
    merged_conv2d(x, w, a, 1, 4, 4).sum().backward()  # padded to 8x8: 2.6 times the pixels
    assert calls == []
    x, w, a = merged_inputs(4, 3, (16, 15), 3)
    merged_conv2d(x, w, a, 1, 6, 6).sum().backward()  # 3x3 phases: oneDNN's dilated is faster
    assert calls == []


@pytest.mark.parametrize("per_sample", [False, True])
def test_winograd_matches_direct(per_sample):
    """winograd=True (mtlfast.nn.use_winograd): the 3x3 convolution by F(4x4, 3x3) at 128
    channels and 16x16; values and every gradient as the direct layer's to fp64 rounding, and
    a create_graph backward (ASTMT's double backprop) by aten's differentiable one."""
    if not has_extension():
        pytest.skip("mtlfast._C is not built")
    torch.manual_seed(0)
    layer = ResidualAdapter(128, 128, 3).double()
    nn.init.normal_(layer.adapter_weight, std=0.05)
    x = torch.randn(2, 128, 16, 16, dtype=torch.float64, requires_grad=True)
    task = torch.tensor([2, 0]) if per_sample else 1
    params = [x, layer.conv.weight, layer.adapter_weight]
    want = layer(x, task)
    grads_want = torch.autograd.grad(want.square().sum(), params, create_graph=True)
    layer.winograd = True
    got = layer(x, task)
    assert not torch.equal(got, want)  # the Winograd path ran
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(got.square().sum(), params, retain_graph=True), grads_want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    second = torch.autograd.grad(got.square().sum(), params, create_graph=True)
    gg = torch.autograd.grad(second[0].square().sum(), layer.conv.weight)[0]
    gg_want = torch.autograd.grad(grads_want[0].square().sum(), layer.conv.weight)[0]
    torch.testing.assert_close(gg, gg_want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("hw", [(32, 32), (34, 33)])
def test_winograd_dilated_runs_over_the_phases(layout, hw):
    """A dilated adapter layer with winograd (ASTMT's layer4 at 512x512 input: 32x32 maps,
    dilation 2) runs F(4x4, 3x3) over its 2 x 2 phases (34x33: padded to 34x34), forward and
    backward: values and gradients as the direct layer's to fp64 rounding, in x's layout, and a
    create_graph backward by aten's differentiable one."""
    if not has_extension():
        pytest.skip("mtlfast._C is not built")
    from mtlfast.backbones._blocks import AtrousResidualAdapter

    torch.manual_seed(0)
    layer = AtrousResidualAdapter(128, 128, 2, dilation=2).double()
    nn.init.normal_(layer.adapter_weight, std=0.05)
    x = torch.randn(1, 128, *hw, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = [x, layer.conv.weight, layer.adapter_weight]
    want = layer(x, 1)
    grads_want = torch.autograd.grad(want.square().sum(), params, create_graph=True)
    layer.winograd = True
    got = layer(x, 1)
    assert not torch.equal(got, want)  # the Winograd path ran
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(got.square().sum(), params, retain_graph=True)
    for g, r in zip(grads, grads_want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert grads[0].is_contiguous(memory_format=fmt)
    second = torch.autograd.grad(got.square().sum(), params, create_graph=True)
    gg = torch.autograd.grad(second[0].square().sum(), layer.conv.weight)[0]
    gg_want = torch.autograd.grad(grads_want[0].square().sum(), layer.conv.weight)[0]
    torch.testing.assert_close(gg, gg_want, rtol=1e-8, atol=1e-8)
