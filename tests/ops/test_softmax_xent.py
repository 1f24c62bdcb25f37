"""The softmax cross-entropy kernels (csrc/cpu/softmax_xent_kernel.h) behind
``mtlfast.losses.cross_entropy_loss`` against aten's: values, gradients, layouts, tails, infinite
logits, bad input. Test names carry ``cpu`` so that test_isa_capability runs them on every
instruction-set copy."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import mtlfast.losses.segmentation as seg
from mtlfast._extension import has_extension
from mtlfast.losses import cross_entropy_loss
from mtlfast.ops import use_backend

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")

IGNORE = 255
# (N, C, H, W): one class, fewer pixels than a vector, a tile of exactly 64, tails of a tile
SHAPES = [(2, 1, 3, 5), (1, 3, 1, 1), (2, 21, 8, 8), (3, 7, 37, 29), (2, 33, 9, 15), (1, 2, 13, 11)]


def _inputs(shape, dtype, layout, seed=0, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignored] = IGNORE
    return x, target


def _aten(x, target):
    """The loss and gradient by aten's F.cross_entropy (summed, then the mean over kept pixels)."""
    y = x.detach().clone().requires_grad_()
    kept = (target != IGNORE).sum().clamp(min=1)
    loss = F.cross_entropy(y, target, ignore_index=IGNORE, reduction="sum") / kept
    loss.backward()
    return loss.detach(), y.grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_loss_and_gradient_equal_aten(shape, dtype, layout):
    x, target = _inputs(shape, dtype, layout)
    assert seg._kernels(x)
    a = x.detach().clone().requires_grad_()
    loss = cross_entropy_loss(a, target)
    loss.backward()
    want, grad = _aten(x, target)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, want, **tol)
    torch.testing.assert_close(a.grad, grad, **tol)
    # the gradient keeps the logits' layout; ignored pixels get none
    if shape[1] > 1 and shape[2] * shape[3] > 1:  # else both layouts are one
        assert a.grad.is_contiguous(memory_format=torch.channels_last) == (
            layout == "channels_last"
        )
    assert (a.grad.permute(0, 2, 3, 1)[target == IGNORE] == 0).all()
    with torch.no_grad():  # the forward kernel alone
        torch.testing.assert_close(cross_entropy_loss(x, target), want, **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_kernels_equal_the_aten_formula_they_replace(layout):
    """The kernel path against the same function under use_backend("reference") (aten's ops)."""
    x, target = _inputs((2, 21, 17, 19), torch.float32, layout, seed=3)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = cross_entropy_loss(a, target)
    with use_backend("reference"):
        assert not seg._kernels(b)
        want = cross_entropy_loss(b, target)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_infinite_and_large_logits_as_aten(layout):
    x, target = _inputs((1, 5, 4, 6), torch.float64, layout, ignored=0.0)
    x = x.clone()
    x[0, :, 0, 0] = float("-inf")  # all -inf: lse -inf, as aten's logsumexp
    x[0, 2, 0, 1] = float("inf")
    x[0, :, 1, :] *= 1e4
    got = torch.ops.mtlfast_C.softmax_xent_fwd(x, target, IGNORE)[0]
    torch.testing.assert_close(got, torch.logsumexp(x, 1))
    finite = x.clone()
    finite[0, :, 0, :2] = 0.0
    a = finite.clone().requires_grad_()
    cross_entropy_loss(a, target).backward()
    torch.testing.assert_close(a.grad, _aten(finite, target)[1])


def test_cpu_all_ignored_and_gradcheck():
    x, target = _inputs((2, 4, 3, 5), torch.float64, "contiguous")
    target.fill_(IGNORE)
    a = x.clone().requires_grad_()
    loss = cross_entropy_loss(a, target)
    loss.backward()
    assert loss.item() == 0 and a.grad.abs().max() == 0
    x, target = _inputs((2, 4, 3, 5), torch.float64, "channels_last")
    a = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda y: cross_entropy_loss(y, target), (a,))
    assert torch.autograd.gradgradcheck(lambda y: cross_entropy_loss(y, target), (a,))


def test_cpu_other_inputs_take_aten():
    x, _ = _inputs((2, 3, 4, 5), torch.float32, "contiguous")
    assert not seg._kernels(x.bfloat16())
    assert not seg._kernels(x[:, :, :, ::2])  # neither layout
    assert not seg._kernels(x.transpose(2, 3))


def test_cpu_kernel_bad_input_names_the_argument():
    x, target = _inputs((2, 3, 4, 5), torch.float32, "contiguous")
    op = torch.ops.mtlfast_C
    with pytest.raises(RuntimeError, match="x must be 4-d"):
        op.softmax_xent_fwd(x[0], target, IGNORE)
    with pytest.raises(RuntimeError, match="x must be contiguous or channels-last"):
        op.softmax_xent_fwd(x[:, :, :, ::2], target[:, :, ::2].contiguous(), IGNORE)
    with pytest.raises(RuntimeError, match="target must be a contiguous int64"):
        op.softmax_xent_fwd(x, target.int(), IGNORE)
    with pytest.raises(RuntimeError, match="target must be \\(N, H, W\\)"):
        op.softmax_xent_fwd(x, target[:, :3].contiguous(), IGNORE)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        op.softmax_xent_fwd(x.half(), target, IGNORE)
    lse, _ = op.softmax_xent_fwd(x, target, IGNORE)
    with pytest.raises(RuntimeError, match="lse must be"):
        op.softmax_xent_bwd(x, target, lse.double(), IGNORE, 1.0)
