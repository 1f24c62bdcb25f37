"""The trainer's procedure section and auxiliary tasks: each shipped synthetic config of a
procedure trains (a short version of its run), procedures' state rides in checkpoints."""

import pytest
import torch

from mtlfast.train import ConfigError, Trainer, load_config
from mtlfast.train.data import train_loader
from mtlfast.train.procedures import ASTMTProcedure, UberNetAsyncProcedure

from .helpers import tiny_config

SHORT = [
    "train.max_steps=2",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.log_every=1",
    "train.threads=1",
    "train.progress=false",
    "train.plots=false",
    "train.tensorboard=false",
    "data.size=32",
    "data.train_samples=16",
    "data.eval_samples=4",
    "data.num_workers=0",
    "eval.edge_thresholds=3",
    "eval.bn_recalibration=0",
    "eval.before_training=false",
]
SMALLER = {
    "astmt_synthetic": [
        "model.options.width=0.125",
        "model.options.head_channels=8",
        "data.batch_size=4",
        "tasks=[semseg, normals, edge]",
        "loss.weights={semseg: 1.0, normals: 10.0, edge: 50.0}",
        "procedure.options.task_lr_multiplier=3.0",
    ],
    "ubernet_synthetic": ["model.options.width=0.125", "data.batch_size=6"],
    "mtinet_synthetic_aux": ["data.batch_size=2"],
}


@pytest.mark.parametrize("name", sorted(SMALLER))
def test_each_shipped_synthetic_procedure_config_trains(name):
    """Two steps of the shipped config, smaller (the full run: ``mtlfast train <config>``, whose
    figures against the constant predictors the README gives)."""
    config = load_config(name, SHORT + SMALLER[name])
    trainer = Trainer(config)
    batches = iter(train_loader(config, trainer.train_set))
    for _ in range(2):
        result = trainer.train_step(next(batches))
        assert result.applied and all(bool(torch.isfinite(v)) for v in result.losses.values())
    assert set(config.tasks) <= set(result.losses)
    kind = {"astmt_synthetic": ASTMTProcedure, "ubernet_synthetic": UberNetAsyncProcedure}
    assert type(trainer.procedure) is kind.get(name, type(None))
    if name == "mtinet_synthetic_aux":  # normals and edge: front-end-only auxiliary tasks
        assert trainer.model.tasks == ["semseg", "depth", "normals", "edge"]
        assert "normals" not in result.losses  # their final outputs do not train
        assert "deep_supervision/scale_0/normals" in result.losses
        assert trainer.tasks == ["semseg", "depth"]  # nor are they evaluated


def _astmt(*overrides):
    return tiny_config(
        "model.name=astmt",
        "model.backbone=se_resnet26",
        "model.options={width: 0.125, head_channels: 8}",
        "optim.name=sgd",
        "optim.lr=0.01",
        "procedure.name=astmt",
        *overrides,
        tasks=["semseg", "normals", "edge"],
    )


def test_astmt_procedure_in_the_trainer():
    config = _astmt("procedure.options={task_lr_multiplier: 3.0}")
    trainer = Trainer(config)
    proc = trainer.procedure
    disc = list(proc.discriminator.parameters())
    groups = trainer.optimizer.param_groups
    assert groups[-1]["params"] == disc and groups[-1]["lr"] == pytest.approx(0.1)
    assert len(trainer.scheduler.base_lrs) == len(groups)
    head = {id(p) for p in trainer.model.heads.parameters()}
    assert all(
        g["lr"] == pytest.approx(0.03) for g in groups if head & {id(p) for p in g["params"]}
    )
    batch = next(iter(train_loader(trainer.config, trainer.train_set)))
    before = [p.detach().clone() for p in disc]
    result = trainer.train_step(batch)
    assert result.applied and set(result.losses) == {"semseg", "normals", "edge", "discriminator"}
    assert any(not torch.equal(a, b) for a, b in zip(before, disc))  # the discriminator trains
    resumed = Trainer(config)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.procedure.steps == 1
    for a, b in zip(disc, resumed.procedure.discriminator.parameters()):
        assert torch.equal(a, b)


def test_astmt_ablation_without_adversarial_term():
    trainer = Trainer(_astmt("procedure.options={adversarial: false}"))
    assert trainer.procedure.discriminator is None
    batch = next(iter(train_loader(trainer.config, trainer.train_set)))
    assert set(trainer.train_step(batch).losses) == {"semseg", "normals", "edge"}


def _ubernet(*overrides):
    return tiny_config(
        "model.name=ubernet",
        "model.backbone=vgg16",
        "model.options={width: 0.125, scales: [1.0]}",
        "optim.name=sgd",
        "optim.lr=0.01",
        "optim.momentum=0.0",
        "data.batch_size=4",
        "data.labels=[[semseg, saliency], [normals], [depth]]",
        "procedure.name=ubernet_async",
        "procedure.options={shared_batch: 8, task_batch: 3}",
        *overrides,
    )


def test_ubernet_async_updates_a_group_once_its_samples_are_in():
    trainer = Trainer(_ubernet())
    asgd = trainer.procedure.async_sgd
    trunk = next(trainer.model.backbone.parameters())
    start = trunk.detach().clone()
    batches = iter(train_loader(trainer.config, trainer.train_set))
    trainer.train_step(next(batches))  # 4 samples < B_0 = 8: the trunk waits
    assert torch.equal(trunk, start) and asgd.counters["shared"] == 4
    assert asgd.counters["normals"] == 1  # sources cycle: one sample in 3 labelled for normals
    trainer.train_step(next(batches))
    assert not torch.equal(trunk, start) and asgd.counters["shared"] == 0
    trainer.train_step(next(batches))
    resumed = Trainer(_ubernet())
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.procedure.async_sgd.counters == asgd.counters
    for a, b in zip(
        asgd.accumulators["normals"], resumed.procedure.async_sgd.accumulators["normals"]
    ):
        assert (a is None and b is None) or torch.equal(a, b)


def test_procedure_and_auxiliary_errors():
    with pytest.raises(ValueError, match="procedure.options"):
        Trainer(_astmt("procedure.options={not_an_option: 1}"))
    with pytest.raises(ValueError, match="astmt"):
        Trainer(tiny_config("procedure.name=astmt"))  # the baseline is not an ASTMT
    with pytest.raises(ConfigError, match="procedure.name"):
        tiny_config("procedure.name=sgd")
    with pytest.raises(ConfigError, match="loss.auxiliary"):
        tiny_config("loss.auxiliary=[semseg]")
    with pytest.raises(ValueError, match="deep-supervision"):
        Trainer(tiny_config("loss.auxiliary=[edge]"))  # the baseline has no deep supervision


def test_public_names():
    from mtlfast.train import procedures

    assert sorted(procedures.__all__) == [
        "ASTMTProcedure",
        "PROCEDURES",
        "Procedure",
        "UberNetAsyncProcedure",
        "UsedWeightsOnly",
        "build_procedure",
        "ganin_weight",
        "reverse_gradient",
    ]
    for name in procedures.__all__:
        assert getattr(procedures, name).__doc__, name
