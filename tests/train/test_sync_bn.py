"""SyncTaskBatchNorm2d, its synchronised path forced on a one-rank group, against TaskBatchNorm2d.

Two ranks training as one process is tests/train/test_distributed.py's (a task vector there,
ASTMT's int-task passes in its trainer cases).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mtlfast.models._common import recomputed
from mtlfast.nn import TaskBatchNorm2d
from mtlfast.train._sync_bn import (
    SyncBatchNorm,
    SyncTaskBatchNorm2d,
    convert_sync_batchnorm,
    is_sync_batchnorm,
)

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)

# T=4: unordered, task 1 absent (its statistics and counter must not move)
TASKS = {
    "int": 2,
    "unordered": torch.tensor([2, 0, 3, 2, 0, 2]),
    "ordered": torch.tensor([0, 0, 2, 2, 2, 3]),
}


@pytest.fixture(scope="module")
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.fixture
def forced(one_rank, monkeypatch):
    """A one-rank group runs plain task batch norm: the synchronised path is forced over it."""
    monkeypatch.setattr(
        SyncTaskBatchNorm2d, "_synced_group", lambda self: one_rank if self.training else None
    )


def pair(momentum):
    """A randomised TaskBatchNorm2d (C=3, T=4) and its converted copy."""
    plain = TaskBatchNorm2d(3, 4, momentum=momentum)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.normal_()
        plain.running_mean.normal_()
        plain.running_var.uniform_(0.5, 2.0)
        plain.num_batches_tracked.copy_(torch.tensor([3, 1, 0, 2]))
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert type(synced) is SyncTaskBatchNorm2d and is_sync_batchnorm(synced)
    return plain, synced


def run(layer, x, task, dy, through_checkpoint=False):
    x = x.detach().clone().requires_grad_()
    if through_checkpoint:
        out = recomputed(layer, layer, x, task)
    else:
        out = layer(x, task)
    out.backward(dy)
    grads = {f"{k}.grad": p.grad.clone() for k, p in layer.named_parameters()}
    layer.zero_grad()
    return {"out": out.detach(), "x.grad": x.grad, **grads, **layer.state_dict()}


def assert_same(mine, theirs):
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        torch.testing.assert_close(mine[k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", list(TASKS))
def test_synchronised_path_equals_task_batch_norm(forced, kind, momentum):
    torch.manual_seed(0)
    task = TASKS[kind]
    plain, synced = pair(momentum)
    for _ in range(2):  # the second step from the moved running statistics
        x, dy = torch.randn(6, 3, 5, 4), torch.randn(6, 3, 5, 4)
        assert_same(run(synced, x, task, dy), run(plain, x, task, dy))
    plain.eval(), synced.eval()
    torch.testing.assert_close(synced(x, task), plain(x, task))


def test_channels_last_stays_channels_last(forced):
    plain, synced = pair(0.1)
    x = torch.randn(6, 3, 5, 4).to(memory_format=torch.channels_last)
    out = synced(x, TASKS["unordered"])
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain(x, TASKS["unordered"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["int", "unordered"])
def test_recomputation_moves_running_statistics_once(forced, kind, momentum):
    torch.manual_seed(0)
    task = TASKS[kind]
    plain, synced = pair(momentum)
    x, dy = torch.randn(6, 3, 5, 4), torch.randn(6, 3, 5, 4)
    assert_same(run(synced, x, task, dy, through_checkpoint=True), run(plain, x, task, dy))


def test_single_value_per_channel_raises(forced):
    _, synced = pair(0.1)
    with pytest.raises(ValueError, match=r"tasks \[3\] have a single 1x1 sample"):
        synced(torch.randn(3, 3, 1, 1), torch.tensor([0, 0, 3]))


def test_conversion_shares_parameters_buffers_and_state_dict_keys():
    model = nn.ModuleDict({"task": TaskBatchNorm2d(3, 4, momentum=None), "bn": nn.BatchNorm2d(3)})
    model.eval()
    before = dict(model.state_dict(keep_vars=True))
    convert_sync_batchnorm(model)
    assert type(model["task"]) is SyncTaskBatchNorm2d and type(model["bn"]) is SyncBatchNorm
    assert model["task"].momentum is None and not model["task"].training
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is v for k, v in before.items())
    # without a process group it is the task batch norm
    plain = TaskBatchNorm2d(3, 4, momentum=None)
    plain.load_state_dict(model["task"].state_dict())
    x, task = torch.randn(4, 3, 2, 2), torch.tensor([1, 0, 1, 3])
    for m in (model, plain):
        m.train()
    torch.testing.assert_close(model["task"](x, task), plain(x, task))
    torch.testing.assert_close(model["task"].running_var, plain.running_var)
