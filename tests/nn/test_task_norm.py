"""TaskBatchNorm2d against T nn.BatchNorm2d holding the same weights and running statistics."""

import pytest
import torch
from torch import nn

from mtlfast.nn import TaskBatchNorm2d

MIXED = [2, 0, 2, 2, 0, 2]  # task 1 absent: its statistics must not move


def randomise(layer):
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.num_batches_tracked.random_(0, 5)
    return layer


def batch_norms(layer):
    """One nn.BatchNorm2d per task, each a copy of the layer's row for that task."""
    bns = []
    for t in range(layer.num_tasks):
        bn = nn.BatchNorm2d(layer.channels, eps=layer.eps, momentum=layer.momentum).to(
            layer.weight.dtype
        )
        with torch.no_grad():
            bn.weight.copy_(layer.weight[t]), bn.bias.copy_(layer.bias[t])
            bn.running_mean.copy_(layer.running_mean[t]), bn.running_var.copy_(layer.running_var[t])
            bn.num_batches_tracked.copy_(layer.num_batches_tracked[t])
        bn.train(layer.training)
        bns.append(bn)
    return bns


def naive(bns, x, task):
    if isinstance(task, int):
        return bns[task](x)
    out = torch.empty_like(x)
    for t in task.unique().tolist():
        idx = (task == t).nonzero().flatten()
        out = out.index_put((idx,), bns[t](x[idx]))
    return out


def assert_state_equal(layer, bns):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(layer, name), torch.stack([getattr(bn, name) for bn in bns]), msg=name
        )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("task", [1, "mixed"])
@pytest.mark.parametrize(
    "c, t, hw, momentum", [(1, 2, (7, 5), 0.1), (4, 3, (5, 6), None), (3, 3, (1, 1), 0.3)]
)
def test_forward_gradients_and_running_stats_equal_batch_norms(training, task, c, t, hw, momentum):
    layer = randomise(TaskBatchNorm2d(c, t, momentum=momentum).double()).train(training)
    task = torch.tensor(MIXED) if task == "mixed" else task
    if isinstance(task, torch.Tensor) and t == 2:
        task = task.clamp_max(1)
    bns = batch_norms(layer)
    x = (torch.randn(len(MIXED), c, *hw, dtype=torch.float64) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()

    out = layer(x, task)
    expected = naive(bns, x2, task)
    torch.testing.assert_close(out, expected)
    assert_state_equal(layer, bns)

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad)
    for name in ("weight", "bias"):
        grads = [getattr(bn, name).grad for bn in bns]
        want = torch.stack([torch.zeros(c).double() if g is None else g for g in grads])
        torch.testing.assert_close(getattr(layer, name).grad, want, msg=name)


def test_several_steps_with_cumulative_average():
    layer = TaskBatchNorm2d(3, 3, momentum=None).double()
    bns = batch_norms(layer)
    for task in ([0, 0, 1, 2, 1], [2, 2, 2, 2, 2], [1, 1, 1, 1, 1]):
        task = torch.tensor(task)
        x = torch.randn(5, 3, 4, 3, dtype=torch.float64)
        torch.testing.assert_close(layer(x, task), naive(bns, x, task))
    assert_state_equal(layer, bns)
    assert layer.num_batches_tracked.tolist() == [1, 2, 2]


def test_int_task_equals_constant_task_vector():
    x = torch.randn(4, 5, 6, 7)
    for training in (True, False):
        a = randomise(TaskBatchNorm2d(5, 2)).train(training)
        b = TaskBatchNorm2d(5, 2).train(training)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x, 1), b(x, torch.ones(4, dtype=torch.long)))
        torch.testing.assert_close(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("task", [1, "mixed"])
def test_channels_last_input(task):
    task = torch.tensor([0, 1, 1]) if task == "mixed" else task
    x = torch.randn(3, 4, 7, 5)
    for training in (True, False):
        a = randomise(TaskBatchNorm2d(4, 2)).train(training)
        b = TaskBatchNorm2d(4, 2).train(training)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x.to(memory_format=torch.channels_last), task), b(x, task))
        torch.testing.assert_close(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_input_uses_float32_statistics(dtype):
    layer = randomise(TaskBatchNorm2d(4, 2))
    task = torch.tensor([0, 1, 1, 0, 1])
    x = torch.randn(5, 4, 7, 5) * 2 + 5
    reference = TaskBatchNorm2d(4, 2)
    reference.load_state_dict(layer.state_dict())
    expected = reference(x.to(dtype).float(), task)
    out = layer(x.to(dtype), task)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(layer.running_var, reference.running_var)


# momentum=None with an int task takes the per-sample path (batch_norm needs a float factor).
@pytest.mark.parametrize("task, momentum", [(1, 0.1), (1, None), ("mixed", 0.1)])
def test_compile_fullgraph_matches_eager(task, momentum):
    task = torch.tensor([0, 1, 1, 0]) if task == "mixed" else task
    x = torch.randn(4, 6, 7, 5, requires_grad=True)
    eager_layer = randomise(TaskBatchNorm2d(6, 2, momentum=momentum))
    layer = TaskBatchNorm2d(6, 2, momentum=momentum)
    layer.load_state_dict(eager_layer.state_dict())
    eager = eager_layer(x, task)
    (ge,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, task)
    (gc,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)
    torch.testing.assert_close(layer.state_dict(), eager_layer.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels must be >= 1"):
        TaskBatchNorm2d(0, 2)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        TaskBatchNorm2d(4, 0)
    with pytest.raises(ValueError, match="momentum must be in"):
        TaskBatchNorm2d(4, 2, momentum=1.5)
    layer = TaskBatchNorm2d(4, 2)
    x = torch.randn(3, 4, 5, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C=4, H, W\)"):
        layer(torch.randn(3, 4, 5), 0)
    with pytest.raises(ValueError, match=r"task must lie in \[0, 2\), got -1"):
        layer(x, -1)
    with pytest.raises(
        ValueError, match=r"task indices must lie in \[0, 2\), got values in \[0, 3\]"
    ):
        layer(x, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"task must be an int or have shape \(N,\)"):
        layer(x, torch.tensor([[0, 1, 1]]))
    with pytest.raises(TypeError, match="task must be an int64 tensor"):
        layer(x, torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(
        ValueError, match=r"more than 1 value per channel when training, but tasks \[1\]"
    ):
        layer(torch.randn(3, 4, 1, 1), torch.tensor([0, 1, 0]))
    assert layer.num_batches_tracked.tolist() == [0, 0]
