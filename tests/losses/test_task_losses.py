"""Task losses: hand-computed values, ignore handling, labelled-sample averaging (UberNet Eq. 4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtlfast.losses import (
    balanced_bce_loss,
    cross_entropy_loss,
    depth_gradient_loss,
    depth_loss,
    edge_loss,
    for_task,
    normals_loss,
    saliency_loss,
)


def _batch(task, n=4, h=5, w=6):
    if task in ("semseg", "parts"):
        pred = torch.randn(n, 4, h, w)
        target = torch.randint(0, 4, (n, h, w))
        target[0, 0, :2] = 255
    elif task in ("edge", "saliency"):
        pred = torch.randn(n, 1, h, w)
        target = (torch.rand(n, 1, h, w) > 0.7).float()
        target[1, 0, 1, :3] = 255
    elif task == "normals":
        pred = torch.randn(n, 3, h, w)
        target = F.normalize(torch.randn(n, 3, h, w), dim=1)
        target[n - 1, :, 0, :] = 0
    else:
        pred = torch.rand(n, 1, h, w) * 5
        target = torch.rand(n, 1, h, w) * 5 + 0.1
        target[0, 0, 2, 2] = 0
    return pred.requires_grad_(), target


TASKS = ["semseg", "parts", "edge", "saliency", "normals", "depth"]


def test_cross_entropy_hand_computed():
    # One image, 1x3: logits per pixel, labels 0, 1, ignored.
    pred = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    assert cross_entropy_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy_loss(pred, target[:, None]).item() == pytest.approx(expected, rel=1e-6)


def test_edge_hand_computed():
    # Logit 0 everywhere: every valid pixel costs log 2; positives weigh 0.95, negatives 0.05.
    pred = torch.zeros(1, 1, 1, 4)
    target = torch.tensor([[[[1.0, 0.0, 0.0, 255.0]]]])
    # The ignored pixel adds nothing but still counts in the /4.
    expected = (0.95 * math.log(2) + 0.05 * 2 * math.log(2)) / 4
    assert edge_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    half = edge_loss(pred, target, pos_weight=0.5).item()
    assert half == pytest.approx(1.5 * math.log(2) / 4, rel=1e-6)


def test_balanced_bce_matches_formula():
    pred, target = _batch("edge", n=3)
    valid = target != 255
    pos, neg = (target == 1) & valid, (target == 0) & valid
    lp = -F.logsigmoid(pred)
    ln = -F.logsigmoid(-pred)
    w = neg.sum() / valid.sum()
    expected = (w * lp[pos].sum() + (1 - w) * ln[neg].sum()) / target.numel()
    torch.testing.assert_close(saliency_loss(pred, target), expected)
    expected = (0.95 * lp[pos].sum() + 0.05 * ln[neg].sum()) / target.numel()
    torch.testing.assert_close(edge_loss(pred, target), expected)


def test_saliency_balance_uses_labeled_rows_only():
    pred = torch.zeros(2, 1, 1, 4)
    target = torch.tensor([[[[1.0, 0, 0, 0]]], [[[1.0, 1, 1, 1]]]])
    labeled = torch.tensor([True, False])
    # Row 0 alone: w = 3/4 negatives; (0.75 * log2 + 0.25 * 3 log2) / 4.
    expected = (0.75 + 0.75) * math.log(2) / 4
    assert saliency_loss(pred, target, labeled).item() == pytest.approx(expected, rel=1e-6)
    assert balanced_bce_loss(pred, target, labeled).item() == pytest.approx(expected, rel=1e-6)


def test_normals_hand_computed():
    pred = torch.zeros(1, 3, 1, 3)
    target = torch.zeros(1, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0, 0])  # normalised to (1, 0, 0): error 0
    target[0, :, 0, 0] = torch.tensor([1.0, 0, 0])
    pred[0, :, 0, 1] = torch.tensor([5.0, 0, 0])  # (1, 0, 0) vs (0, 1, 0): |1| + |1| + 0
    target[0, :, 0, 1] = torch.tensor([0.0, 1, 0])
    pred[0, :, 0, 2] = torch.tensor([9.0, 9, 9])  # invalid label: ignored
    assert normals_loss(pred, target).item() == pytest.approx(2 / 6, rel=1e-6)


def test_depth_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0, 3.0, 100.0]]]])
    target = torch.tensor([[[[1.5, 2.0, 1.0, 0.0]]]])
    assert depth_loss(pred, target).item() == pytest.approx((0.5 + 0 + 2) / 3, rel=1e-6)


def test_depth_gradient_term_hand_computed():
    # Target a ramp t = column index + 1, prediction flat: Sobel x of the target is
    # (1 + 2 + 1) * (t[x-1] - t[x+1]) = -8 at each of the 2 inner pixels of a 3x4 map; y is 0.
    target = torch.arange(1.0, 5.0).expand(1, 1, 3, 4).clone()
    pred = torch.ones_like(target)
    assert depth_gradient_loss(pred, target).item() == pytest.approx(8.0)
    # An invalid pixel drops every 3x3 window holding it: (1, 1) lies in both windows.
    holed = target.clone()
    holed[0, 0, 1, 1] = 0
    assert depth_gradient_loss(pred, holed).item() == pytest.approx(0.0)
    holed = target.clone()
    holed[0, 0, 0, 0] = 0  # in the first window only
    assert depth_gradient_loss(pred, holed).item() == pytest.approx(8.0)
    # A constant offset has no gradient mismatch; the L1 term is the offset.
    assert depth_loss(target + 0.5, target, gradient_weight=1.0).item() == pytest.approx(0.5)
    l1 = depth_loss(pred, target).item()
    assert depth_loss(pred, target, gradient_weight=2.0).item() == pytest.approx(l1 + 16.0)


@pytest.mark.parametrize("task", TASKS)
def test_labeled_rows_equal_rows_alone(task):
    pred, target = _batch(task)
    labeled = torch.tensor([True, False, True, True])
    fn = for_task(task)
    got = fn(pred, target, labeled)
    want = fn(pred[labeled], target[labeled])
    torch.testing.assert_close(got, want)
    got.backward()
    assert pred.grad[1].abs().sum() == 0
    assert pred.grad[labeled].abs().sum() > 0
    # Two-argument form (the engine's loss_fns) with every row labelled.
    torch.testing.assert_close(fn(pred, target), fn(pred, target, torch.ones(4, dtype=torch.bool)))


@pytest.mark.parametrize("task", TASKS)
def test_nothing_labeled_is_a_connected_zero(task):
    pred, target = _batch(task)
    with torch.no_grad():
        pred[1] = float("inf")  # must not leak NaN into the zero or its gradient
    loss = for_task(task)(pred, target, torch.zeros(4, dtype=torch.bool))
    assert loss.dim() == 0 and loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("task", ["semseg", "edge", "saliency", "normals", "depth"])
def test_all_ignored_is_a_finite_zero(task):
    pred, target = _batch(task, n=2)
    if task in ("normals", "depth"):
        target = torch.zeros_like(target)
    else:
        target = torch.full_like(target, 255)
    loss = for_task(task)(pred, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_gradcheck_float64():
    torch.manual_seed(1)
    for task in ["semseg", "edge", "saliency", "normals", "depth"]:
        pred, target = _batch(task, n=2, h=3, w=4)
        pred = pred.detach().double().requires_grad_()
        target = target.double() if target.is_floating_point() else target
        fn = for_task(task, gradient_weight=1.0) if task == "depth" else for_task(task)
        assert torch.autograd.gradcheck(lambda p, fn=fn, target=target: fn(p, target), (pred,))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="labeled"):
        edge_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        edge_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 4))
    with pytest.raises(TypeError):
        cross_entropy_loss(torch.zeros(2, 3, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="unknown task"):
        for_task("albedo")


@pytest.mark.parametrize("bad_id", (-1, 3, 254, 256))
def test_cross_entropy_out_of_range_ids_raise_naming_target(bad_id):
    """Found by tests/property: an id outside [0, C) reached aten's IndexError."""
    target = torch.tensor([[[0, 255], [bad_id, 2]]])
    with pytest.raises(ValueError, match=r"target holds class ids outside \[0, 3\)"):
        cross_entropy_loss(torch.randn(1, 3, 2, 2), target)
    target[0, 1, 0] = 255  # the ignore index itself is fine
    assert torch.isfinite(cross_entropy_loss(torch.randn(1, 3, 2, 2), target))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_accumulates_in_float32(task, dtype):
    pred, target = _batch(task)
    low = pred.detach().to(dtype).requires_grad_()
    loss = for_task(task)(low, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, for_task(task)(low.detach().float(), target))
    loss.backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad.float()).all()


def test_channels_last_and_non_contiguous():
    pred, target = _batch("normals", n=4)
    want = normals_loss(pred, target)
    last = pred.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normals_loss(last, target), want)
    wide = torch.randn(4, 6, 5, 6)
    wide[:, ::2] = pred.detach()
    torch.testing.assert_close(normals_loss(wide[:, ::2], target), want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cross_entropy_backward_equals_aten(layout):
    """The lean backward (softmax minus one-hot in one map) against F.cross_entropy's."""
    torch.manual_seed(0)
    pred, target = _batch("semseg", h=7, w=9)
    pred = pred.detach().double()
    if layout == "channels_last":
        pred = pred.contiguous(memory_format=torch.channels_last)
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    got = cross_entropy_loss(a, target)
    want = F.cross_entropy(b, target, ignore_index=255, reduction="sum") / (target != 255).sum()
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad[0, :, 0, :2].abs().max() == 0  # ignored pixels


def test_cross_entropy_gradcheck_and_double_backward():
    """ASTMT's adversarial term differentiates the task loss's gradient again."""
    pred, target = _batch("parts", n=2, h=3, w=4)
    pred = pred.detach().double().requires_grad_()
    fn = lambda x: cross_entropy_loss(x, target)
    assert torch.autograd.gradcheck(fn, (pred,))
    assert torch.autograd.gradgradcheck(fn, (pred,))


def test_cross_entropy_bfloat16_logits_in_float32():
    pred, target = _batch("semseg")
    x = pred.detach().bfloat16().requires_grad_()
    loss = cross_entropy_loss(x, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    y = x.detach().float().requires_grad_()
    F.cross_entropy(y, target, ignore_index=255, reduction="sum").div(
        (target != 255).sum()
    ).backward()
    torch.testing.assert_close(loss, cross_entropy_loss(y, target))
    torch.testing.assert_close(x.grad.float(), y.grad, atol=1e-3, rtol=1e-2)
