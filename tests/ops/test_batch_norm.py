"""batch_norm's training-mode kernels against aten's batch norm: statistics, outputs, gradients,
running statistics, layouts, fallbacks, opcheck."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import mtlfast.ops.batch_norm_train as bnt
from mtlfast._extension import has_extension
from mtlfast.ops import batch_norm, use_backend

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")


@pytest.fixture(autouse=True)
def _kernels_at_every_size(monkeypatch):
    """The tests' small inputs take the kernels too (the op leaves inputs under 65536 values
    to aten)."""
    monkeypatch.setattr(bnt, "_MIN_NUMEL", 1)


# (N, C, H, W): channels off the vector width (3, 18, 40), planes shorter and longer than a vector
# and than four, 1x1 maps, one image
SHAPES = [
    (2, 5, 7, 9),
    (3, 18, 5, 33),
    (1, 40, 1, 2),
    (4, 3, 1, 1),
    (1, 17, 23, 31),
    (2, 1, 16, 16),
]
LAYOUTS = ("contiguous", "channels_last", "strided")


def _make(shape, dtype, layout, offset=2.0, scale=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider map
        return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    return x


def _close(got, want, dtype):
    scale = max(want.abs().max().item(), 1.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


def _as_accurate(got, aten, truth):
    """got is within twice aten's own float32 error of the float64 truth (or 2e-6 of its scale):
    a variance of a few nearly equal values amplifies both sides' rounding alike."""
    scale = max(truth.abs().max().item(), 1.0)
    err = (got.double() - truth).abs().max().item()
    aten_err = (aten.double() - truth).abs().max().item()
    assert err <= 2 * aten_err + 2e-6 * scale, (err, aten_err)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_cpu_matches_aten_forward_and_backward(shape, layout, dtype, affine):
    torch.manual_seed(0)
    x = _make(shape, dtype, layout)
    c = shape[1]
    w = torch.randn(c, dtype=dtype) if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    out, mean, invstd, var = bnt._train(x, w, b, 1e-5)  # the kernels themselves
    args = (None, None, True, 0.1, 1e-5)
    want = torch.ops.aten.native_batch_norm(x, w, b, *args)
    truth = torch.ops.aten.native_batch_norm(
        x.double(), *(None if t is None else t.double() for t in (w, b)), *args
    )
    cl = layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    grad = torch.randn_like(x)
    got = (out, mean, invstd, *bnt._train_backward(grad, x, w, mean, invstd))
    mask = [True, affine, affine]
    ref_back = torch.ops.aten.native_batch_norm_backward(
        grad, x, w, None, None, want[1], want[2], True, 1e-5, mask
    )
    true_back = torch.ops.aten.native_batch_norm_backward(
        grad.double(), x.double(), None if w is None else w.double(), None, None,
        truth[1], truth[2], True, 1e-5, mask,
    )  # fmt: skip
    pairs = (
        list(zip(got[:3], want, truth))
        + list(zip(got[3:], ref_back, true_back))[: 3 if affine else 1]
    )
    for g, a, t in pairs:
        if dtype == torch.float64:
            _close(g, a, dtype)
        else:
            _as_accurate(g, a, t)
    _close(var, x.double().var((0, 2, 3), unbiased=False).to(dtype), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_cpu_op_matches_f_batch_norm_with_running_stats(layout, momentum):
    torch.manual_seed(1)
    x = _make((3, 6, 8, 5), torch.float32, layout).requires_grad_()
    w = torch.randn(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    stats = [torch.randn(6), torch.rand(6) + 0.5]
    ref_stats = [t.clone() for t in stats]
    got = batch_norm(x, *stats, w, b, True, momentum, 1e-3)
    want = F.batch_norm(x, *ref_stats, w, b, True, momentum, 1e-3)
    _close(got, want, torch.float32)
    for s, r in zip(stats, ref_stats):
        _close(s, r, torch.float32)
    grad = torch.randn_like(want)
    for g, r in zip(
        torch.autograd.grad(got, (x, w, b), grad), torch.autograd.grad(want, (x, w, b), grad)
    ):
        _close(g, r, torch.float32)


def test_cpu_channels_last_variance_survives_a_large_mean():
    """One pass of sums around a pivot: a mean 1e4 times the spread keeps the variance."""
    torch.manual_seed(2)
    x = (torch.randn(4, 20, 16, 16, dtype=torch.float64) * 1e-2 + 100.0).float()
    want = x.double().var((0, 2, 3), unbiased=False)
    _, _, _, var = bnt._train(x.contiguous(memory_format=torch.channels_last), None, None, 1e-5)
    torch.testing.assert_close(var.double(), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_result_does_not_depend_on_threads(layout):
    x = _make((4, 24, 40, 40), torch.float32, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bnt._train(x, None, None, 1e-5)
        torch.set_num_threads(2)
        two = bnt._train(x, None, None, 1e-5)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_gradcheck_and_double_backward(layout):
    torch.manual_seed(3)
    x = _make((2, 3, 4, 5), torch.float64, layout).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return batch_norm(x, None, None, w, b, True)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_cpu_opcheck():
    for x in (
        torch.randn(2, 3, 5, 5),
        torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last),
    ):
        torch.library.opcheck(bnt._train, (x, torch.randn(3), torch.randn(3), 1e-5))
        torch.library.opcheck(bnt._train, (x, None, None, 1e-5))
        _, mean, invstd, _ = bnt._train(x, None, None, 1e-5)
        args = (torch.randn_like(x), x, torch.randn(3), mean, invstd)
        torch.library.opcheck(bnt._train_backward, args)


@pytest.mark.parametrize("case", ["eval", "bfloat16", "reference", "5d", "empty"])
def test_falls_back_to_f_batch_norm_exactly(case):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 5)
    training = True
    if case == "eval":
        training = False
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "5d":
        x = x[:, :, None]
    elif case == "empty":
        x = x[:, :, :0]
    stats = [torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)]
    ref_stats = [t.clone() for t in stats]
    if case == "reference":
        with use_backend("reference"):
            got = batch_norm(x, *stats, training=training)
    else:
        got = batch_norm(x, *stats, training=training)
    want = F.batch_norm(x, *ref_stats, training=training)
    for g, r in ((got, want), *zip(stats, ref_stats)):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)


def test_small_inputs_take_aten_large_ones_the_kernels(monkeypatch):
    monkeypatch.setattr(bnt, "_MIN_NUMEL", 1 << 16)
    calls, original = [], bnt._train
    monkeypatch.setattr(bnt, "_train", lambda *a: calls.append(a) or original(*a))
    small = torch.randn(4, 16, 32, 31)  # 63488 values
    assert torch.equal(
        batch_norm(small, None, None, training=True), F.batch_norm(small, None, None, training=True)
    )
    assert not calls
    batch_norm(torch.randn(4, 16, 32, 32), None, None, training=True)
    assert len(calls) == 1


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        batch_norm(torch.randn(2, 3, 2, 2), torch.zeros(4), torch.ones(3), training=True)


def test_cpu_kernel_checks_its_arguments():
    x = torch.randn(2, 3, 4, 4)
    ops = torch.ops.mtlfast_C
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.batch_norm_train(x.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a CPU \(3,\) tensor"):
        ops.batch_norm_train(x, torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.batch_norm_train(x[:1, :, :1, :1], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out must match"):
        ops.batch_norm_train_backward(x[:1], x, None, torch.zeros(3), torch.ones(3))
