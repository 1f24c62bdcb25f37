"""max_pool2d against aten's F.max_pool2d: values, chosen positions, gradients, fallbacks, opcheck."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import mtlfast.ops.max_pool as mp
from mtlfast._extension import has_extension
from mtlfast.nn import MaxPool2d
from mtlfast.ops import max_pool2d, use_backend

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")

# (N, C, H, W), kernel, stride, padding: the stems' 3x3/2 and DeepLab-VGG's 3x3/1, rows wider and
# narrower than a vector (partial vectors, edge windows), non-square windows and strides, 1x1
GEOMETRIES = [
    ((2, 3, 9, 11), (3, 3), (2, 2), (1, 1)),
    ((1, 2, 6, 70), (3, 3), (2, 2), (1, 1)),
    ((1, 2, 5, 33), (3, 3), (1, 1), (1, 1)),
    ((2, 2, 8, 8), (2, 2), (2, 2), (0, 0)),
    ((1, 1, 17, 40), (3, 2), (2, 1), (1, 1)),
    ((1, 2, 7, 19), (5, 5), (3, 2), (2, 1)),
    ((1, 2, 1, 1), (1, 1), (1, 1), (0, 0)),
    ((1, 1, 2, 3), (3, 3), (2, 2), (1, 1)),
]
LAYOUTS = ("contiguous", "channel_strided", "inner_strided", "channels_last")


def _awkward(shape, dtype, layout):
    """Small integers (ties everywhere, as after a ReLU), some -inf and some NaN, laid out."""
    x = torch.randn(shape, dtype=torch.float64).mul(1.5).round().to(dtype)
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[::11] = float("nan")
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel_strided":  # every other channel of a wider tensor
        return torch.stack([x, torch.zeros_like(x)], 2).flatten(1, 2)[:, ::2]
    if layout == "inner_strided":  # every other column
        return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    return x


def _positions(offsets, width, kernel, stride, padding):
    return mp._flat_indices(offsets, width, kernel, stride, padding)


@pytest.mark.parametrize("shape,kernel,stride,padding", GEOMETRIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_aten_values_positions_and_gradients(
    shape, kernel, stride, padding, layout, dtype
):
    torch.manual_seed(0)
    x = _awkward(shape, dtype, layout).requires_grad_()
    out, offsets = mp._pool(x, list(kernel), list(stride), list(padding))  # the kernel itself
    want, indices = F.max_pool2d_with_indices(x, kernel, stride, padding)
    assert out.shape == want.shape and out.dtype == want.dtype and offsets.dtype == torch.uint8
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(_positions(offsets, shape[3], kernel, stride, padding), indices)
    grad = torch.randn_like(want)
    (got,) = torch.autograd.grad(out, x, grad)
    (ref,) = torch.autograd.grad(want, x, grad)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_wide_maps_match_aten(dtype):
    """Maps wider than several vectors, the stride-2 and stride-1 pools of the backbones."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 37, 131, dtype=dtype).relu()
    for stride in (1, 2):
        want, indices = F.max_pool2d_with_indices(x, 3, stride, 1)
        out, offsets = mp._pool(x, [3, 3], [stride, stride], [1, 1])
        assert torch.equal(out, want)
        assert torch.equal(_positions(offsets, 131, (3, 3), (stride,) * 2, (1, 1)), indices)


def test_cpu_gradcheck_and_double_backward():
    torch.manual_seed(2)
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: max_pool2d(t, 3, 2, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: max_pool2d(t, 3, 2, 1), (x,))


def test_cpu_opcheck():
    x = torch.randn(2, 3, 9, 11)
    torch.library.opcheck(mp._pool, (x, [3, 3], [2, 2], [1, 1]))
    out, offsets = mp._pool(x, [3, 3], [2, 2], [1, 1])
    args = (torch.randn_like(out), offsets, [9, 11], [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(mp._pool_backward, args)


def test_cpu_keeps_uint8_offsets_for_backward():
    """The kernel's autograd node saves one uint8 per output, not aten's int64 indices (nor x)."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = max_pool2d(x, 3, 2, 1)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.uint8, tuple(y.shape))]


@pytest.mark.parametrize(
    "case", ["channels_last", "bfloat16", "reference", "dilation", "ceil_mode", "3d", "empty"]
)
def test_falls_back_to_aten_exactly(case):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 10)
    module = MaxPool2d(3, 2, 1)
    ref_module = torch.nn.MaxPool2d(3, 2, 1)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "dilation":
        module, ref_module = MaxPool2d(3, 2, 1, dilation=2), torch.nn.MaxPool2d(3, 2, 1, dilation=2)
    elif case == "ceil_mode":
        module = MaxPool2d(3, 2, 1, ceil_mode=True)
        ref_module = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    elif case == "3d":
        x = x[0]
    elif case == "empty":
        x = x[:0]
    if case == "reference":
        with use_backend("reference"):
            got = module(x)
    else:
        got = module(x)
    want = ref_module(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)
    if case == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_module_is_nn_maxpool():
    m = MaxPool2d(3, stride=2, padding=1)
    assert isinstance(m, torch.nn.MaxPool2d)
    assert repr(m) == repr(torch.nn.MaxPool2d(3, stride=2, padding=1))
    assert m.state_dict() == {}
    x = torch.randn(2, 4, 16, 16)
    assert torch.equal(m(x), F.max_pool2d(x, 3, 2, 1))


def test_bad_input_names_the_argument():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="x must be a 4-d"):
        max_pool2d(x[0], 3)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        max_pool2d(x, (3, 3, 3))
    with pytest.raises(ValueError, match="kernel_size and stride must be positive"):
        max_pool2d(x, 0)
    with pytest.raises(ValueError, match="padding must be at most half"):
        max_pool2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        max_pool2d(x, 7, 1, 0)


def test_cpu_kernel_checks_its_arguments():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.mtlfast_C.max_pool2d(x.half(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="at most 255 positions"):
        torch.ops.mtlfast_C.max_pool2d(torch.randn(1, 1, 20, 20), [16, 16], [1, 1], [0, 0])
    out, offsets = torch.ops.mtlfast_C.max_pool2d(x, [3, 3], [2, 2], [1, 1])
    bad = offsets.clone()
    bad[0, 0, 0, 0] = 0  # (ky, kx) = (0, 0) of the top-left window is padding
    with pytest.raises(RuntimeError, match="outside their windows"):
        torch.ops.mtlfast_C.max_pool2d_backward(out, bad, [5, 5], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="offsets must be a uint8"):
        torch.ops.mtlfast_C.max_pool2d_backward(out, offsets.long(), [5, 5], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.mtlfast_C.max_pool2d_backward(out, offsets, [7, 7], [3, 3], [2, 2], [1, 1])
