"""Recompute strategy against plain autograd (strategy="naive"): same .grad, losses, task gradients."""

import pytest
import torch
from torch import nn

from mtlfast.engine import multi_branch_step

from .models import (
    H,
    Head,
    JointHead,
    MultiScaleHead,
    N,
    PairConv,
    TwoScales,
    assert_same_grads,
    assert_same_tree,
    conv_trunk,
    loss_fns_for,
    run_both,
    targets_for,
)

OUTS = {"seg": 3, "depth": 1, "normals": 3}
TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # float64 models


def single_scale():
    return conv_trunk(5).double(), nn.ModuleDict({t: Head(o) for t, o in OUTS.items()}).double()


def test_single_tensor_trunk_output():
    trunk, heads = single_scale()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    out = run_both(
        trunk,
        heads,
        images,
        targets_for(OUTS),
        loss_fns_for(OUTS),
        weights={"seg": 2.0, "depth": 0.5},
    )
    assert_same_grads(out, **TIGHT)
    naive, rec = out["naive"][2], out["recompute"][2]
    assert naive.ran == rec.ran == list(OUTS) and naive.skipped == rec.skipped == []
    for t in OUTS:
        torch.testing.assert_close(rec.losses[t], naive.losses[t], **TIGHT)
        assert rec.losses[t].grad_fn is None
    expected = 2.0 * rec.losses["seg"] + 0.5 * rec.losses["depth"] + rec.losses["normals"]
    torch.testing.assert_close(rec.total, expected, **TIGHT)
    assert all(p.grad is not None for p in out["recompute"][0].parameters())


def test_tuple_trunk_output_and_tuple_anchors():
    # one module per segment: anchors 3 and 4 are tuples, and so is the representation
    trunk = nn.Sequential(*conv_trunk(2), TwoScales(), PairConv(), PairConv()).double()
    heads = nn.ModuleDict({t: MultiScaleHead(o) for t, o in OUTS.items()}).double()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    labeled = {"seg": torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)}
    out = run_both(
        trunk,
        heads,
        images,
        targets_for(OUTS),
        loss_fns_for(OUTS),
        labeled=labeled,
        segments=5,
        keep_task_grads=True,
    )
    assert_same_grads(out, **TIGHT)
    g = out["recompute"][2].task_grads["seg"]
    assert (
        isinstance(g, tuple) and g[0].shape == (N, 4, H, H) and g[1].shape == (N, 4, H // 2, H // 2)
    )
    assert_same_tree(out["naive"][2].task_grads["seg"], g, **TIGHT)


def test_partial_labels_and_an_unlabelled_task():
    trunk, heads = single_scale()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    labeled = {
        "seg": torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool),
        "depth": torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool),
        "normals": torch.zeros(N, dtype=torch.bool),
    }
    targets = targets_for(OUTS)
    del targets["normals"]  # an unlabelled task needs no target
    out = run_both(
        trunk, heads, images, targets, loss_fns_for(OUTS), labeled=labeled, keep_task_grads=True
    )
    assert_same_grads(out, **TIGHT)
    for strategy in ("naive", "recompute"):
        _, h, result, _ = out[strategy]
        assert result.ran == ["seg", "depth"] and result.skipped == ["normals"]
        assert "normals" not in result.losses and "normals" not in result.task_grads
        assert all(p.grad is None for p in h["normals"].parameters())
        assert all(p.grad is not None for p in h["depth"].parameters())
        # zero gradient on the samples that do not carry the label
        assert result.task_grads["depth"][~labeled["depth"]].abs().max() == 0


def test_loss_averages_over_labelled_samples_only():
    trunk, heads = conv_trunk(2).double(), nn.ModuleDict({"depth": Head(1)}).double()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    targets = targets_for({"depth": 1})
    mask = torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool)
    seen = []

    def loss(pred, target):
        seen.append(pred.shape[0])
        return ((pred - target) ** 2).mean()

    result = multi_branch_step(
        trunk, heads, images, targets, {"depth": loss}, labeled={"depth": mask}
    )
    assert seen == [3]
    with torch.no_grad():
        pred = heads["depth"](trunk(images))
    torch.testing.assert_close(
        result.losses["depth"], ((pred - targets["depth"])[mask] ** 2).mean(), **TIGHT
    )


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "undeclared"])
def test_joint_decoder(declare):
    outs = {"seg": 3, "depth": 1}
    trunk = conv_trunk(4).double()
    heads = nn.ModuleDict({"mti": JointHead(outs, declare=declare), "normals": Head(3)}).double()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    labeled = {
        "seg": torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool),
        "depth": torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool),
    }
    all_outs = {**outs, "normals": 3}
    out = run_both(
        trunk,
        heads,
        images,
        targets_for(all_outs),
        loss_fns_for(all_outs),
        labeled=labeled,
        weights={"depth": 3.0},
        keep_task_grads=True,
    )
    assert_same_grads(out, **TIGHT)
    naive, rec = out["naive"][2], out["recompute"][2]
    assert naive.ran == rec.ran == ["seg", "depth", "normals"]
    for t in all_outs:
        torch.testing.assert_close(rec.losses[t], naive.losses[t], **TIGHT)
        assert_same_tree(naive.task_grads[t], rec.task_grads[t], **TIGHT)
    assert rec.task_grads["seg"][~labeled["seg"]].abs().max() == 0


def test_joint_decoder_with_all_tasks_unlabelled_does_not_run():
    outs = {"seg": 3, "depth": 1}
    trunk = conv_trunk(2).double()
    heads = nn.ModuleDict({"mti": JointHead(outs), "normals": Head(3)}).double()
    none = torch.zeros(N, dtype=torch.bool)
    targets = {"normals": targets_for({"normals": 3})["normals"]}
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets,
        loss_fns_for({**outs, "normals": 3}),
        labeled={"seg": none, "depth": none},
    )
    assert_same_grads(out, **TIGHT)
    for _, h, result, _ in out.values():
        assert result.ran == ["normals"] and result.skipped == ["seg", "depth"]
        assert all(p.grad is None for p in h["mti"].parameters())


def test_keep_task_grads_sum_to_the_branch_point_gradient():
    trunk, heads = single_scale()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    labeled = {"depth": torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)}
    weights = {"seg": 0.3, "normals": 2.0}
    out = run_both(
        trunk,
        heads,
        images,
        targets_for(OUTS),
        loss_fns_for(OUTS),
        labeled=labeled,
        weights=weights,
        keep_task_grads=True,
    )
    for t in OUTS:
        torch.testing.assert_close(
            out["recompute"][2].task_grads[t], out["naive"][2].task_grads[t], **TIGHT
        )
    # the branch-point gradient of plain autograd on the same loss
    with torch.no_grad():
        rep = trunk(images)
    rep.requires_grad_()
    torch.manual_seed(0)
    targets = targets_for(OUTS)
    total = 0
    for t, fn in loss_fns_for(OUTS).items():
        m = labeled.get(t, torch.ones(N, dtype=torch.bool))
        total = total + weights.get(t, 1.0) * fn(heads[t](rep)[m], targets[t][m])
    (expected,) = torch.autograd.grad(total, rep)
    torch.manual_seed(0)
    targets = targets_for(OUTS)
    out = run_both(
        trunk,
        heads,
        images,
        targets,
        loss_fns_for(OUTS),
        labeled=labeled,
        weights=weights,
        keep_task_grads=True,
    )
    for strategy in ("naive", "recompute"):
        summed = sum(out[strategy][2].task_grads.values())
        torch.testing.assert_close(summed, expected, **TIGHT)


def test_gradients_accumulate_into_existing_grad():
    trunk, heads = single_scale()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    targets, fns = targets_for(OUTS), loss_fns_for(OUTS)
    multi_branch_step(trunk, heads, images, targets, fns)
    once = {n: p.grad.clone() for n, p in [*trunk.named_parameters(), *heads.named_parameters()]}
    multi_branch_step(trunk, heads, images, targets, fns)
    for n, p in [*trunk.named_parameters(), *heads.named_parameters()]:
        torch.testing.assert_close(p.grad, 2 * once[n], **TIGHT)


def test_gradient_reaches_images_that_require_grad():
    trunk, heads = single_scale()
    base = torch.randn(N, 3, H, H, dtype=torch.float64)
    targets = targets_for(OUTS)
    got = {}
    for strategy in ("naive", "recompute"):
        images = base.clone().requires_grad_()
        # images * 2: a non-leaf input, whose graph the first segment's backward must go through
        multi_branch_step(trunk, heads, images * 2, targets, loss_fns_for(OUTS), strategy=strategy)
        got[strategy] = images.grad
    torch.testing.assert_close(got["recompute"], got["naive"], **TIGHT)


def test_frozen_stem_is_not_recomputed():
    trunk, heads = conv_trunk(6).double(), nn.ModuleDict({"depth": Head(1)}).double()
    for p in trunk[:2].parameters():
        p.requires_grad_(False)
    calls = []
    trunk[0].register_forward_hook(lambda *_: calls.append(0))
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for({"depth": 1}),
        loss_fns_for({"depth": 1}),
        segments=3,
    )
    assert_same_grads(out, **TIGHT)
    assert len(calls) == 2  # once per strategy: the recompute strategy's backward skips segment 0
