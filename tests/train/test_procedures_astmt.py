"""ASTMT's procedure: the adversarial gradient against a hand-written double backprop, gradient
reversal and its schedule, the task-batched step equal to the sequential passes, and updates of
the weights that were used only."""

import math

import pytest
import torch
from torch.nn import functional as F

from mtlfast.losses import for_task
from mtlfast.models import ASTMT
from mtlfast.models.heads import resize
from mtlfast.ops import use_backend
from mtlfast.train.procedures import ASTMTProcedure, ganin_weight, reverse_gradient

TASKS = ["semseg", "edge", "normals"]
WEIGHTS = {"semseg": 1.0, "edge": 50.0, "normals": 10.0}
N, H, W = 3, 24, 20


def _model(**options):
    torch.manual_seed(0)
    model = ASTMT(TASKS, width=0.125, head_channels=8, **options)
    with torch.no_grad():  # per-task rows that differ (they start equal or at zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def _batch(partial: bool = False):
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(N, 3, H, W, generator=g),
        "semseg": torch.randint(0, 21, (N, H, W), generator=g),
        "edge": (torch.rand(N, 1, H, W, generator=g) > 0.8).float(),
        "normals": F.normalize(torch.randn(N, 3, H, W, generator=g), dim=1),
    }
    if partial:
        batch["labeled"] = {
            "semseg": torch.tensor([True, True, True]),
            "edge": torch.tensor([True, False, True]),
            "normals": torch.tensor([False, True, True]),  # 2+: the ASPP pooling's batch norm
        }
    return batch


LOSSES = {t: for_task(t) for t in TASKS}


def _grads(*modules):
    return {
        f"{k}.{n}": p.grad.clone()
        for k, m in enumerate(modules)
        for n, p in m.named_parameters()
        if p.grad is not None
    }


def _close(a, b, tol=2e-4):
    assert set(a) == set(b)
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-8)
        assert (a[k] - b[k]).abs().max().item() <= tol * scale, k


def test_reverse_gradient_sign_weight_and_double_backprop():
    x = torch.randn(4, 3, requires_grad=True)
    c = torch.randn(4, 3)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * c).sum(), x)
    torch.testing.assert_close(g, -0.3 * c)
    # its backward is differentiable: d/dx of the reversed gradient -0.3 * c * 2x is -0.6 c
    (g,) = torch.autograd.grad((reverse_gradient(x * x, 0.3) * c).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, -0.6 * c)
    with pytest.raises(ValueError, match="weight"):
        reverse_gradient(x, -1.0)


def test_ganin_schedule():
    assert ganin_weight(0.0) == 0.0
    assert ganin_weight(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [ganin_weight(p / 10) for p in range(11)]
    assert values == sorted(values) and values[-1] < 1.0
    assert ganin_weight(0.5, gamma=10, maximum=0.5) == pytest.approx(
        0.5 * (2 / (1 + math.exp(-5)) - 1)
    )
    # the procedure's lambda: the release's formula at (step + 1) / max_steps
    proc = ASTMTProcedure(_model(), max_steps=60, updates="batch")
    for step in (0, 10, 59, 100):
        proc.steps = step
        p = min((step + 1) / 60, 1.0)
        assert proc.reversal_lambda() == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
    proc = ASTMTProcedure(
        _model(), max_steps=5, reversal="constant", reversal_weight=0.25, updates="batch"
    )
    assert proc.reversal_lambda() == 0.25
    with pytest.raises(ValueError, match="progress"):
        ganin_weight(1.5)


def _hand_written(model, disc, batch, lam, w_d, normalize_pixel=True, at="decoder"):
    """The adversarial loss written out: full single-task passes, double backprop by hand,
    normalisation and reversal spelled out (no procedure code)."""
    total = 0.0
    x = batch["image"]
    for i, task in enumerate(TASKS):
        features = model.backbone(x, i)
        dec = model.decoder(features[0], features[-1], i)
        pred = resize(model.heads[task](dec), x.shape[-2:])
        wl = WEIGHTS[task] * LOSSES[task](pred, batch[task])
        point = dec if at == "decoder" else features[-1]
        (g,) = torch.autograd.grad(wl, point, create_graph=True)
        if normalize_pixel:
            gn = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            gn = g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        # value gn, gradient -lam times: the reversal, without the procedure's function
        reversed_ = gn * -lam + gn.detach() * (1 + lam)
        logits = disc.net(reversed_)
        labels = torch.full(logits.shape[:1] + logits.shape[2:], i, dtype=torch.long)
        labels[g.detach().abs().amax(1) == 0] = -100
        d_loss = F.cross_entropy(logits, labels, ignore_index=-100)
        total = total + (1 - w_d) * wl + w_d * d_loss
    total.backward()


@pytest.mark.parametrize("at, normalize", [("decoder", "pixel"), ("encoder", "sample")])
def test_adversarial_gradient_equals_hand_written_double_backprop(at, normalize):
    # double backprop through the decoder (at the encoder) needs it without the fused SE op
    model = _model() if at == "decoder" else _model(se_decoder=False, decoder_se=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    proc = ASTMTProcedure(
        model,
        max_steps=10,
        discriminator_at=at,
        normalize=normalize,
        discriminator_weight=0.1,
        updates="batch",
    )
    with torch.no_grad():  # a discriminator whose gradient is not negligible
        for p in proc.discriminator.parameters():
            p.normal_(0, 0.5)
    batch = _batch()
    lam = proc.reversal_lambda()
    result = proc.backward(batch, LOSSES, WEIGHTS)
    ours = _grads(model, proc.discriminator)
    assert set(result.losses) == set(TASKS) | {"discriminator"}
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    proc.discriminator.zero_grad(set_to_none=True)
    _hand_written(model, proc.discriminator, batch, lam, 0.1, normalize == "pixel", at)
    _close(ours, _grads(model, proc.discriminator))
    # the reversal reaches the network: without it the network's gradient differs
    assert any(k.startswith("1.") for k in ours)  # the discriminator was trained


@pytest.mark.parametrize("partial", [False, True], ids=["all-labelled", "partial"])
@pytest.mark.parametrize("adversarial", [True, False], ids=["adv", "plain"])
def test_batched_step_equals_sequential_passes(partial, adversarial):
    # float64 (the reference kernels): training-mode batch norm over 2-3 samples magnifies
    # float32 rounding to ~1e-3 of a gradient; in float64 the two agree to ~1e-13
    model = _model().double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in _batch(partial).items()
    }
    grads = []
    for execution in ("sequential", "batched"):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        proc = ASTMTProcedure(
            model, max_steps=4, execution=execution, adversarial=adversarial, updates="batch"
        )
        if adversarial:
            torch.manual_seed(3)
            for p in proc.discriminator.parameters():
                torch.nn.init.normal_(p, 0, 0.5)
        with use_backend("reference"):
            result = proc.backward(batch, LOSSES, WEIGHTS)
        grads.append(_grads(model, *proc.modules()))
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        grads[-1]["_stats"] = torch.cat([v.flatten() for v in stats.values()])
    _close(*grads, tol=1e-9)
    assert result.ran[:3] == TASKS


def test_sequential_equals_t_separate_passes():
    """The shared stem runs once; the gradients are those of T whole single-task passes."""
    model = _model(adapters=True)
    assert model.shared_stages == 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch()
    ASTMTProcedure(model, adversarial=False, updates="batch").backward(batch, LOSSES, WEIGHTS)
    ours = _grads(model)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    for i, t in enumerate(TASKS):
        (WEIGHTS[t] * LOSSES[t](model(batch["image"], i), batch[t])).backward()
    _close(ours, _grads(model))


def test_decoder_only_modulation_runs_the_encoder_once():
    model = _model(se_encoder=False)
    assert model.shared_stages == len(model.backbone.stages())
    x = _batch()["image"]
    shared = model.shared_part(x)
    for i in range(len(TASKS)):
        _, dec = model.task_part(shared, i)
        torch.testing.assert_close(model.predict(dec, i, x.shape[-2:]), model(x, i))


def _sgd_step(model, proc, optimizer, batch):
    proc.backward(batch, LOSSES, WEIGHTS)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("updates", ["task", "batch"])
def test_only_the_weights_that_were_used_move(updates):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    proc = ASTMTProcedure(model, optimizer, adversarial=False, updates=updates)
    _sgd_step(model, proc, optimizer, _batch())  # momentum for every task's rows
    se = model.backbone.layer2[0].se
    before = se.w1.detach().clone(), optimizer.state[se.w1]["momentum_buffer"].clone()
    head = model.heads["normals"].weight.detach().clone()
    batch = _batch()
    batch["labeled"] = {"normals": torch.zeros(N, dtype=torch.bool)}  # normals absent
    _sgd_step(model, proc, optimizer, batch)
    k = TASKS.index("normals")
    assert torch.equal(se.w1[k], before[0][k])
    assert torch.equal(optimizer.state[se.w1]["momentum_buffer"][k], before[1][k])
    assert torch.equal(model.heads["normals"].weight, head)
    assert not torch.equal(se.w1[0], before[0][0])  # the tasks that ran moved


def test_per_task_updates_step_once_per_task():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    proc = ASTMTProcedure(model, optimizer, updates="task")
    calls = []
    optimizer.register_step_post_hook(lambda *a: calls.append(1))
    _sgd_step(model, proc, optimizer, _batch(partial=True))
    assert len(calls) == len(TASKS)  # T - 1 inside the procedure, the last by the caller
    groups = optimizer.param_groups
    assert groups[-1]["lr"] == pytest.approx(0.1)  # the discriminator's: 10 times the base


def test_task_lr_multiplier_regroups_task_specific_parameters():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ASTMTProcedure(model, optimizer, task_lr_multiplier=3.0, adversarial=False)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr[id(model.heads["edge"].weight)] == pytest.approx(0.03)
    assert lr[id(model.backbone.layer3[1].se.w2)] == pytest.approx(0.03)
    assert lr[id(model.backbone.conv1.weight)] == pytest.approx(0.01)
    assert len(lr) == sum(1 for _ in model.parameters())


def test_bad_options_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="execution"):
        ASTMTProcedure(model, execution="parallel")
    with pytest.raises(ValueError, match="needs execution='sequential'"):
        ASTMTProcedure(
            model, torch.optim.SGD(model.parameters(), lr=1), updates="task", execution="batched"
        )
    with pytest.raises(ValueError, match="discriminator_weight"):
        ASTMTProcedure(model, discriminator_weight=1.5)
    with pytest.raises(ValueError, match="no double backward"):
        ASTMTProcedure(model, discriminator_at="encoder", updates="batch")
    with pytest.raises(TypeError, match="ASTMT"):
        ASTMTProcedure(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "at, updates", [("decoder", "task"), ("decoder", "batch"), ("encoder", "batch")]
)
def test_recompute_strategy_recomputes_the_encoder_with_the_same_step(at, updates, monkeypatch):
    """Under the trainer's train.strategy "recompute" each task pass's encoder blocks are
    recomputed in backward: the double backprop (at the decoder's or the encoder's output) and
    the step give naive's gradients, parameters and batch-norm statistics (float64)."""
    from types import SimpleNamespace

    from mtlfast.models import astmt

    options = {} if at == "decoder" else {"se_decoder": False, "decoder_se": False}
    model = _model(adapters=True, **options).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in _batch(partial=True).items()
    }
    calls = []
    original = astmt.recomputed
    monkeypatch.setattr(astmt, "recomputed", lambda *a: calls.append(1) or original(*a))
    after = []
    for strategy in ("naive", "recompute"):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        proc = ASTMTProcedure(model, optimizer, discriminator_at=at, updates=updates)
        torch.manual_seed(3)
        for p in proc.discriminator.parameters():
            torch.nn.init.normal_(p, 0, 0.5)
        trainer = SimpleNamespace(
            config=SimpleNamespace(train=SimpleNamespace(strategy=strategy)),
            loss_fns=LOSSES,
            weights=WEIGHTS,
        )
        calls.clear()
        with use_backend("reference"):
            proc.train_backward(trainer, batch)
        assert bool(calls) == (strategy == "recompute")
        found = _grads(model, proc.discriminator)
        found.update({f"_{k}": v.clone() for k, v in model.state_dict().items()})
        after.append(found)
    _close(*after, tol=1e-9)
