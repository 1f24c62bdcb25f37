"""The trainer's ``balancing`` section: default unchanged, weights logged and plotted, resume."""

import pytest
import torch

import mtlfast.train.trainer as trainer_module
from mtlfast.train import ConfigError, Trainer
from mtlfast.train.data import train_loader
from mtlfast.train.runlog import read_log

from ..train.helpers import TASKS, tiny_config

GRADNORM = ("balancing.name=gradnorm", "balancing.options={alpha: 1.5, lr: 0.05}")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _steps(trainer, n):
    batches = iter(train_loader(trainer.config, trainer.train_set))
    for _ in range(n):
        trainer.train_step(next(batches))


def test_default_fixed_is_the_engine_without_a_balancer(monkeypatch):
    config = tiny_config()
    assert config.balancing.name == "fixed" and config.balancing.options == {}
    with_fixed = Trainer(config)
    _steps(with_fixed, 3)
    original = trainer_module.multi_branch_step

    def without_balancer(*args, balancer=None, **kwargs):
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "multi_branch_step", without_balancer)
    plain = Trainer(config)
    _steps(plain, 3)
    a, b = _params(with_fixed.model), _params(plain.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_are_logged_every_step_and_plotted(tmp_path):
    config = tiny_config(
        *GRADNORM,
        "train.max_steps=4",
        "train.eval_every=0",
        "train.plots=true",
        "loss.weights={semseg: 2.0}",
    )
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    rows = [
        r for r in read_log(tmp_path / "run" / "log.csv") if r["tag"].startswith("train/weight/")
    ]
    assert sorted({r["tag"] for r in rows}) == sorted(f"train/weight/{t}" for t in TASKS)
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], {})[r["tag"].split("/")[-1]] = r["value"]
    assert sorted(by_step) == [1, 2, 3, 4]
    for values in by_step.values():  # loss.weights times GradNorm's, which sum to T
        assert sum(values.values()) - values["semseg"] / 2 == pytest.approx(len(TASKS), rel=1e-5)
    assert by_step[4]["depth"] != 1.0
    assert (tmp_path / "run" / "plots" / "task_weights.png").is_file()


def test_resume_keeps_the_balancer_state(tmp_path, monkeypatch):
    config = tiny_config(
        *GRADNORM, "train.max_steps=5", "train.checkpoint_every=3", "train.eval_every=0"
    )
    full = Trainer(config, tmp_path / "full")
    full.fit()

    class Stop(Exception):
        pass

    cut = Trainer(config, tmp_path / "cut")
    step = cut.train_step

    def dies_at_step_4(batch):
        if cut.step == 3:
            raise Stop
        return step(batch)

    monkeypatch.setattr(cut, "train_step", dies_at_step_4)
    with pytest.raises(Stop):
        cut.fit()
    resumed = Trainer.resume(tmp_path / "cut")
    assert resumed.step == 3 and int(resumed.balancer.steps) == 3
    resumed.fit()
    a, b = _params(full.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.balancer.weights == full.balancer.weights
    sa, sb = full.balancer.state_dict(), resumed.balancer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="balancing.name must be one of fixed, gradnorm"):
        tiny_config("balancing.name=gradnrom")
    with pytest.raises(ValueError, match="balancing: gradnorm: .*alhpa"):
        Trainer(tiny_config("balancing.name=gradnorm", "balancing.options={alhpa: 1}"))
