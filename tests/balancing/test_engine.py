"""Every method through the engine (recompute and naive) against plain autograd."""

import weakref

import pytest
import torch
from torch import nn

from mtlfast import balancing
from mtlfast.engine import multi_branch_step

from .models import LOSS_FNS, OUTS, N, batch, mse, network, run, zero

METHODS = list(balancing.METHODS)
TIGHT = {"rtol": 1e-9, "atol": 1e-12}
OPTIONS = {"gradnorm": {"alpha": 0.5, "lr": 0.1}, "dwa": {"period": 1}, "uncertainty": {"lr": 0.1}}


def assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TIGHT)


@pytest.mark.parametrize("strategy", ["recompute", "naive"])
@pytest.mark.parametrize("name", METHODS)
def test_engine_equals_plain_autograd(name, strategy):
    kw = {"options": OPTIONS.get(name), "weights": {"seg": 2.0, "depth": 0.5}}
    expected, b_plain = run("plain", name, **kw)
    got, b_engine = run(strategy, name, segments=2, **kw)
    assert_same(got, expected)
    assert b_engine.weights == pytest.approx(b_plain.weights, rel=1e-9, abs=1e-12)
    for (k, v), (k2, v2) in zip(b_engine.state_dict().items(), b_plain.state_dict().items()):
        assert k == k2
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, v2, **TIGHT)


@pytest.mark.parametrize("name", ["gradnorm", "mgda", "pcgrad"])
def test_partially_labelled_batches(name):
    labeled = {
        "seg": torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool),
        "normals": torch.tensor([0, 0, 0, 0, 1, 0], dtype=torch.bool),
    }
    kw = {"options": OPTIONS.get(name), "labeled": labeled}
    expected, _ = run("plain", name, **kw)
    assert_same(run("recompute", name, segments=3, **kw)[0], expected)


class Joint(nn.Module):
    """A joint decoder predicting seg and depth, and a deep-supervision seg."""

    tasks = ("seg", "deep/seg", "depth")

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 8, 1)
        self.out = nn.ModuleDict(
            {"seg": nn.Conv2d(8, 3, 1), "deep": nn.Conv2d(4, 3, 1), "depth": nn.Conv2d(8, 1, 1)}
        )

    def forward(self, x):
        y = torch.relu(self.shared(x))
        return {
            "seg": self.out["seg"](y),
            "deep/seg": self.out["deep"](x),
            "depth": self.out["depth"](y),
        }


@pytest.mark.parametrize("name", ["gradnorm", "mgda", "cagrad", "uncertainty"])
@pytest.mark.parametrize("strategy", ["recompute", "naive"])
def test_joint_head_and_deep_supervision_keys(name, strategy):
    """A key's balancer task is the key or its component; the task's loss sums its keys."""
    torch.manual_seed(0)
    trunk, _ = network()
    heads = nn.ModuleDict({"joint": Joint(), "normals": nn.Conv2d(4, 2, 1)}).double()
    x, targets = batch()
    targets["deep/seg"] = targets["seg"]
    weights = {"seg": 2.0, "deep/seg": 0.5}
    results = []
    for mode in ("plain", strategy):
        t, h = _copy(trunk), _copy(heads)
        b = balancing.create(name, list(OUTS), **OPTIONS.get(name, {})).double()
        for _ in range(2):
            zero(t, h)
            if mode == "plain":
                f = t(x)
                out = h["joint"](f)
                losses = {
                    "seg": 2.0 * mse(out["seg"], targets["seg"])
                    + 0.5 * mse(out["deep/seg"], targets["seg"]),
                    "depth": mse(out["depth"], targets["depth"]),
                    "normals": mse(h["normals"](f), targets["normals"]),
                }
                b.backward(losses, f, shared=t)
            else:
                fns = dict(LOSS_FNS, **{"deep/seg": mse})
                multi_branch_step(
                    t, h, x, targets, fns, weights=weights, strategy=mode, segments=2, balancer=b
                )
        results.append(([p.grad.clone() for m in (t, h) for p in m.parameters()], b.weights))
    assert_same(results[1][0], results[0][0])
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-9, abs=1e-12)


def _copy(m):
    import copy

    return copy.deepcopy(m)


def test_task_grads_are_left_intact_next_to_a_balancer():
    """keep_task_grads with a gradient method returns what it returns without one."""
    x, targets = batch()
    heads_j = nn.ModuleDict({"joint": Joint(), "normals": nn.Conv2d(4, 2, 1)}).double()
    targets["deep/seg"] = targets["seg"]
    fns = dict(LOSS_FNS, **{"deep/seg": mse})
    out = []
    for balancer in (None, balancing.MGDA(list(OUTS))):
        trunk, _ = network()
        r = multi_branch_step(
            trunk, _copy(heads_j), x, targets, fns, keep_task_grads=True, balancer=balancer
        )
        out.append(r.task_grads)
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=0, atol=0)


def test_gradnorm_needs_the_graph_of_its_layer():
    trunk, heads = network()
    x, targets = batch()
    b = balancing.GradNorm(list(OUTS))
    with pytest.raises(ValueError, match="segments >= 2"):
        multi_branch_step(trunk, heads, x, targets, LOSS_FNS, segments=1, balancer=b)
    b = balancing.GradNorm(list(OUTS), layer="0")
    with pytest.raises(ValueError, match="not in the last trunk segment"):
        multi_branch_step(trunk, heads, x, targets, LOSS_FNS, segments=2, balancer=b)
    # naive mode has the whole graph: any shared layer
    multi_branch_step(trunk, heads, x, targets, LOSS_FNS, strategy="naive", balancer=b)
    assert b.layer_name == "0" and int(b.steps) == 1
    with pytest.raises(ValueError, match="no module of that name"):
        multi_branch_step(
            trunk,
            heads,
            x,
            targets,
            LOSS_FNS,
            balancer=balancing.GradNorm(list(OUTS), layer="nope"),
        )


def test_a_key_outside_the_balancers_tasks_is_refused():
    trunk, heads = network()
    x, targets = batch()
    with pytest.raises(ValueError, match="not one of the balancer's tasks"):
        multi_branch_step(
            trunk, heads, x, targets, LOSS_FNS, balancer=balancing.DWA(["seg", "depth"])
        )
    with pytest.raises(TypeError, match="protocol"):
        multi_branch_step(trunk, heads, x, targets, LOSS_FNS, balancer=object())


def test_skipped_tasks_leave_their_weights():
    """A task without a label in the batch takes no part in GradNorm's update."""
    trunk, heads = network()
    x, targets = batch()
    b = balancing.GradNorm(list(OUTS), lr=0.1)
    labeled = {"depth": torch.zeros(N, dtype=torch.bool)}
    for _ in range(3):
        multi_branch_step(trunk, heads, x, targets, LOSS_FNS, labeled=labeled, balancer=b)
    assert int(b.initial_counts[1]) == 0 and int(b.initial_counts[0]) == 1
    assert abs(sum(b.weights.values()) - 3) < 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_gradient_methods_hold_no_trunk_graph_next_to_the_task_gradients(name):
    """MGDA, PCGrad and CAGrad hold T branching-point gradients while the heads run: the last
    trunk segment is recomputed for them, so none of its saved tensors is alive then; the other
    methods keep its graph from the forward (GradNorm needs it)."""
    trunk, heads = network()
    x, targets = batch()
    saved: list[weakref.ref] = []

    class Box:
        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t)
        saved.append(weakref.ref(box))
        return box

    alive = []

    def count(_module, _args):
        alive.append(sum(r() is not None for r in saved))

    handles = [h.register_forward_pre_hook(count) for h in heads.values()]
    b = balancing.create(name, list(OUTS), **(OPTIONS.get(name) or {}))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        multi_branch_step(trunk, heads, x, targets, LOSS_FNS, segments=2, balancer=b)
    for h in handles:
        h.remove()
    assert len(alive) == len(OUTS) and len(set(alive)) == 1
    assert (alive[0] == 0) == (b.needs == "features")
