"""Deep-supervision keys missing from ``labeled`` take their task's flags, never 'every sample'."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtlfast.engine import multi_branch_step

from .models import C, H, N, assert_same_grads, conv_trunk, run_both

# MTI-Net's and UberNet's deep-supervision keys, and a task with no extra key
KEYS = {
    "seg": "seg",
    "deep_supervision/scale_0/seg": "seg",
    "depth": "depth",
    "depth/scale_0.5": "depth",
    "normals": "normals",
}
OUTS = {"seg": 3, "depth": 1, "normals": 3}
TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # float64 models


class DeepSupervisedHead(nn.Module):
    """A joint head returning every key of KEYS, each from its own 1x1 conv (keys hold '.' and '/',
    which module names may not, so the convs sit in a list)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = tuple(KEYS)
        self.convs = nn.ModuleList(nn.Conv2d(C, OUTS[task], 1) for task in KEYS.values())

    def forward(self, x):
        return {key: conv(x) for key, conv in zip(KEYS, self.convs)}


def _problem():
    trunk = conv_trunk(5).double()
    heads = nn.ModuleDict({"decoder": DeepSupervisedHead()}).double()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    targets = {k: torch.randn(N, OUTS[t], H, H, dtype=torch.float64) for k, t in KEYS.items()}
    loss_fns = {k: F.mse_loss for k in KEYS}
    return trunk, heads, images, targets, loss_fns


def _masks():
    return {
        "seg": torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool),
        "depth": torch.tensor([0, 1, 0, 0, 0, 1], dtype=torch.bool),
    }


@pytest.mark.parametrize("strategy", ["naive", "recompute"])
def test_unexpanded_labels_equal_expanded_ones(strategy):
    trunk, heads, images, targets, loss_fns = _problem()
    masks = _masks()
    expanded = {k: masks[t] for k, t in KEYS.items() if t in masks}
    results = {}
    for name, labeled in (("task", masks), ("expanded", expanded)):
        results[name] = run_both(trunk, heads, images, targets, loss_fns, labeled=labeled)
        assert_same_grads(results[name], **TIGHT)
    task, full = results["task"][strategy], results["expanded"][strategy]
    assert task[2].ran == full[2].ran == list(KEYS)
    for k in KEYS:
        torch.testing.assert_close(task[2].losses[k], full[2].losses[k], **TIGHT)
    for (name, a), b in zip(task[1].named_parameters(), full[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, **TIGHT)

    # the inherited keys' losses are those of their task's labelled rows only
    out = heads["decoder"](trunk(images))
    for key in ("deep_supervision/scale_0/seg", "depth/scale_0.5"):
        rows = masks[KEYS[key]]
        expected = F.mse_loss(out[key][rows], targets[key][rows])
        torch.testing.assert_close(task[2].losses[key], expected.detach(), **TIGHT)


def test_unlabelled_task_skips_its_deep_supervision_keys_too():
    trunk, heads, images, targets, loss_fns = _problem()
    labeled = {"seg": torch.zeros(N, dtype=torch.bool)}
    result = multi_branch_step(trunk, heads, images, targets, loss_fns, labeled=labeled)
    assert result.skipped == ["seg", "deep_supervision/scale_0/seg"]
    assert result.ran == ["depth", "depth/scale_0.5", "normals"]


def test_an_explicit_key_wins_over_its_task():
    trunk, heads, images, targets, loss_fns = _problem()
    labeled = {
        "seg": torch.ones(N, dtype=torch.bool),
        "deep_supervision/scale_0/seg": torch.zeros(N, dtype=torch.bool),
    }
    result = multi_branch_step(trunk, heads, images, targets, loss_fns, labeled=labeled)
    assert result.skipped == ["deep_supervision/scale_0/seg"]


def test_two_candidate_masks_raise():
    trunk, heads, images, targets, loss_fns = _problem()
    labeled = {
        "depth": torch.ones(N, dtype=torch.bool),
        "scale_0.5": torch.ones(N, dtype=torch.bool),
    }
    with pytest.raises(ValueError, match="several of its components"):
        multi_branch_step(trunk, heads, images, targets, loss_fns, labeled=labeled)


def test_a_bad_inherited_mask_names_its_key():
    trunk, heads, images, targets, loss_fns = _problem()
    with pytest.raises(ValueError, match=r"labeled\['seg'\] has shape \(5,\)"):
        multi_branch_step(
            trunk,
            heads,
            images,
            targets,
            loss_fns,
            labeled={"seg": torch.ones(5, dtype=torch.bool)},
        )


def test_labeled_component_used_by_an_inheriting_key_is_known():
    # 'seg' and 'depth' are predicted, but a component used only by inheriting keys is known too
    trunk, heads, images, targets, loss_fns = _problem()
    only = ("deep_supervision/scale_0/seg", "depth/scale_0.5")

    class Only(nn.Module):
        tasks = only

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {k: v for k, v in self.inner(x).items() if k in only}

    heads = nn.ModuleDict({"decoder": Only(heads["decoder"])})
    masks = _masks()
    result = multi_branch_step(
        trunk, heads, images, targets, loss_fns, labeled=masks, strategy="naive"
    )
    assert set(result.ran) == {"deep_supervision/scale_0/seg", "depth/scale_0.5"}
    with pytest.raises(ValueError, match=r"labeled has task 'normal', which no head predicts"):
        multi_branch_step(
            trunk, heads, images, targets, loss_fns, labeled={**masks, "normal": masks["seg"]}
        )
