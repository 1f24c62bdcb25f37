"""State dicts round-trip through checkpoints; create() and the public names."""

import io

import pytest
import torch

from mtlfast import balancing
from mtlfast.engine import multi_branch_step

from .models import LOSS_FNS, OUTS, batch, network, zero

OPTIONS = {"gradnorm": {"alpha": 0.5, "lr": 0.1, "initial_steps": 3}, "dwa": {"period": 2}}


def test_public_names():
    assert sorted(balancing.__all__) == sorted(
        [
            "Balancer",
            "CAGrad",
            "DWA",
            "METHODS",
            "MGDA",
            "Fixed",
            "GradNorm",
            "PCGrad",
            "Uncertainty",
            "create",
        ]
    )
    assert set(balancing.METHODS) == {
        "fixed",
        "gradnorm",
        "uncertainty",
        "dwa",
        "mgda",
        "pcgrad",
        "cagrad",
    }


@pytest.mark.parametrize("name", list(balancing.METHODS))
def test_state_dict_round_trip_resumes_exactly(name):
    """Two steps, a save (weights_only load), then steps continue alike in the saved and loaded."""
    trunk, heads = network()
    b = balancing.create(name, list(OUTS), **OPTIONS.get(name, {})).double()
    for step in range(2):
        x, targets = batch(seed=step)
        multi_branch_step(trunk, heads, x, targets, LOSS_FNS, balancer=b)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    fresh = balancing.create(name, list(OUTS), **OPTIONS.get(name, {})).double()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.weights == b.weights
    grads = []
    for balancer in (b, fresh):
        t, h = network(seed=5)
        for step in range(2, 5):
            zero(t, h)
            x, targets = batch(seed=step)
            multi_branch_step(t, h, x, targets, LOSS_FNS, balancer=balancer)
        grads.append([p.grad for m in (t, h) for p in m.parameters()])
    assert fresh.weights == b.weights
    assert all(torch.equal(x, y) for x, y in zip(*grads))
    for (k, v), (k2, v2) in zip(b.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and (not isinstance(v, torch.Tensor) or torch.equal(v, v2))


def test_gradnorm_state_holds_its_adam():
    b = balancing.GradNorm(["a", "b"])
    for t in "ab":
        b.observe(t, [torch.ones(2, 2) * (1 if t == "a" else 3)])
    b.update({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    state = b.state_dict()
    assert set(state) == {
        "task_weights",
        "initial_losses",
        "initial_counts",
        "steps",
        "_extra_state",
    }
    assert state["_extra_state"]["optimizer"]["state"][0]["exp_avg"].shape == (2,)


def test_create_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown balancing method 'gradnrom'"):
        balancing.create("gradnrom", ["a"])
    with pytest.raises(ValueError, match="its options: alpha, lr, layer"):
        balancing.create("gradnorm", ["a"], alhpa=1.0)
    with pytest.raises(ValueError, match="distinct"):
        balancing.create("mgda", ["a", "a"])
    with pytest.raises(ValueError, match="alpha must be non-negative"):
        balancing.GradNorm(["a"], alpha=-1)
    with pytest.raises(ValueError, match="normalize"):
        balancing.MGDA(["a"], normalize="L2")
    with pytest.raises(ValueError, match="weights\\['a'\\]"):
        balancing.Fixed(["a"], weights={"a": float("nan")})
    with pytest.raises(ValueError, match="not one of tasks"):
        balancing.Fixed(["a"]).backward(
            {"b": torch.ones((), requires_grad=True)}, torch.ones(1, requires_grad=True)
        )
