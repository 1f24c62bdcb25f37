"""MultiTaskLoss: weighted sum, defaults, per-task labels, engine compatibility."""

import pytest
import torch
import torch.nn.functional as F

from mtlfast.losses import NYUD_WEIGHTS, PASCAL_WEIGHTS, MultiTaskLoss, depth_loss, for_task


def _sample(n=3, h=4, w=5):
    preds = {
        "semseg": torch.randn(n, 5, h, w, requires_grad=True),
        "depth": torch.randn(n, 1, h, w, requires_grad=True),
        "normals": torch.randn(n, 3, h, w, requires_grad=True),
        "edge": torch.randn(n, 1, h, w, requires_grad=True),
    }
    targets = {
        "semseg": torch.randint(0, 5, (n, h, w)),
        "depth": torch.rand(n, 1, h, w) + 0.5,
        "normals": F.normalize(torch.randn(n, 3, h, w), dim=1),
        "edge": (torch.rand(n, 1, h, w) > 0.8).float(),
    }
    return preds, targets


def test_default_weights():
    assert PASCAL_WEIGHTS == {"edge": 50, "semseg": 1, "parts": 2, "normals": 10, "saliency": 5}
    assert NYUD_WEIGHTS == {"semseg": 1, "depth": 1, "normals": 10, "edge": 50}
    assert MultiTaskLoss().weights == PASCAL_WEIGHTS


def test_weighted_sum_with_partial_labels():
    preds, targets = _sample()
    labeled = {"depth": torch.tensor([True, False, True]), "edge": torch.zeros(3, dtype=torch.bool)}
    crit = MultiTaskLoss(NYUD_WEIGHTS)
    total, losses = crit(preds, targets, labeled)
    want = {t: for_task(t)(preds[t], targets[t], labeled.get(t)) for t in NYUD_WEIGHTS}
    for t in NYUD_WEIGHTS:
        torch.testing.assert_close(losses[t], want[t])
    assert losses["edge"].item() == 0.0
    torch.testing.assert_close(total, sum(NYUD_WEIGHTS[t] * want[t] for t in NYUD_WEIGHTS))
    total.backward()
    assert torch.equal(preds["edge"].grad, torch.zeros_like(preds["edge"]))
    assert preds["depth"].grad[1].abs().sum() == 0


def test_custom_loss_and_errors():
    preds, targets = _sample()
    astmt_depth = for_task("depth", gradient_weight=1.0)
    crit = MultiTaskLoss({"depth": 1.0}, losses={"depth": astmt_depth})
    total, _ = crit(preds, targets)
    want = depth_loss(preds["depth"], targets["depth"], gradient_weight=1.0)
    torch.testing.assert_close(total, want)
    with pytest.raises(ValueError, match="without a weight"):
        MultiTaskLoss({"depth": 1.0}, losses={"edge": astmt_depth})
    with pytest.raises(ValueError, match="lack"):
        MultiTaskLoss({"saliency": 1.0})(preds, targets)


def test_engine_accepts_task_losses():
    from mtlfast.engine import multi_branch_step

    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    heads = {"semseg": torch.nn.Conv2d(4, 5, 1), "edge": torch.nn.Conv2d(4, 1, 1)}
    images = torch.randn(3, 3, 4, 5)
    _, targets = _sample()
    labeled = {"edge": torch.tensor([True, False, True])}
    result = multi_branch_step(
        trunk,
        heads,
        images,
        {t: targets[t] for t in heads},
        {t: for_task(t) for t in heads},
        labeled=labeled,
        weights={"semseg": 1.0, "edge": 50.0},
        strategy="naive",
    )
    feats = trunk(images)
    want = for_task("edge")(heads["edge"](feats), targets["edge"], labeled["edge"])
    torch.testing.assert_close(result.losses["edge"], want.detach())
