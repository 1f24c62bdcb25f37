"""mtlfast.nn.BatchNorm2d and use_fast_batch_norm: nn.BatchNorm2d's behaviour, faster kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlfast.ops.batch_norm_train as bnt
from mtlfast._extension import has_extension
from mtlfast.nn import BatchNorm2d, TaskBatchNorm2d, use_fast_batch_norm

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")


@pytest.fixture(autouse=True)
def _kernels_at_every_size(monkeypatch):
    """The tests' small inputs take the kernels too (the op leaves inputs under 65536 values
    to aten)."""
    monkeypatch.setattr(bnt, "_MIN_NUMEL", 1)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_steps_like_nn_batchnorm(momentum, track, layout):
    """Three training steps then eval: outputs, gradients and running statistics of
    nn.BatchNorm2d, in float64 (the sums run in other orders)."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = copy.deepcopy(ref)
    assert use_fast_batch_norm(ours) == 1 and type(ours) is BatchNorm2d
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for _ in range(3):
        x = (torch.randn(3, 6, 5, 7, dtype=torch.float64) * 2 + 1).contiguous(memory_format=fmt)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(t) for m, t in zip((ref, ours), xs)]
        grad = torch.randn_like(ys[0])
        for y in ys:
            (y * grad).sum().backward()
        torch.testing.assert_close(ys[1], ys[0])
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, msg=name)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_use_fast_batch_norm_switches_exact_batchnorms_only():
    class Sub(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Sub(4), nn.BatchNorm1d(4))
    state = copy.deepcopy(model.state_dict())
    assert use_fast_batch_norm(model) == 1
    assert [type(m) for m in model] == [nn.Conv2d, BatchNorm2d, Sub, nn.BatchNorm1d]
    assert use_fast_batch_norm(model) == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert use_fast_batch_norm(model, enabled=False) == 1
    assert type(model[1]) is nn.BatchNorm2d
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        use_fast_batch_norm("model")


def test_module_rejects_other_ranks_like_nn():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNorm2d(3)(torch.randn(2, 3, 4))


def test_task_batch_norm_one_task_takes_the_kernel():
    """TaskBatchNorm2d with an int task: the fast op on its rows, the same results as one
    nn.BatchNorm2d holding those rows."""
    torch.manual_seed(1)
    layer = TaskBatchNorm2d(5, num_tasks=3).double()
    ref = nn.BatchNorm2d(5).double()
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x, 1), ref(x))
    torch.testing.assert_close(layer.running_mean[1], ref.running_mean)
    torch.testing.assert_close(layer.running_var[1], ref.running_var)
    assert torch.equal(layer.running_mean[0], torch.zeros(5))
