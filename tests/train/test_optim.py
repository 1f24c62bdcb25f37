"""Optimiser groups and the per-step learning-rate schedule."""

import pytest
import torch
from torch import nn

from mtlfast.train.config import OptimConfig, ScheduleConfig
from mtlfast.train.optim import LRFactor, build_optimizer, build_scheduler


def _model():
    return nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            "heads": nn.ModuleDict({"a": nn.Conv2d(4, 2, 1), "ab": nn.Conv2d(4, 2, 1)}),
        }
    )


def test_poly_with_warmup():
    f = LRFactor(
        ScheduleConfig(kind="poly", power=0.9, warmup_steps=10, warmup_factor=0.1), max_steps=100
    )
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx((1 - 10 / 100) ** 0.9) and f(100) == 0.0
    cos = LRFactor(ScheduleConfig(kind="cosine"), 100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert LRFactor(ScheduleConfig(kind="constant"), 100)(77) == 1.0


def test_scheduler_steps_per_step_and_saves_as_data(tmp_path):
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.1))
    sched = build_scheduler(opt, ScheduleConfig(kind="poly", power=1.0), max_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025])
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    torch.load(tmp_path / "s.pt", weights_only=True)


def test_multipliers_longest_prefix_and_norm_decay():
    model = _model()
    opt = build_optimizer(
        model,
        OptimConfig(
            name="adamw",
            lr=1.0,
            weight_decay=0.5,
            lr_multipliers={"heads": 10.0, "heads.ab": 3.0},
            no_weight_decay_on_norms=True,
        ),
    )
    lr_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    assert lr_of[id(model["heads"]["a"].weight)] == (10.0, 0.5)
    assert lr_of[id(model["heads"]["ab"].weight)] == (3.0, 0.5)
    assert lr_of[id(model["backbone"][0].weight)] == (1.0, 0.5)
    assert lr_of[id(model["backbone"][1].weight)] == (1.0, 0.0)
    with pytest.raises(ValueError, match="no parameter name starts with"):
        build_optimizer(model, OptimConfig(lr_multipliers={"head": 2.0}))
    frozen = build_optimizer(model, OptimConfig(lr_multipliers={"backbone": 0.0}))
    assert sum(len(g["params"]) for g in frozen.param_groups) == 4


CL = torch.channels_last
CONFIGS = {
    "sgd": OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-2),
    "nesterov": OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": OptimConfig(name="adam", lr=0.05, weight_decay=1e-2),
    "adamw": OptimConfig(name="adamw", lr=0.05, weight_decay=1e-2),
}


def _pair(name, **kw):
    """The same float64 model under the fused optimiser and under torch's loop."""
    out = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = _model().double()
        config = OptimConfig(**{**CONFIGS[name].__dict__, "fused": fused, **kw})
        out.append((model, build_optimizer(model, config)))
    return out


def _grads(model, step, skip=()):
    g = torch.Generator().manual_seed(step)
    for n, p in model.named_parameters():
        p.grad = (
            None
            if any(n.startswith(s) for s in skip)
            else torch.randn(p.shape, generator=g, dtype=p.dtype)
        )


def _assert_same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=n)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_steps_like_the_loop(name):
    (fm, fo), (lm, lo) = _pair(name)
    assert fo.defaults.get("fused") and not lo.defaults.get("fused")
    assert isinstance(fo, type(lo))  # a subclass: schedulers and scalers see torch's class
    for step in range(4):
        for m, o in ((fm, fo), (lm, lo)):
            _grads(m, step)
            o.step()
        _assert_same(fm, lm)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_with_state_and_gradients_in_another_layout(name):
    """torch's fused kernels walk memory in order: a channels-last weight with NCHW momentum (its
    state made before a layout switch, or loaded from the other layout) or an NCHW gradient would
    be updated with the wrong elements. The steps match the loop's."""
    (fm, fo), (lm, lo) = _pair(name)
    for step in range(3):
        if step == 1:  # the layout trial's switch, after the state exists
            for m in (fm, lm):
                m.to(memory_format=CL)
        for m, o in ((fm, fo), (lm, lo)):
            _grads(m, step)
            if step == 2:  # a gradient in the other layout
                w = m["backbone"][0].weight
                w.grad = w.grad.contiguous()
            o.step()
        _assert_same(fm, lm)
    w = fm["backbone"][0].weight
    assert w.is_contiguous(memory_format=CL) and not w.is_contiguous()


@pytest.mark.parametrize("name", ["sgd", "nesterov"])
def test_fused_sgd_with_a_head_first_seen_later(name):
    """A head with no gradient at the first step (its task absent) starts its momentum at its
    own first step, next to parameters that have momentum already, as the loop's does."""
    (fm, fo), (lm, lo) = _pair(name)
    for step in range(3):
        for m, o in ((fm, fo), (lm, lo)):
            _grads(m, step, skip=("heads.a",) if step == 0 else ())
            o.step()
        _assert_same(fm, lm)


def test_not_fused_when_asked_or_when_a_parameter_cannot_be():
    opt = build_optimizer(_model(), OptimConfig(name="sgd", fused=False))
    assert type(opt) is torch.optim.SGD and not opt.defaults.get("fused")
    model = _model()
    model["heads"]["a"].weight.data = model["heads"]["a"].weight.data.to(torch.complex64)
    assert not build_optimizer(model, OptimConfig(name="adam")).defaults.get("fused")


@pytest.mark.parametrize("saved,resumed", [(True, False), (False, True)])
def test_a_resumed_run_takes_its_own_optimiser_implementation(saved, resumed):
    """torch's load_state_dict brings the saved groups' flags back; the run's config decides."""
    from mtlfast.train import Trainer

    from .helpers import tiny_config

    a = Trainer(tiny_config("optim.name=sgd", f"optim.fused={str(saved).lower()}"))
    b = Trainer(tiny_config("optim.name=sgd", f"optim.fused={str(resumed).lower()}"))
    b.load_state_dict(a.state_dict())
    assert all(bool(g["fused"]) == resumed for g in b.optimizer.param_groups)
