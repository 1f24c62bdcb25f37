"""ASTMT: the task-batched pass equals the per-task loop; task-specific parameters learn from their task only."""

import pytest
import torch

from mtlfast.models import ASTMT, GradientDiscriminator
from mtlfast.nn import ResidualAdapter, TaskBatchNorm2d, TaskSE

from .helpers import TASKS, H, W


def _model(backbone="se_resnet26", **options):
    width = 0.25 if "mobilenet" in backbone else 0.125
    model = ASTMT(TASKS, backbone, width=width, head_channels=16, **options)
    with torch.no_grad():  # non-trivial adapters and per-task rows (they start at zero / equal)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


CONFIGS = [
    ("se_resnet26", {"adapters": True}),
    ("se_resnet26", {"se_encoder": False, "se_decoder": True}),
    ("se_mobilenet_v2", {}),
]


# In training, forward_all equals the loop only where the encoder's batch norm is per task: a shared
# one normalises the T-times stacked batch with other statistics than each task's pass (by design,
# as in ASTMT). The decoder-only configuration is therefore compared in eval mode only.
FORWARD_ALL_CASES = [
    (b, o, training)
    for b, o in CONFIGS
    for training in (False, True)
    if not (training and o.get("se_encoder") is False)
]


@pytest.mark.parametrize(
    "backbone, options, training",
    FORWARD_ALL_CASES,
    ids=[
        f"{b}-{'-'.join(o) or 'default'}-{'train' if t else 'eval'}"
        for b, o, t in FORWARD_ALL_CASES
    ],
)
def test_forward_all_equals_per_task_loop(backbone, options, training):
    model = _model(backbone, **options).train(training)
    # the cases kept in training are exactly those with per-task batch norm in the encoder
    assert not training or any(isinstance(m, TaskBatchNorm2d) for m in model.backbone.modules())
    x = torch.randn(2, 3, H, W)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    together = model.forward_all(x)
    model.load_state_dict(state)  # the same running statistics for the loop
    for i, task in enumerate(TASKS):
        alone = model(x, i)
        # training-mode batch norm over two samples per task magnifies rounding: up to 1.3e-4 (MobileNet)
        tol = 2e-4 if training else 1e-4
        torch.testing.assert_close(together[task], alone, rtol=tol, atol=tol)
        assert alone.shape == (2, model.out_channels[task], H, W)
    assert model(x, "edge").shape == (2, 1, H, W)
    with torch.no_grad():  # inference runs the task passes one after the other: the same values
        model.load_state_dict(state)
        one_by_one = model.forward_all(x)
    for task in TASKS:
        torch.testing.assert_close(one_by_one[task], together[task], rtol=2e-4, atol=2e-4)


def test_encoder_keeps_only_the_features_the_decoder_reads():
    """The decoder reads the first and the last feature: the stages between are not kept (their
    maps stayed alive through layer4, ASTMT's inference peak)."""
    for backbone, options in CONFIGS:
        model = _model(backbone, **options).eval()
        with torch.no_grad():
            features = model._encode(torch.randn(1, 3, H, W), [], 0, 0)
        full = model.backbone(torch.randn(1, 3, H, W), 0)
        assert len(full) > 2 and [f.shape for f in features] == [full[0].shape, full[-1].shape]


def test_per_sample_tasks():
    model = _model(adapters=True).eval()
    x = torch.randn(3, 3, H, W)
    out = model(x, torch.tensor([2, 0, 2]))
    assert set(out) == {"semseg", "edge"}
    torch.testing.assert_close(out["semseg"], model(x[1:2], 0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["edge"], model(x[[0, 2]], 2), rtol=1e-4, atol=1e-4)


def _task_rows(model):
    """(name, parameter) of every stacked per-task tensor: rows are tasks."""
    for name, m in model.named_modules():
        if isinstance(m, (TaskSE, TaskBatchNorm2d)) and m.num_tasks == len(TASKS):
            yield from ((f"{name}.{k}", p) for k, p in m.named_parameters(recurse=False))
        if isinstance(m, ResidualAdapter):
            yield f"{name}.adapter_weight", m.adapter_weight


@pytest.mark.parametrize(
    "backbone, options", CONFIGS, ids=["r26-se-adapters", "r26-se-dec", "mobilenet"]
)
def test_task_parameters_learn_from_their_task_only(backbone, options):
    model = _model(backbone, **options)
    out = model(torch.randn(2, 3, H, W), 1)  # task 1: normals
    out.square().mean().backward()
    rows = list(_task_rows(model))
    assert rows
    own: dict[str, float] = {}
    for name, p in rows:
        assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0, name
        module = name.rsplit(".", 1)[
            0
        ]  # an SE's w1 may get none through a dead ReLU: judge per module
        own[module] = own.get(module, 0.0) + float(p.grad[1].abs().sum())
    assert all(v > 0 for v in own.values()), [m for m, v in own.items() if v == 0]
    assert model.heads["normals"].weight.grad is not None
    assert model.heads["semseg"].weight.grad is None and model.heads["edge"].weight.grad is None


def test_modulation_options():
    plain = ASTMT(TASKS, width=0.125, head_channels=16, se_encoder=False, se_decoder=False)
    assert not any(isinstance(m, TaskBatchNorm2d) for m in plain.modules())
    assert all(m.num_tasks == 1 for m in plain.modules() if isinstance(m, TaskSE))
    dec = ASTMT(TASKS, width=0.125, head_channels=16, se_encoder=False, se_decoder=True)
    assert not any(isinstance(m, TaskBatchNorm2d) for m in dec.backbone.modules())
    assert dec.decoder.fuse1[3].num_tasks == 3 and isinstance(dec.decoder.fuse1[1], TaskBatchNorm2d)
    # an SE after every decoder block: five ASPP branches, the projection, the reduction, two 3x3 blocks
    assert sum(isinstance(m, TaskSE) for m in dec.decoder.modules()) == 9
    assert dec.decoder.reduce[3].reduction == 4 and dec.decoder.aspp.pool[3].reduction == 16
    none = ASTMT(
        TASKS, width=0.125, head_channels=16, se_encoder=False, se_decoder=False, decoder_se=False
    )
    assert not any(isinstance(m, TaskSE) for m in none.decoder.modules())
    with pytest.raises(ValueError, match="decoder_se"):
        ASTMT(TASKS, width=0.125, head_channels=16, decoder_se=False)
    split = ASTMT(TASKS, width=0.125, head_channels=16, task_bn=(True, False))
    assert isinstance(split.backbone.layer1[0].bn1, TaskBatchNorm2d)
    assert not any(isinstance(m, TaskBatchNorm2d) for m in split.decoder.modules())
    full = ASTMT(TASKS, width=0.125, head_channels=16, adapters=True)
    assert isinstance(full.backbone.layer1[0].conv2, ResidualAdapter)
    # the release's decoder adapters: beside every decoder convolution but the image pooling's
    assert sum(isinstance(m, ResidualAdapter) for m in full.decoder.modules()) == 8
    assert not isinstance(full.decoder.aspp.pool[0], ResidualAdapter)
    assert not any(
        isinstance(m, ResidualAdapter)
        for m in ASTMT(
            TASKS, width=0.125, head_channels=16, adapters=True, decoder_adapters=False
        ).decoder.modules()
    )
    # the stem's batch norm is shared, the blocks' are per task (release, Sec. 3.2)
    assert isinstance(full.backbone.bn1, torch.nn.BatchNorm2d)
    assert all(
        m.adapter_weight.abs().sum() == 0 for m in full.modules() if isinstance(m, ResidualAdapter)
    )
    shared, per_task = full.parameter_split()
    assert shared + sum(per_task.values()) == sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="ResNet backbones only"):
        ASTMT(TASKS, "se_mobilenet_v2", adapters=True, width=0.25)
    with pytest.raises(ValueError, match="unknown task"):
        plain(torch.randn(1, 3, H, W), "depth")
    assert plain.recompute_stages == 2  # the stem and layer1: the rest rebuild their BN outputs
    # MobileNetV2's stages end at strides 4, 8, 16, 16: the first two are above it
    assert ASTMT(TASKS, "se_mobilenet_v2", width=0.25).recompute_stages == 2
    for bad in (-1, 6, 2.0, True, "all"):
        with pytest.raises(
            ValueError, match=r"recompute_stages must be None or an int in \[0, 5\]"
        ):
            ASTMT(TASKS, width=0.125, head_channels=16, recompute_stages=bad)


def test_discriminator():
    model = ASTMT(TASKS, width=0.125, head_channels=16)
    disc = model.discriminator()
    assert isinstance(disc, GradientDiscriminator)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (1, 1)] and convs[-1].out_channels == 3
    g = torch.randn(2, model.backbone.channels[-1], 3, 4)
    logits = disc(g)
    assert logits.shape == (2, 3, 3, 4)
    torch.testing.assert_close(
        disc(g * 7.0), logits
    )  # normalised gradients: the scale does not matter


# ---- the trainer's default step: task passes in turn, the encoder recomputed ------------------

LEAN_CASES = [  # (options, training, task batch norm momentum)
    ({"adapters": True}, True, 0.1),  # task batch norm after the shared stem
    ({"adapters": True}, True, None),  # its cumulative average: the per-sample path
    ({"adapters": True, "recompute_stages": 5}, True, 0.1),  # every stage recomputed
    ({"adapters": True, "recompute_stages": 4}, True, 0.1),  # all but layer4
    ({"adapters": True, "recompute_stages": 0}, True, 0.1),  # none
    ({"se_encoder": False, "se_decoder": True}, False, 0.1),  # shared encoder, eval-mode BN
]


@pytest.mark.parametrize(
    "options, training, momentum",
    LEAN_CASES,
    ids=["task-bn", "task-bn-cumulative", "all-stages", "all-but-layer4", "no-stage", "eval"],
)
def test_engine_step_recomputes_the_encoder_with_the_stacked_gradients(
    options, training, momentum, monkeypatch
):
    """The trainer's default step (the engine's recompute strategy over engine_branches: the T
    task passes in turn, each freed before the next, the blocks of the first
    ``recompute_stages`` encoder stages recomputed in backward, by default the stem and layer1,
    the other stages' batch-norm outputs rebuilt in backward; not the decoder, whose activations
    are alive at the start of the backward anyway) gives the gradients of the task-batched graph (forward_all) and naive's gradients and
    batch-norm statistics (float64)."""
    import copy

    from torch.nn import functional as F

    from mtlfast.engine import multi_branch_step
    from mtlfast.models import astmt
    from mtlfast.ops import use_backend

    model = _model(**options).double().train(training)
    for m in model.modules():
        if isinstance(m, TaskBatchNorm2d):
            m.momentum = momentum
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    targets = {
        t: torch.randn(2, c, H, W, dtype=torch.float64) for t, c in model.out_channels.items()
    }
    loss_fns = {t: F.mse_loss for t in TASKS}
    calls = []
    original = astmt.recomputed
    monkeypatch.setattr(astmt, "recomputed", lambda *a: calls.append(a[1]) or original(*a))
    grads, states, blocks = {}, {}, {}
    with use_backend("reference"):  # float64
        for strategy in ("naive", "recompute", "stacked"):
            m = copy.deepcopy(model)
            calls.clear()
            if strategy == "stacked":
                out = m.forward_all(x)
                sum(F.mse_loss(out[t], targets[t]) for t in TASKS).backward()
            else:
                multi_branch_step(*m.engine_branches(), x, targets, loss_fns, strategy=strategy)
            grads[strategy] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            states[strategy] = m.state_dict()
            blocks[strategy] = len(calls)
    # the bottlenecks (two a stage) of the recomputed stages after the stem, once per task: the
    # stem is the engine's trunk, run once; without encoder modulation the whole encoder is
    # (the engine checkpoints its stages)
    shared = model.shared_stages
    assert len(model.trunk) == shared == (1 if training else len(model.backbone.stages()))
    assert model.recompute_stages == options.get("recompute_stages", 2)
    per_task = 2 * max(model.recompute_stages - 1, 0) if shared == 1 else 0
    assert blocks == {"naive": 0, "recompute": per_task * len(TASKS), "stacked": 0}
    assert set(grads["naive"]) == set(grads["recompute"]) == set(grads["stacked"])
    for n, g in grads["naive"].items():
        torch.testing.assert_close(grads["recompute"][n], g, rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(grads["stacked"][n], g, rtol=1e-9, atol=1e-12, msg=n)
    # every running statistic updated once per step: the task ones by their pass, the stem's
    # (shared) by the one trunk pass, as the task-batched forward_all does
    for k, v in states["naive"].items():
        torch.testing.assert_close(states["recompute"][k], v, rtol=1e-12, atol=1e-12, msg=k)
        torch.testing.assert_close(states["stacked"][k], v, rtol=1e-12, atol=1e-12, msg=k)
