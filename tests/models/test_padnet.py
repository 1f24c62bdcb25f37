"""PAD-Net: outputs, deep supervision, which parameters each loss reaches, and the memory engine."""

import pytest
import torch

from mtlfast.engine import multi_branch_step
from mtlfast.models import PADNet

from .decoder_helpers import (
    H,
    N,
    TinyBackbone,
    W,
    all_params,
    grads_of,
    loss_fns_for,
    recompute_runs,
    targets_for,
    touched,
)

TASKS = ["semseg", "edge"]
DS = [f"deep_supervision/initial/{t}" for t in TASKS]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PADNet(tasks=TASKS)


def test_train_outputs_and_backward(model):
    model.train()
    out = model(torch.randn(N, 3, H, W))
    assert list(out) == TASKS + DS and model.decoder.tasks == TASKS + DS
    assert out["semseg"].shape == (N, 21, H, W) and out["edge"].shape == (N, 1, H, W)
    assert out[DS[0]].shape == (N, 21, H, W) and out[DS[1]].shape == (N, 1, H, W)
    model.zero_grad(set_to_none=True)
    sum(y.square().mean() for y in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.zero_grad(set_to_none=True)


def test_eval_outputs_trunk_path_and_release_shapes(model):
    model.eval()
    x = torch.randn(1, 3, 29, 23)
    with torch.no_grad():
        out = model(x)
        fused = model.trunk(x)
        via_trunk = model.heads["decoder"](fused)
    model.train()
    assert list(out) == TASKS and out["edge"].shape == (1, 1, 29, 23)
    assert all(torch.equal(out[t], via_trunk[t]) for t in TASKS)
    # the branching point: the four HRNet scales fused at 1/4 (18+36+72+144 channels), plus the size token
    assert fused[0].shape == (1, 270, 8, 6) and fused[1].shape == (1, 0, 29, 23)
    assert model.decoder.distillation.channels == 256
    assert model.decoder.initial["semseg"][0].conv3.out_channels == 256


def test_dataset_defaults():
    m = PADNet(dataset="nyud", backbone=TinyBackbone(), width=16)
    assert m.tasks == ["semseg", "depth", "normals", "edge"]
    out = m(torch.randn(N, 3, H, W))
    assert out["semseg"].shape == (N, 40, H, W) and len(out) == 8
    assert len(m.trunk) == 2  # the backbone, then the scale fusion


def test_initial_prediction_reaches_only_its_own_head(model):
    model.train()
    out = model(torch.randn(N, 3, H, W))
    g = grads_of(out["deep_supervision/initial/edge"].square().mean(), model)
    assert set(touched(g, "decoder.")) == set(all_params(model, "decoder.initial.edge")) | set(
        all_params(model, "decoder.initial_out.edge")
    )
    assert touched(g, "fuse.") and touched(g, "backbone.")


def test_final_prediction_reaches_no_other_final_head_and_no_initial_classifier(model):
    model.train()
    out = model(torch.randn(N, 3, H, W))
    g = grads_of(out["semseg"].square().mean(), model)
    assert touched(g, "decoder.final.edge") == [] and touched(g, "decoder.initial_out") == []
    assert touched(g, "decoder.final.semseg") and touched(g, "decoder.distillation")
    # distillation brings the other task's initial features into this prediction
    assert touched(g, "decoder.initial.edge")


def test_multi_branch_step_matches_naive_and_plain_backward(model):
    model.train()
    x = torch.randn(N, 3, H, W)
    outputs = model.decoder.out_channels
    targets, loss_fns = model.expand(targets_for(outputs)), model.expand(loss_fns_for(outputs))
    grads = {}
    for strategy in ("naive", "recompute"):
        model.zero_grad(set_to_none=True)
        multi_branch_step(model.trunk, model.heads, x, targets, loss_fns, strategy=strategy)
        grads[strategy] = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(x)
    sum(loss_fns[k](y, targets[k]) for k, y in out.items()).backward()
    for name, p in model.named_parameters():
        # the naive strategy's distillation saves its maps and sums the backward in another
        # order than the recomputing one: float32 rounding relative to the largest entry
        atol = 4e-6 * max(1.0, float(p.grad.abs().max()))
        torch.testing.assert_close(
            grads["recompute"][name], grads["naive"][name], rtol=1e-4, atol=atol, msg=name
        )
        torch.testing.assert_close(grads["naive"][name], p.grad, rtol=1e-4, atol=atol, msg=name)
    model.zero_grad(set_to_none=True)


def test_width_must_split_into_bottlenecks():
    with pytest.raises(ValueError, match="multiple of 4"):
        PADNet(tasks=TASKS, backbone=TinyBackbone(), width=30)


def test_recompute_strategy_recomputes_heads_with_one_statistics_update(model, monkeypatch):
    """Under the engine's recompute strategy each task's initial and final heads keep nothing for
    backward and run again there, batch norms updating their statistics once, as under naive."""
    from mtlfast.models.padnet import PADNetDecoder

    seen, states = recompute_runs(model, PADNetDecoder, "_head", monkeypatch)
    heads = 2 * len(model.decoder.out_channels)  # an initial and a final head a task
    assert seen == {"naive": ["naive"] * heads, "recompute": ["recompute"] * (2 * heads)}
    for k, v in states["naive"].items():
        torch.testing.assert_close(states["recompute"][k], v, rtol=1e-4, atol=1e-6, msg=k)
