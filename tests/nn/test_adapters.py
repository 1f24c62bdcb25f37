"""ResidualAdapter against a shared nn.Conv2d 3x3 plus T nn.Conv2d 1x1 holding the same weights."""

import pytest
import torch
from torch import nn

from mtlfast.nn import ResidualAdapter


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
