"""The atrous residual adapter against plain convolutions: shared dilated 3x3 plus the task's 1x1."""

import pytest
import torch
from torch.nn import functional as F

from mtlfast.backbones._blocks import AtrousResidualAdapter, TaskSequential, call, norm, relu
from mtlfast.nn import TaskBatchNorm2d


@pytest.mark.parametrize("stride, dilation", [(1, 1), (1, 2), (1, 4), (2, 2)])
def test_atrous_adapter_matches_reference(stride, dilation):
    layer = AtrousResidualAdapter(5, 6, num_tasks=3, stride=stride, dilation=dilation)
    torch.nn.init.normal_(layer.adapter_weight)
    x = torch.randn(4, 5, 11, 8)
    task = torch.tensor([2, 0, 1, 2])
    shared = F.conv2d(x, layer.conv.weight, stride=stride, padding=dilation, dilation=dilation)
    expected = torch.stack(
        [
            shared[n] + F.conv2d(x[n : n + 1], layer.adapter_weight[t], stride=stride)[0]
            for n, t in enumerate(task.tolist())
        ]
    )
    torch.testing.assert_close(layer(x, task), expected, rtol=1e-4, atol=1e-4)
    for n, t in enumerate(task.tolist()):
        torch.testing.assert_close(layer(x[n : n + 1], t)[0], expected[n], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="task"):
        layer(x, 3)


@pytest.mark.parametrize("stride", [1, 2])
def test_adapter_beside_a_1x1_convolution(stride):
    """kernel_size 1 (the ASTMT release's decoder adapters): shared 1x1 plus the task's 1x1."""
    layer = AtrousResidualAdapter(5, 6, num_tasks=3, stride=stride, kernel_size=1)
    assert layer.conv.kernel_size == (1, 1)
    torch.nn.init.normal_(layer.adapter_weight)
    x = torch.randn(3, 5, 9, 7)
    task = torch.tensor([1, 2, 1])
    expected = torch.stack(
        [
            F.conv2d(x[n : n + 1], layer.conv.weight + layer.adapter_weight[t], stride=stride)[0]
            for n, t in enumerate(task.tolist())
        ]
    )
    torch.testing.assert_close(layer(x, task), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[:1], 1), expected[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size"):
        AtrousResidualAdapter(5, 6, 3, kernel_size=5)


def _eval_bn(channels, tasks=None):
    bn = TaskBatchNorm2d(channels, tasks) if tasks else torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn.eval()


@pytest.mark.parametrize("tasks", [None, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_in_inference_is_in_place_and_equals_the_layer(tasks, channels_last):
    bn = _eval_bn(5, tasks)
    y = torch.randn(2, 5, 6, 7)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    task = 1 if tasks else None
    expected = call(bn, y, task)  # autograd on: the layer itself
    with torch.no_grad():
        out = norm(bn, y.clone(), task)
        mine = y.clone()
        assert norm(bn, mine, task) is mine  # in place
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_norm_leaves_training_grad_and_task_vectors_to_the_layer():
    bn = _eval_bn(4, 2)
    y = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        out = norm(bn, y, torch.tensor([0, 1, 0]))  # per-sample tasks: the layer
        assert out is not y
        assert norm(bn.train(), y, 0) is not y  # batch statistics
        assert norm(_eval_bn(4), y.double().bfloat16(), None).dtype == torch.bfloat16
    bn.eval()
    assert norm(bn, y, 0) is not y  # autograd on
    assert relu(y) is not y
    with torch.no_grad():
        assert relu(y) is y and bool((y >= 0).all())


def test_task_sequential_never_overwrites_its_input():
    """In inference a batch norm / ReLU child runs in place only on a map a previous child
    made: not on the container's input, nor on a child's output that aliases it."""
    x = torch.randn(2, 4, 5, 5)
    kept = x.clone()
    for seq in (
        TaskSequential(_eval_bn(4), torch.nn.ReLU()),
        TaskSequential(torch.nn.Identity(), _eval_bn(4), torch.nn.ReLU()),
        TaskSequential(torch.nn.Flatten(0, 0), torch.nn.ReLU()),
    ):
        expected = seq(x)
        with torch.no_grad():
            torch.testing.assert_close(seq(x), expected)
        assert torch.equal(x, kept)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    seq = TaskSequential(conv, _eval_bn(4, 2), torch.nn.ReLU())
    expected = seq(x, 1)
    with torch.no_grad():
        torch.testing.assert_close(seq(x, 1), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, kept)


def test_in_place_inference_compiles_into_one_graph():
    """Under torch.compile the blocks take the layers' own path (no storage checks in the graph)."""
    from mtlfast.backbones.resnet import Bottleneck

    down = TaskSequential(torch.nn.Conv2d(16, 16, 1), _eval_bn(16))
    block = Bottleneck(16, 4, downsample=down).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = block(x)
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), expected)
