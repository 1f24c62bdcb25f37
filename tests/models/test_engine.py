"""UberNet and the shared-encoder baseline under multi_branch_step: recompute gives naive's gradients."""

import copy

import pytest
import torch
from torch.nn import functional as F

from mtlfast.engine import multi_branch_step

from .helpers import H, W, build

CASES = [
    ("ubernet", "vgg16", {"width": 1 / 32, "scales": (1.0, 0.5)}),
    ("ubernet", "resnet18", {"width": 0.125, "scales": (1.0, 0.5)}),
    ("mtl_baseline", "resnet18", {"width": 0.125, "head_channels": 16}),
]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, backbone, options", CASES, ids=[f"{m}-{b}" for m, b, _ in CASES])
def test_recompute_matches_naive_and_plain_backward(name, backbone, options):
    model = build(name, backbone, options)
    x = torch.randn(2, 3, H, W)
    keys = list(model(x))  # every prediction, deep-supervision keys included
    targets = {k: torch.randn(2, model.out_channels[k.split("/")[0]], H, W) for k in keys}
    loss_fns = {k: F.mse_loss for k in keys}
    weights = {k: 0.5 if "/" in k else 1.0 for k in keys}
    models = [copy.deepcopy(model) for _ in range(3)]

    results = []
    for m, strategy in zip(models[:2], ("naive", "recompute")):
        results.append(
            multi_branch_step(
                m.trunk, m.heads, x, targets, loss_fns, weights=weights, strategy=strategy
            )
        )
    out = models[2](x)
    sum(weights[k] * F.mse_loss(out[k], targets[k]) for k in keys).backward()

    naive, recompute, plain = (_grads(m) for m in models)
    assert set(naive) == set(recompute) == set(plain) == {n for n, _ in model.named_parameters()}
    for n in naive:
        torch.testing.assert_close(recompute[n], naive[n], rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(plain[n], naive[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(results[0].total, results[1].total)


def test_lazy_task_skips_its_head():
    model = build(
        "ubernet", "resnet18", {"width": 0.125, "scales": (1.0,)}, tasks=["semseg", "edge"]
    )
    x = torch.randn(2, 3, H, W)
    targets = {"semseg": torch.randn(2, 21, H, W), "edge": torch.randn(2, 1, H, W)}
    result = multi_branch_step(
        model.trunk,
        model.heads,
        x,
        targets,
        {t: F.mse_loss for t in targets},
        labeled={"edge": torch.zeros(2, dtype=torch.bool)},
    )
    assert result.skipped == ["edge"]
    assert all(p.grad is None for p in model.heads["edge"].parameters())
    assert all(p.grad is not None for p in model.heads["semseg"].parameters())


class _TwoScaleNet(torch.nn.Module):
    """Not a mtlfast Backbone: any module returning a list of features with channels and strides
    (the shape of a multi-branch backbone such as HRNet) runs whole in the trunk."""

    channels, strides = [4, 6], [2, 4]

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Sequential(
            torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.BatchNorm2d(6)
        )

    def forward(self, x):
        f = torch.relu(self.a(x))
        return [f, self.b(f)]


@pytest.mark.parametrize(
    "name, options", [("ubernet", {"scales": (1.0, 0.5)}), ("mtl_baseline", {"head_channels": 8})]
)
def test_any_backbone_module(name, options):
    from mtlfast.models import create

    model = create(name, ["semseg", "edge"], backbone=_TwoScaleNet(), **options)
    assert len(model.trunk) == 2
    x = torch.randn(2, 3, H, W)
    keys = list(model(x))
    targets = {k: torch.randn(2, model.out_channels[k.split("/")[0]], H, W) for k in keys}
    loss_fns = {k: F.mse_loss for k in keys}
    naive, recompute = copy.deepcopy(model), copy.deepcopy(model)
    multi_branch_step(naive.trunk, naive.heads, x, targets, loss_fns, strategy="naive")
    multi_branch_step(recompute.trunk, recompute.heads, x, targets, loss_fns, strategy="recompute")
    for (n, a), b in zip(naive.named_parameters(), recompute.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(TypeError, match="channels"):
        create(name, ["edge"], backbone=torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize(
    "options", [{"adapters": True}, {"se_encoder": False}], ids=("adapters", "se_decoder")
)
def test_astmt_single_task_passes_under_the_engine(options):
    """ASTMT's T single-task passes as the engine's branches: naive's gradients, lazy tasks skipped."""
    model = build("astmt", "se_resnet26", {"width": 0.125, "head_channels": 16, **options})
    x = torch.randn(4, 3, H, W)
    targets = {t: torch.randn(4, model.out_channels[t], H, W) for t in model.tasks}
    loss_fns = {t: F.mse_loss for t in model.tasks}
    labeled = {model.tasks[-1]: torch.zeros(4, dtype=torch.bool)}  # the last task: no label here
    models = [copy.deepcopy(model) for _ in range(3)]
    for m, strategy in zip(models[:2], ("naive", "recompute")):
        result = multi_branch_step(
            *m.engine_branches(), x, targets, loss_fns, labeled=labeled, strategy=strategy
        )
        assert result.skipped == [model.tasks[-1]]
    sum(F.mse_loss(models[2](x, t), targets[t]) for t in model.tasks[:-1]).backward()

    naive, recompute, plain = (_grads(m) for m in models)
    assert set(naive) == set(recompute) == set(plain)
    assert not any(n.startswith(f"heads.{model.tasks[-1]}.") for n in naive)
    for n in naive:
        torch.testing.assert_close(recompute[n], naive[n], rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(plain[n], naive[n], rtol=1e-4, atol=1e-5, msg=n)
    # the trunk: the shared stages (the stem; the whole encoder without encoder modulation)
    trunk, _ = model.engine_branches()
    assert len(trunk) == model.shared_stages == (1 if "adapters" in options else 5)
    shared = [p for s in model.backbone.stages()[: len(trunk)] for p in s.parameters()]
    assert all(p is q for p, q in zip(trunk.parameters(), shared, strict=True))
