"""The Trainer: a run's files, exact resume, non-finite steps, selection, optional extras."""

import builtins
import json
import math

import pytest
import torch

from mtlfast.train import NonFiniteLossError, Trainer, load_checkpoint
from mtlfast.train.data import ResumableBatchSampler, SeededAugmentation, train_loader

from .helpers import TASKS, tiny_config


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    results = Trainer(tiny_config("train.plots=true", "train.tensorboard=true"), run).fit()
    json.dumps(results)  # plain data
    for name in (
        "config.yaml",
        "log.csv",
        "results.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "plots/train_loss.png",
        "plots/val_metrics.png",
        "plots/learning_rate.png",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert "model" in best and best["step"] in (3, 6)
    assert results["steps"] == 6 and set(results["final"]["tasks"]) == set(TASKS)
    assert results["constant_predictor"]["tasks"].keys() == set(TASKS)
    assert [h["step"] for h in Trainer.resume(run).history] == [3, 6]
    # keep_last=2 step files, plus last and best
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.pt",
        "last.pt",
        "step_00000004.pt",
        "step_00000006.pt",
    ]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise_identical(tmp_path, monkeypatch, workers):
    config = tiny_config(
        f"data.num_workers={workers}", "train.max_steps=7", "train.checkpoint_every=3"
    )
    full = Trainer(config, tmp_path / "full")
    full.fit()
    expected = _params(full.model)

    interrupted = Trainer(config, tmp_path / "cut")
    step = interrupted.train_step

    def dies_at_step_5(batch):  # after the checkpoint of step 3, before the next one
        if interrupted.step == 4:
            raise _Stop
        return step(batch)

    monkeypatch.setattr(interrupted, "train_step", dies_at_step_5)
    with pytest.raises(_Stop):
        interrupted.fit()
    resumed = Trainer.resume(tmp_path / "cut")
    assert resumed.step == 3
    resumed.fit()
    _assert_same(_params(resumed.model), expected)
    # the log holds each step once
    rows = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:] if ",train/loss," in r]
    assert steps == sorted(set(steps)) == list(range(1, 8))


def test_resume_without_checkpoint_starts_again(tmp_path):
    Trainer(tiny_config("train.max_steps=2", "train.checkpoint_every=0"), tmp_path / "r").fit()
    for p in (tmp_path / "r" / "checkpoints").glob("step_*.pt"):
        p.unlink()
    trainer = Trainer.resume(tmp_path / "r")
    assert trainer.step == 0


def _nan_at(step_no, trainer, task="normals"):
    original = trainer.loss_fns[task]

    def loss(pred, target, *a, **k):
        value = original(pred, target, *a, **k)
        return value * float("nan") if trainer.step + 1 == step_no else value

    trainer.loss_fns[task] = loss


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    trainer = Trainer(
        tiny_config("train.max_steps=4", "train.eval_every=0", "train.checkpoint_every=0")
    )
    _nan_at(3, trainer)
    sampler = iter(
        torch.utils.data.DataLoader(
            SeededAugmentation(trainer.train_set, None, 0),
            batch_sampler=ResumableBatchSampler(64, 4, 0),
            collate_fn=__import__("mtlfast").data.collate,
        )
    )
    for _ in range(2):
        trainer.train_step(next(sampler))
    before = _params(trainer.model)
    opt_before = {
        k: v.clone()
        for k, v in trainer.optimizer.state_dict()["state"][0].items()
        if torch.is_tensor(v)
    }
    result = trainer.train_step(next(sampler))
    assert not result.applied and math.isnan(float(result.losses["normals"]))
    _assert_same(_params(trainer.model), before)  # weights and batch-norm statistics
    for k, v in trainer.optimizer.state_dict()["state"][0].items():
        if torch.is_tensor(v):
            assert torch.equal(v, opt_before[k])
    assert trainer.nonfinite["skipped"] == 1 and trainer.nonfinite["by_task"] == {"normals": 1}
    assert trainer.train_step(next(sampler)).applied
    assert trainer.nonfinite["consecutive"] == 0


def test_nonfinite_raise_and_max_consecutive():
    trainer = Trainer(tiny_config("train.nonfinite=raise"))
    _nan_at(1, trainer, "depth")
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                SeededAugmentation(trainer.train_set, None, 0),
                batch_size=4,
                collate_fn=__import__("mtlfast").data.collate,
            )
        )
    )
    with pytest.raises(NonFiniteLossError, match="step 1: non-finite loss or gradient from depth"):
        trainer.train_step(batch)
    trainer = Trainer(tiny_config("train.max_consecutive_nonfinite=2"))
    trainer.loss_fns["semseg"] = lambda p, t, *a, **k: p.sum() * float("inf")
    trainer.train_step(batch)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        trainer.train_step(batch)


def test_selection_by_a_named_metric(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("eval.select=depth/rmse", "train.max_steps=9"), tmp_path / "r")
    scripted = iter([4.0, 2.0, 3.0])

    def fake_evaluate(model=None, recalibrate=True):
        if model is not None:  # the constant predictor
            return {"tasks": {"depth": {"rmse": 5.0}}, "images": 1, "delta_m": None}
        return {"tasks": {"depth": {"rmse": next(scripted)}}, "images": 1, "delta_m": None}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    results = trainer.fit()
    assert results["best"]["step"] == 6 and results["best"]["score"] == -2.0
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")["step"] == 6


def test_works_without_tqdm_and_tensorboard(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_extras(name, *args, **kwargs):
        if name.startswith(("tqdm", "torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"no {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extras)
    run = tmp_path / "r"
    Trainer(
        tiny_config("train.progress=true", "train.tensorboard=true", "train.max_steps=2"), run
    ).fit()
    assert (run / "log.csv").is_file() and not (run / "tensorboard").exists()


def test_config_errors_reach_the_user():
    with pytest.raises(ValueError, match="loss.weights: tasks"):
        Trainer(tiny_config("loss.weights={edge: 2}"))
    with pytest.raises(ValueError, match="eval.select"):
        Trainer(tiny_config("eval.select=semseg"))
    with pytest.raises(ValueError, match="'delta_m' needs eval.baselines"):
        Trainer(tiny_config("eval.select=delta_m"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny_config("train.precision=fp16", "train.device=cpu"))
    with pytest.raises(ValueError, match="no source dataset is labelled for tasks"):
        Trainer(tiny_config("data.labels=[[semseg], [depth]]"), None).fit()


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path):
    Trainer(
        tiny_config("train.max_steps=2", "schedule.kind=poly", "schedule.power=1.0"), tmp_path / "r"
    ).fit()
    trainer = Trainer.resume(tmp_path / "r", ["train.max_steps=4"])
    assert trainer.step == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 2 / 4))


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path):
    config = tiny_config("train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=3")
    Trainer(config, tmp_path / "r").fit()
    newest = tmp_path / "r" / "checkpoints" / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="step_00000006.pt cannot be read"):
        trainer = Trainer.resume(tmp_path / "r")
    assert trainer.step == 4


def test_bf16_on_cpu_trains_like_fp32():
    """bf16 autocast reaches results within noise of fp32 on a short run (the same data and init)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        config = tiny_config(
            f"train.precision={precision}",
            "train.max_steps=30",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "data.eval_samples=16",
            "optim.lr=3e-3",
        )
        runs[precision] = Trainer(config).fit()
    for task in ("semseg", "saliency", "normals", "depth"):
        fp32 = runs["fp32"]["final"]["tasks"][task]
        bf16 = runs["bf16"]["final"]["tasks"][task]
        constant = runs["fp32"]["constant_predictor"]["tasks"][task]
        metric = {"semseg": "mIoU", "saliency": "mIoU", "normals": "mean", "depth": "rmse"}[task]
        # the gap between the two precisions is small against what training gained over a constant
        assert (
            abs(bf16[metric] - fp32[metric]) <= 0.25 * abs(fp32[metric] - constant[metric]) + 0.02
        ), (task, fp32, bf16)


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    from mtlfast.train import default_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert 1 <= default_threads() <= 4  # measured
    assert default_threads(0, load=0.1) == 4
    assert default_threads(1, load=0.0) == 3
    assert default_threads(0, load=2.2) == 2
    assert default_threads(0, load=7.5) == 1


def test_bf16_step_of_every_fused_layer_family():
    """MTI-Net (distillation, task SE) and UberNet (skip fusion) take a bf16 autocast step under
    the recompute engine, whose backward runs with autocast off."""
    for model in (
        {"name": "mtinet"},
        {
            "name": "ubernet",
            "backbone": "resnet18",
            "options": {"width": 0.125, "scales": [1.0, 0.5]},
        },
    ):
        config = tiny_config("train.precision=bf16", "data.batch_size=2", tasks=["semseg", "depth"])
        config.model.name, config.model.backbone = model["name"], model.get("backbone")
        config.model.options = model.get("options", {})
        trainer = Trainer(config)
        batch = next(
            iter(
                torch.utils.data.DataLoader(
                    SeededAugmentation(trainer.train_set, None, 0),
                    batch_size=2,
                    collate_fn=__import__("mtlfast").data.collate,
                )
            )
        )
        result = trainer.train_step(batch)
        assert result.applied and not result.nonfinite, model


def test_a_nonfinite_gradient_is_traced_to_its_task():
    trainer = Trainer(tiny_config())
    batch = next(
        iter(
            torch.utils.data.DataLoader(
                SeededAugmentation(trainer.train_set, None, 0),
                batch_size=4,
                collate_fn=__import__("mtlfast").data.collate,
            )
        )
    )

    class _InfGrad(torch.autograd.Function):  # finite forward, infinite backward
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    original = trainer.loss_fns["depth"]
    trainer.loss_fns["depth"] = lambda p, t, *a, **k: original(_InfGrad.apply(p), t, *a, **k)
    result = trainer.train_step(batch)
    assert not result.applied and not result.nonfinite  # every loss was finite
    assert "depth (gradient)" in trainer.nonfinite["by_task"]


@pytest.mark.parametrize(
    ("configured", "preferred", "expected"),
    [(None, None, None), (None, 2, 2), (None, 99, "all"), (3, 2, 3), (1, None, 1)],
)
def test_engine_segments_come_from_the_config_else_the_model(
    monkeypatch, configured, preferred, expected
):
    """``train.segments`` wins; unset, the model's ``engine_segments`` (at most the trunk's
    modules); neither, None (the engine's round(sqrt(L)))."""
    from mtlfast.train import trainer as trainer_module

    overrides = [] if configured is None else [f"train.segments={configured}"]
    trainer = Trainer(tiny_config(*overrides, "train.max_steps=1"))
    monkeypatch.setattr(type(trainer.model), "engine_segments", preferred, raising=False)
    seen = []
    real = trainer_module.multi_branch_step
    monkeypatch.setattr(
        trainer_module,
        "multi_branch_step",
        lambda *a, **k: seen.append((len(a[0]), k["segments"])) or real(*a, **k),
    )
    trainer.train_step(next(iter(trainer_module.train_loader(trainer.config, trainer.train_set))))
    ((length, segments),) = seen
    assert segments == (length if expected == "all" else expected)


def test_mtinet_and_ubernet_prefer_two_segments():
    from mtlfast.models import MTINet, PADNet, UberNet

    assert MTINet.engine_segments == UberNet.engine_segments == 2
    assert PADNet.engine_segments is None


@pytest.mark.parametrize(
    "algorithm,deterministic,autotune",
    [("auto", False, True), ("auto", True, False), ("winograd", False, False)],
)
def test_conv_algorithm_sets_the_winograd_autotune(monkeypatch, algorithm, deterministic, autotune):
    """ "auto" measures each convolution shape (process-wide, like cudnn.benchmark), unless the
    run is deterministic; "winograd" takes the fixed rule; "direct" leaves the switch alone."""
    import mtlfast.ops.winograd_conv as wc

    monkeypatch.setattr(wc, "_autotune", not autotune)
    overrides = [f"train.conv_algorithm={algorithm}", f"train.deterministic={deterministic}"]
    try:
        Trainer(tiny_config(*overrides), datasets=((), ()))
    finally:  # a deterministic run switches torch's flag process-wide
        torch.use_deterministic_algorithms(False)
    assert wc._autotune is autotune
    Trainer(tiny_config("train.conv_algorithm=direct"), datasets=((), ()))
    assert wc._autotune is autotune


def test_conv_algorithm_auto_says_what_it_measured(monkeypatch, capsys):
    """After the first step, once: how many of the measured shapes kept Winograd."""
    import mtlfast.ops.winograd_conv as wc

    trainer = Trainer(tiny_config(), datasets=None)
    monkeypatch.setattr(wc, "_choices", {(1,): True, (2,): False})
    batch = next(iter(train_loader(trainer.config, trainer.train_set)))
    trainer.train_step(batch)
    trainer.train_step(batch)
    out = capsys.readouterr().out
    assert out.count("conv_algorithm auto: Winograd kept at 1 of the 2 convolution shapes") == 1
