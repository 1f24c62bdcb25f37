"""The atrous residual adapter against plain convolutions: shared dilated 3x3 plus the task's 1x1."""

import pytest
import torch
from torch.nn import functional as F

from mtlfast.backbones._blocks import AtrousResidualAdapter


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
