"""Properties of the task losses: any input gives a 0-dim loss or a ValueError / TypeError naming
prediction, target or labeled; finite predictions give a finite loss and finite gradients, and
rows not labelled for the task change nothing."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mtlfast.losses import TASK_LOSSES, for_task

from .strategies import SPECIALS, names_argument

CHANNELS = {"semseg": 4, "parts": 3, "saliency": 1, "normals": 3, "edge": 1, "depth": 1}


def _valid(task, n, h, w, g):
    c = CHANNELS[task]
    pred = torch.randn(n, c, h, w, generator=g)
    if task in ("semseg", "parts"):
        target = torch.randint(0, c, (n, h, w), generator=g)
        target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    elif task == "normals":
        target = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
        target[:, :, torch.rand(h, w, generator=g) < 0.2] = 0
    elif task == "depth":
        target = torch.rand(n, 1, h, w, generator=g) * 5
        target[torch.rand(n, 1, h, w, generator=g) < 0.2] = 0
    else:
        target = (torch.rand(n, 1, h, w, generator=g) > 0.7).float()
        target[torch.rand(n, 1, h, w, generator=g) < 0.1] = 255
    return pred, target


@st.composite
def loss_inputs(draw, broken=True):
    task = draw(st.sampled_from(sorted(TASK_LOSSES)))
    n, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pred, target = _valid(task, n, h, w, g)
    labeled = None
    if draw(st.booleans()):
        labeled = torch.tensor(
            draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool
        )
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    pred = pred.to(dtype)
    how = (
        draw(st.sampled_from(["none", "shape", "channels", "rank", "dtype", "labeled", "ids"]))
        if broken
        else "none"
    )
    if how == "shape":
        target = target[..., : w - 1]
    elif how == "channels":
        pred = pred.repeat(1, 2, 1, 1)
    elif how == "rank":
        pred = pred.flatten(0, 1)
    elif how == "dtype":
        target = target.to(
            draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.uint8]))
        )
    elif how == "labeled":
        labeled = draw(
            st.sampled_from([torch.ones(n + 1, dtype=torch.bool), torch.ones(n), [True] * n])
        )
    elif how == "ids" and task in ("semseg", "parts") and target.numel():
        target = target.clone()
        target.view(-1)[0] = draw(st.sampled_from([-1, CHANNELS[task], 254, 256]))
    return task, pred, target, labeled


@given(loss_inputs())
def test_loss_is_a_zero_dim_tensor_or_a_named_error(args):
    task, pred, target, labeled = args
    pred = pred.requires_grad_()
    try:
        loss = for_task(task)(pred, target, labeled)
    except (ValueError, TypeError) as e:
        assert names_argument(str(e), ("prediction", "target", "labeled")), f"{task}: {e}"
        return
    assert loss.dim() == 0 and loss.is_floating_point()
    loss.backward()
    assert pred.grad is not None and pred.grad.shape == pred.shape


@given(loss_inputs(broken=False))
def test_finite_predictions_give_finite_losses_and_gradients(args):
    task, pred, target, labeled = args
    pred = pred.float().requires_grad_()
    loss = for_task(task)(pred, target, labeled)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    if labeled is not None:
        assert not pred.grad[~labeled].any(), "an unlabelled row got a gradient"


@given(loss_inputs(broken=False), st.integers(0, 10_000), st.sampled_from(SPECIALS))
def test_non_finite_prediction_in_an_unlabelled_row_changes_nothing(args, pos, value):
    task, pred, target, labeled = args
    if labeled is None or labeled.all():
        return
    pred = pred.float()
    expected = for_task(task)(pred, target, labeled)
    rows = (~labeled).nonzero().flatten()
    bad = pred.clone()
    row = bad[rows[pos % len(rows)]]
    row.view(-1)[pos % row.numel()] = value
    bad.requires_grad_()
    got = for_task(task)(bad, target, labeled)
    got.backward()
    assert torch.equal(got.detach(), expected) and torch.isfinite(bad.grad).all()
