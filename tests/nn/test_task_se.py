"""TaskSE against T plain SE blocks (nn.Linear, ReLU, nn.Linear, sigmoid) holding the same weights."""

import pytest
import torch
from torch import nn

from mtlfast.nn import TaskSE


def se_blocks(layer):
    """One plain SE block per task, each a copy of the layer's slice for that task."""
    blocks = []
    for t in range(layer.num_tasks):
        fc1, fc2 = nn.Linear(layer.channels, layer.hidden), nn.Linear(layer.hidden, layer.channels)
        with torch.no_grad():
            fc1.weight.copy_(layer.w1[t]), fc1.bias.copy_(layer.b1[t])
            fc2.weight.copy_(layer.w2[t]), fc2.bias.copy_(layer.b2[t])
        se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc1, nn.ReLU(), fc2, nn.Sigmoid())
        blocks.append(se.to(layer.w1.dtype))
    return blocks


def naive(blocks, x, task, residual=None, relu=False):
    tasks = [task] * x.shape[0] if isinstance(task, int) else task.tolist()
    y = torch.cat(
        [x[n : n + 1] * blocks[t](x[n : n + 1])[:, :, None, None] for n, t in enumerate(tasks)]
    )
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def stacked_grads(blocks):
    """The blocks' gradients in the layer's stacked layout (w1, b1, w2, b2); zeros for unused tasks."""
    grads = [[], [], [], []]
    for se in blocks:
        for i, p in enumerate((se[2].weight, se[2].bias, se[4].weight, se[4].bias)):
            grads[i].append(torch.zeros_like(p) if p.grad is None else p.grad)
    return [torch.stack(g) for g in grads]


@pytest.mark.parametrize("task", [1, "mixed"])
@pytest.mark.parametrize(
    "c, t, reduction, hw, fused",
    [(1, 2, 16, (7, 5), False), (32, 3, 16, (6, 6), True), (20, 2, 4, (1, 1), True)],
)
def test_forward_and_gradients_equal_se_blocks(task, c, t, reduction, hw, fused):
    layer = TaskSE(c, t, reduction).double()
    n = 5
    task = torch.tensor([1, 0, 1, 1, 0]) if task == "mixed" else task
    x = torch.randn(n, c, *hw, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(n, c, *hw, dtype=torch.float64, requires_grad=True) if fused else None
    out = layer(x, task, residual=residual, relu=fused)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    blocks = se_blocks(layer)
    x2 = x.detach().clone().requires_grad_()
    r2 = residual.detach().clone().requires_grad_() if fused else None
    expected = naive(blocks, x2, task, r2, relu=fused)
    expected.backward(grad_out)

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x2.grad)
    if fused:
        torch.testing.assert_close(residual.grad, r2.grad)
    for got, want in zip(
        (layer.w1.grad, layer.b1.grad, layer.w2.grad, layer.b2.grad), stacked_grads(blocks)
    ):
        torch.testing.assert_close(got, want)


def test_int_task_equals_constant_task_vector():
    layer = TaskSE(8, 3, reduction=4)
    x = torch.randn(4, 8, 5, 7)
    torch.testing.assert_close(layer(x, 2), layer(x, torch.full((4,), 2)))


def test_hidden_width_and_parameter_count_equal_t_se_blocks():
    for c, reduction, hidden in ((64, 16, 4), (20, 16, 1), (3, 16, 1), (1, 1, 1)):
        t = 3
        layer = TaskSE(c, t, reduction)
        assert layer.hidden == hidden
        plain = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c), nn.Sigmoid())
        assert sum(p.numel() for p in layer.parameters()) == t * sum(
            p.numel() for p in plain.parameters()
        )


def test_initialisation_is_nn_linear_per_task():
    c, t = 64, 4
    layer = TaskSE(c, t, reduction=4)
    for p, fan_in in ((layer.w1, c), (layer.b1, c), (layer.w2, c // 4), (layer.b2, c // 4)):
        bound = fan_in**-0.5
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
        # Independent draws per task, not one block repeated.
        assert not torch.equal(p[0], p[1])


def test_channels_last_input():
    layer = TaskSE(8, 2, reduction=2)
    x = torch.randn(3, 8, 6, 5)
    task = torch.tensor([0, 1, 1])
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last), task), layer(x, task))


@pytest.mark.parametrize("task", [1, "mixed"])
def test_compile_fullgraph_matches_eager(task):
    layer = TaskSE(16, 2, reduction=4)
    x = torch.randn(4, 16, 7, 5, requires_grad=True)
    task = torch.tensor([0, 1, 1, 0]) if task == "mixed" else task
    eager = layer(x, task, relu=True)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, task, relu=True)
    (gc,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels must be >= 1"):
        TaskSE(0, 2)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        TaskSE(4, 0)
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        TaskSE(4, 2, reduction=0)
    layer = TaskSE(4, 2)
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C=4, H, W\)"):
        layer(torch.randn(3, 5, 5, 5), 0)
    with pytest.raises(ValueError, match=r"task must lie in \[0, 2\), got 2"):
        layer(x, 2)
    with pytest.raises(ValueError, match=r"task indices must lie in \[0, 2\)"):
        layer(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"task must be an int or have shape \(N,\) = \(3,\)"):
        layer(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="task must be an int64 tensor"):
        layer(x, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="task must be an int or an"):
        layer(x, True)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        layer(x, 0, residual=torch.randn(3, 4, 5, 6))
