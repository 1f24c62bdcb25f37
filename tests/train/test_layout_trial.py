"""``train.memory_format: auto``: the first steps alternate layouts, are timed, and the faster stays."""

import pytest
import torch

from mtlfast.train import Trainer, _layout, build_model
from mtlfast.train._layout import LayoutTrial, to_memory_format
from mtlfast.train.data import train_loader

from .helpers import tiny_config

CL, NCHW = torch.channels_last, torch.contiguous_format


def _fake_clock(monkeypatch):
    """A clock the test advances: ``clock["t"] += seconds`` between a step's start and stop."""
    state = {"t": 0.0}
    monkeypatch.setattr(_layout, "_now", lambda: state["t"])
    return state


def _run(trial: LayoutTrial, clock: dict, seconds: dict) -> list:
    used = []
    while trial.choice is None:
        fmt = trial.next_format()
        used.append(fmt)
        trial.start()
        clock["t"] += seconds[fmt]
        trial.stop()
    return used


@pytest.mark.parametrize(
    ("cl_s", "expected"),
    [(0.8, CL), (0.96, CL), (0.98, NCHW), (1.0, NCHW), (1.3, NCHW)],
)
def test_trial_keeps_channels_last_only_when_clearly_faster(monkeypatch, cl_s, expected):
    clock = _fake_clock(monkeypatch)
    trial = LayoutTrial(torch.device("cpu"))
    used = _run(trial, clock, {NCHW: 1.0, CL: cl_s})
    # one untimed step each, then rounds whose order alternates
    assert used == [NCHW, CL, CL, NCHW, NCHW, CL, CL, NCHW]
    assert trial.choice == expected
    assert trial.times == {
        "contiguous": pytest.approx([1.0] * 3),
        "channels_last": pytest.approx([cl_s] * 3),
    }
    assert trial.next_format() == expected
    assert "memory_format auto: " + ("channels_last" if expected == CL else "contiguous") in (
        trial.summary()
    )


def test_trial_takes_the_median_of_the_rounds_ratios(monkeypatch):
    """One slow step (the machine busy) does not decide: the median of the rounds' ratios does."""
    clock = _fake_clock(monkeypatch)
    trial = LayoutTrial(torch.device("cpu"))
    times = iter([5.0, 5.0, 0.9, 3.0, 1.0, 0.9, 0.9, 1.0])  # in schedule order
    while trial.choice is None:
        trial.start()
        clock["t"] += next(times)
        trial.stop()
    assert trial.choice == CL
    with pytest.raises(ValueError, match="rounds"):
        LayoutTrial(torch.device("cpu"), rounds=0)


def test_to_memory_format_takes_gradients_and_optimiser_state_along():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    weight = model[0].weight
    to_memory_format(model, CL, opt)
    assert weight is model[0].weight and weight.is_contiguous(memory_format=CL)
    assert weight.grad.is_contiguous(memory_format=CL)
    assert opt.state[weight]["momentum_buffer"].is_contiguous(memory_format=CL)
    assert model[0].bias.is_contiguous()  # 1-d: untouched
    to_memory_format(model, NCHW, opt)
    assert weight.is_contiguous() and opt.state[weight]["momentum_buffer"].is_contiguous()


def _layouts_seen(trainer, monkeypatch) -> list:
    seen = []
    step = trainer._train_step

    def recording(batch):
        w = next(p for p in trainer.model.parameters() if p.dim() == 4)
        seen.append(CL if w.is_contiguous(memory_format=CL) and not w.is_contiguous() else NCHW)
        return step(batch)

    monkeypatch.setattr(trainer, "_train_step", recording)
    return seen


@pytest.mark.parametrize("cl_s", [0.5, 2.0])
def test_trainer_runs_the_trial_and_keeps_the_faster_layout(monkeypatch, capsys, cl_s):
    """The weights are in each step's layout; after the trial the chosen one stays, is printed
    and goes into the results."""
    config = tiny_config("train.max_steps=20", "train.eval_every=0", "train.checkpoint_every=0")
    trainer = Trainer(config)
    assert trainer.memory_format == NCHW
    seen = _layouts_seen(trainer, monkeypatch)
    clock = _fake_clock(monkeypatch)
    real = trainer._train_step

    def timed(batch):
        out = real(batch)
        clock["t"] += cl_s if seen[-1] == CL else 1.0
        return out

    monkeypatch.setattr(trainer, "_train_step", timed)
    batches = iter(train_loader(trainer.config, trainer.train_set))
    for _ in range(10):
        trainer.train_step(next(batches))
    chosen = CL if cl_s < 1 else NCHW
    assert seen == [NCHW, CL, CL, NCHW, NCHW, CL, CL, NCHW, chosen, chosen]
    assert trainer.memory_format == chosen
    name = "channels_last" if chosen == CL else "contiguous"
    assert capsys.readouterr().out.count(f"memory_format auto: {name}") == 1
    image = trainer._formatted({"image": torch.randn(2, 3, 8, 8)})["image"]
    assert image.is_contiguous(memory_format=chosen)
    results = trainer.results()
    assert results["memory_format"] == name
    assert results["memory_format_trial_s"]["contiguous"] == pytest.approx([1.0] * 3)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.max_steps=19"],  # too short to be worth it
        ["train.max_steps=40", "train.deterministic=true"],
        ["train.max_steps=40", "train.memory_format=contiguous"],
    ],
)
def test_no_trial_for_short_deterministic_or_fixed_runs(monkeypatch, overrides):
    trainer = Trainer(tiny_config(*overrides))
    seen = _layouts_seen(trainer, monkeypatch)
    batches = iter(train_loader(trainer.config, trainer.train_set))
    for _ in range(3):
        trainer.train_step(next(batches))
    assert seen == [NCHW] * 3
    assert trainer.results()["memory_format_trial_s"] is None


def test_a_trial_trains_the_network_a_contiguous_run_trains():
    """The trial's steps switch layouts under the optimiser's state: in float64 the weights
    after it match a contiguous run's (as the layouts' float64 sums differ by 1e-13)."""
    runs = {}
    for fmt in ("contiguous", "auto"):
        config = tiny_config(
            f"train.memory_format={fmt}",
            "train.max_steps=20",
            "optim.name=sgd",
            "optim.lr=0.01",
            "optim.momentum=0.9",
        )
        torch.manual_seed(0)
        trainer = Trainer(config, model=build_model(config).double())
        batches = iter(train_loader(trainer.config, trainer.train_set))
        for _ in range(9):
            batch = next(batches)
            batch["image"] = batch["image"].double()
            trainer.train_step(batch)
        assert trainer._layout_trial is False  # settled (auto) or never started
        runs[fmt] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for k, v in runs["contiguous"].items():
        torch.testing.assert_close(runs["auto"][k], v, rtol=1e-9, atol=1e-12, msg=k)


def test_trial_compares_steps_within_a_round_when_the_machine_drifts(monkeypatch):
    """The host speeds up over the trial: channels-last is 0.9x the contiguous step of its round
    in two rounds of three, and the last round's contiguous step, run after the speed-up, is the
    fastest of all. The best step of each layout (1.0 against 0.95 s) would keep NCHW; the
    rounds' median ratio (0.9) keeps channels-last."""
    clock = _fake_clock(monkeypatch)
    trial = LayoutTrial(torch.device("cpu"))
    # schedule: NCHW, CL untimed; round 0 CL, NCHW; round 1 NCHW, CL; round 2 CL, NCHW
    times = iter([5.0, 5.0, 2.7, 3.0, 2.0, 1.8, 1.0, 0.95])
    while trial.choice is None:
        trial.start()
        clock["t"] += next(times)
        trial.stop()
    assert trial.ratio() == pytest.approx(0.9)
    assert trial.choice == CL
    assert "median of 3 rounds: 0.90x" in trial.summary()
