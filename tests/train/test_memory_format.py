"""``train.memory_format``: a channels-last run trains the network a contiguous one trains."""

import copy

import pytest
import torch

from mtlfast.train import Trainer, build_model
from mtlfast.train._grad_sync import _Bucket
from mtlfast.train.data import train_loader

from .helpers import tiny_config

CL = torch.channels_last


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def _four_d(model):
    return [p for p in model.parameters() if p.dim() == 4]


def _batches(trainer, n):
    it = iter(train_loader(trainer.config, trainer.train_set))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.name=mtinet", "model.backbone=null", "model.options={}", "data.size=64"],
        ["balancing.name=gradnorm", "balancing.options={alpha: 1.5, lr: 0.05}"],
        ["balancing.name=mgda", "balancing.options={normalize: loss+}"],
        ["balancing.name=pcgrad"],
        ["balancing.name=cagrad"],
        [  # 5-d per-task adapter kernels: left as they are
            "model.name=astmt",
            "model.backbone=se_resnet26",
            "model.options={width: 0.125, head_channels: 8, adapters: true}",
        ],
    ],
    ids=["baseline", "mtinet", "gradnorm", "mgda", "pcgrad", "cagrad", "astmt"],
)
def test_channels_last_steps_like_contiguous(overrides):
    """The model's 4-d weights and the images are channels-last; each step from the contiguous
    run's state (weights, momentum, balancing state: a cross-format load) gives its losses and
    updated weights (balancing methods that flatten the per-task gradients included). In float64:
    an untrained HRNet's float32 gradients differ by 1e-3 between the layouts (sums in other
    orders, amplified by batch norms over a few pixels), float64 ones by 1e-13."""
    trainers = {}
    for fmt in ("contiguous", "channels_last"):
        config = tiny_config(
            *overrides, f"train.memory_format={fmt}", "optim.name=sgd", "optim.lr=0.01"
        )
        torch.manual_seed(0)
        trainers[fmt] = Trainer(config, model=build_model(config).double())
    a, b = trainers["contiguous"], trainers["channels_last"]
    assert all(p.is_contiguous() for p in _four_d(a.model))
    assert all(p.is_contiguous(memory_format=CL) for p in _four_d(b.model))
    image = b._formatted({"image": torch.randn(2, 3, 8, 8)})["image"]
    assert image.is_contiguous(memory_format=CL)
    for batch in _batches(a, 3):
        batch["image"] = batch["image"].double()
        b.load_state_dict(copy.deepcopy(a.state_dict()))  # momentum buffers of its own
        ra, rb = a.train_step(batch), b.train_step(batch)
        assert ra.losses.keys() == rb.losses.keys()
        for t in ra.losses:
            torch.testing.assert_close(ra.losses[t], rb.losses[t], rtol=1e-9, atol=1e-12)
        _assert_close(_state(a.model), _state(b.model), rtol=1e-9, atol=1e-12)
        for t, w in a.balancer.weights.items():
            assert float(b.balancer.weights[t]) == pytest.approx(float(w), rel=1e-9, abs=1e-12)
    # the load and the optimiser's updates kept the layout
    assert all(p.is_contiguous(memory_format=CL) for p in _four_d(b.model))


def test_evaluation_in_channels_last_matches():
    results = {}
    for fmt in ("contiguous", "channels_last"):
        trainer = Trainer(tiny_config(f"train.memory_format={fmt}"))
        results[fmt] = trainer.evaluate(recalibrate=True)
    for t, metrics in results["contiguous"]["tasks"].items():
        for m, v in metrics.items():
            assert results["channels_last"]["tasks"][t][m] == pytest.approx(v, rel=1e-3, abs=1e-4)


def test_resume_is_bitwise_identical_in_channels_last(tmp_path, monkeypatch):
    config = tiny_config("train.memory_format=channels_last", "train.max_steps=5")
    full = Trainer(config, tmp_path / "full")
    full.fit()

    cut = Trainer(config, tmp_path / "cut")
    step = cut.train_step

    def dies_at_step_4(batch):  # after the checkpoint of step 2
        if cut.step == 3:
            raise KeyboardInterrupt
        return step(batch)

    monkeypatch.setattr(cut, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = Trainer.resume(tmp_path / "cut")
    assert resumed.step == 2
    resumed.fit()
    expected, got = _state(full.model), _state(resumed.model)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    assert all(p.is_contiguous(memory_format=CL) for p in _four_d(resumed.model))


@pytest.mark.parametrize(
    ("saved", "loaded"), [("channels_last", "contiguous"), ("contiguous", "channels_last")]
)
def test_checkpoints_load_across_formats(tmp_path, saved, loaded):
    """A checkpoint holds values, not a layout: it resumes in the other format (to float
    rounding of the other layout's sums) and the model keeps the loading run's layout."""
    config = tiny_config(f"train.memory_format={saved}", "train.max_steps=4")
    Trainer(config, tmp_path / "run").fit()  # checkpoints at 2 and 4
    reference = Trainer(config, tmp_path / "ref")
    reference.load_state_dict(
        torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    )
    other = Trainer.resume(tmp_path / "run", [f"train.memory_format={loaded}"])
    assert other.step == 4
    _assert_close(_state(other.model), _state(reference.model), rtol=0, atol=0)
    fmt = CL if loaded == "channels_last" else torch.contiguous_format
    assert all(p.is_contiguous(memory_format=fmt) for p in _four_d(other.model))
    batch = _batches(other, 1)[0]
    ra, rb = reference.train_step(batch), other.train_step(batch)
    torch.testing.assert_close(ra.total, rb.total, rtol=1e-4, atol=1e-6)
    _assert_close(_state(reference.model), _state(other.model), rtol=1e-3, atol=1e-5)


def test_gradient_buckets_flatten_channels_last_gradients_in_logical_order():
    """The distributed buckets send every gradient in NCHW element order whatever its layout, so
    ranks with different layouts pair up, and write the average back into the parameter's."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(4, 3, 2, 5).contiguous(memory_format=CL)),
        torch.nn.Parameter(torch.randn(6)),
        torch.nn.Parameter(torch.randn(2, 3, 3, 3)),
    ]
    grads = [torch.randn_like(p) for p in params]  # randn_like keeps channels-last
    assert grads[0].is_contiguous(memory_format=CL) and not grads[0].is_contiguous()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    bucket = _Bucket(params)
    flat = bucket.fill()[: bucket.numel]
    torch.testing.assert_close(flat, torch.cat([g.reshape(-1) for g in grads]), rtol=0, atol=0)
    flat.mul_(2)  # as if a second rank sent the same gradients
    bucket.write_back(world=2)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert params[0].grad.is_contiguous(memory_format=CL)
    # a gradient that only another rank had arrives in the parameter's layout
    params[0].grad = None
    bucket.fill()
    bucket.buffer[: params[0].numel()] = grads[0].reshape(-1)
    bucket.buffer[bucket.numel] = 1.0
    bucket.write_back(world=1)
    torch.testing.assert_close(params[0].grad, grads[0], rtol=0, atol=0)
    assert params[0].grad.is_contiguous(memory_format=CL)
