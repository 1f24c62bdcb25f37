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
