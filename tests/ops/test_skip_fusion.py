"""skip_fusion: every backend against the reference, gradients, opcheck, bad input."""

import pytest
import torch
import torch.nn.functional as F

from mtlfast.ops import reference, skip_fusion, use_backend
from tests.conftest import require_backend

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}
# Sums over many pixels (grad_weight, grad_bias, the adjoint of upsampling) accumulate rounding.
SUM_TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
    torch.float64: TOL[torch.float64],
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_BACKENDS = ("reference", "cpu", "triton")
IN_SIZES = ((7, 5), (4, 3), (1, 1), (16, 16), (33, 31), (2, 9))


def make_inputs(
    k, c, out_size, dtype, bias=True, n=2, layout="contiguous", device="cpu", grad=True
):
    scores = []
    for i in range(k):
        h, w = IN_SIZES[i % len(IN_SIZES)]
        s = torch.randn(n, c, h, w, dtype=dtype, device=device)
        if layout == "channels_last":
            s = s.to(memory_format=torch.channels_last)
        elif layout == "strided":
            s = torch.randn(n, c, h, 2 * w, dtype=dtype, device=device)[..., ::2]
        scores.append(s.requires_grad_(grad))
    weight = torch.randn(k, c, dtype=dtype, device=device, requires_grad=grad)
    b = torch.randn(c, dtype=dtype, device=device, requires_grad=grad) if bias else None
    return scores, weight, b, out_size


def check(backend, scores, weight, bias, size):
    dtype = scores[0].dtype
    # float32 is checked against float64 arithmetic: the adjoint of a small layer sums over the
    # whole output, where float32 references are themselves off by more than the tolerance.
    up = (lambda t: t.double()) if dtype == torch.float32 else (lambda t: t)
    down = (lambda t: t.to(dtype)) if dtype == torch.float32 else (lambda t: t)
    expected = down(
        reference.skip_fusion(
            [up(s) for s in scores], up(weight), None if bias is None else up(bias), size
        )
    )
    grad = torch.randn(expected.shape, dtype=dtype, device=expected.device)
    exp_gs, exp_gw, exp_gb = reference.skip_fusion_backward(
        up(grad), [up(s) for s in scores], up(weight)
    )
    exp_gs, exp_gw, exp_gb = [down(g) for g in exp_gs], down(exp_gw), down(exp_gb)
    leaves = [*scores, weight] + ([bias] if bias is not None else [])
    with use_backend(backend):
        out = skip_fusion(scores, weight, bias, size)
        grads = torch.autograd.grad(out, leaves, grad)
    assert out.shape == expected.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])
    for g, e in zip(grads[: len(scores)], exp_gs):  # a source pixel sums many output pixels
        torch.testing.assert_close(g, e, **SUM_TOL[dtype])
    torch.testing.assert_close(grads[len(scores)], exp_gw, **SUM_TOL[dtype])
    if bias is not None:
        torch.testing.assert_close(grads[-1], exp_gb, **SUM_TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", (1, 2, 6))
@pytest.mark.parametrize("out_size", ((7, 5), (32, 32), (13, 9), (1, 1)), ids=str)
def test_matches_reference(backend, dtype, k, out_size):
    require_backend(backend)
    check(backend, *make_inputs(k, 3, out_size, dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "c, bias, layout", [(1, False, "contiguous"), (21, True, "channels_last"), (3, True, "strided")]
)
def test_channels_bias_and_strides(backend, c, bias, layout):
    require_backend(backend)
    check(backend, *make_inputs(3, c, (17, 19), torch.float32, bias=bias, layout=layout))


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_gradcheck_float64(backend):
    require_backend(backend)
    scores, weight, bias, _ = make_inputs(3, 2, None, torch.float64)
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: skip_fusion(list(a[:3]), a[3], a[4], (6, 5)), (*scores, weight, bias)
        )


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_opcheck(backend):
    require_backend(backend)
    scores, weight, bias, _ = make_inputs(2, 3, None, torch.float32)
    g = torch.randn(2, 3, 9, 8)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.mtlfast.skip_fusion.default, (scores, weight, bias, [9, 8]))
        torch.library.opcheck(torch.ops.mtlfast.skip_fusion.default, (scores, weight, None, [3, 2]))
        detached = [s.detach() for s in scores]
        torch.library.opcheck(
            torch.ops.mtlfast.skip_fusion_backward.default, (g, detached, weight.detach())
        )


def test_compile_fullgraph():
    scores, weight, bias, _ = make_inputs(3, 4, None, torch.float32, grad=False)
    fn = torch.compile(lambda s, w, b: skip_fusion(s, w, b, (12, 10)), fullgraph=True)
    torch.testing.assert_close(
        fn(scores, weight, bias), reference.skip_fusion(scores, weight, bias, (12, 10))
    )


def test_weight_of_another_dtype_is_cast():
    scores, weight, bias, _ = make_inputs(2, 3, None, torch.bfloat16, grad=False)
    out = skip_fusion(scores, weight.float(), bias.float(), (5, 5))
    assert out.dtype == torch.bfloat16


def test_naive_ubernet_head_equivalence():
    """Equals interpolate-concatenate-1x1 (per-channel) of the naive head."""
    scores, weight, bias, _ = make_inputs(3, 2, None, torch.float64, grad=False)
    up = torch.cat(
        [F.interpolate(s, (11, 7), mode="bilinear", align_corners=False) for s in scores], 1
    )
    # Channel c of layer k sits at k*C + c in the concatenation; a grouped 1x1 conv per channel.
    per_channel = up.view(2, 3, 2, 11, 7).transpose(1, 2).reshape(2, 6, 11, 7)
    naive = F.conv2d(per_channel, weight.T.reshape(2, 3, 1, 1), bias, groups=2)
    torch.testing.assert_close(skip_fusion(scores, weight, bias, (11, 7)), naive)


def good():
    return make_inputs(2, 3, (5, 5), torch.float32, grad=False)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda s, w, b, z: ([], w, b, z), ValueError, "scores must be a non-empty list"),
        (
            lambda s, w, b, z: ([s[0][0], s[1]], w, b, z),
            ValueError,
            r"scores\[0\] must have shape \(N, C, H_k, W_k\)",
        ),
        (
            lambda s, w, b, z: ([s[0], s[1][:, :2]], w, b, z),
            ValueError,
            r"scores\[1\] must have shape .* like scores\[0\]",
        ),
        (
            lambda s, w, b, z: ([s[0], s[1].double()], w, b, z),
            TypeError,
            r"scores\[1\] has dtype torch.float64",
        ),
        (
            lambda s, w, b, z: ([s[0], s[1].long()], w, b, z),
            TypeError,
            r"scores\[1\] must be a floating-point",
        ),
        (
            lambda s, w, b, z: (s, w[:1], b, z),
            ValueError,
            r"weight must have shape \(K, C\) = \(2, 3\)",
        ),
        (lambda s, w, b, z: (s, w, b[:2], z), ValueError, r"bias must have shape \(C,\) = \(3,\)"),
        (lambda s, w, b, z: (s, w, b, (0, 4)), ValueError, "size must be a pair of positive ints"),
        (lambda s, w, b, z: (s, w, b, (4,)), ValueError, "size must be a pair of positive ints"),
        (lambda s, w, b, z: (s, w.to("meta"), b, z), ValueError, "weight is on meta but scores"),
    ],
)
def test_bad_input(mutate, error, match):
    with pytest.raises(error, match=match):
        skip_fusion(*mutate(*good()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "k, out_size", [(1, (7, 5)), (6, (64, 64)), (3, (13, 9)), (2, (1, 1))], ids=str
)
def test_gpu_matches_reference(backend, dtype, k, out_size):
    require_backend(backend, "cuda")
    check(backend, *make_inputs(k, 21, out_size, dtype, device="cuda"))


# ---- issue 16: crashes and errors --------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infinite_weight_follows_the_formula_on_every_backend(backend):
    # The cpu kernels fold the weight into the bilinear taps: inf * mixed-sign taps gave NaN
    # where the formula (interpolate, then multiply) gives +-inf.
    require_backend(backend)
    torch.manual_seed(0)
    scores = [
        torch.randn(1, 2, 3, 3, requires_grad=True),
        torch.randn(1, 2, 2, 2, requires_grad=True),
    ]
    weight = torch.tensor([[float("inf"), 1.0], [1.0, -float("inf")]], requires_grad=True)
    bias = torch.randn(2, requires_grad=True)
    want = reference.skip_fusion(scores, weight, bias, (5, 5))
    want_grads = reference.skip_fusion_backward(torch.ones_like(want), scores, weight)
    assert want.isinf().any()
    with use_backend(backend):
        out = skip_fusion(scores, weight, bias, (5, 5))
        out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, want, equal_nan=True)
    torch.testing.assert_close(weight.grad, want_grads[1], equal_nan=True)
    torch.testing.assert_close(bias.grad, want_grads[2], equal_nan=True)
    # The scores' gradient is that of an infinite weight: non-finite wherever the reference's is
    # (NaN or inf depends on whether an adjoint adds the 0 * inf of a zero-weight tap).
    for got, ref in zip((s.grad for s in scores), want_grads[0]):
        assert torch.equal(got.isfinite(), ref.isfinite())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infinite_scores_follow_the_formula_on_every_backend(backend):
    require_backend(backend)
    torch.manual_seed(0)
    scores = [torch.randn(1, 2, 3, 3), torch.randn(1, 2, 2, 2)]
    scores[0][0, 0, 1, 1] = float("inf")
    scores[1][0, 1, 0, 0] = -float("inf")
    weight = torch.randn(2, 2)
    with use_backend(backend):
        out = skip_fusion(scores, weight, None, (5, 5))
    torch.testing.assert_close(
        out, reference.skip_fusion(scores, weight, None, (5, 5)), equal_nan=True
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_channels_raise_naming_scores(backend):
    # cpu returned an empty tensor where reference raised aten's "Non-empty 4D data tensor".
    require_backend(backend)
    with (
        use_backend(backend),
        pytest.raises(ValueError, match=r"scores\[0\] must have C >= 1 channels"),
    ):
        skip_fusion([torch.randn(1, 0, 3, 3)], torch.randn(1, 0), None, (4, 4))


@pytest.mark.parametrize("size", [(2**31, 2), (2**62, 4), (10**6, 10**6)], ids=str)
def test_huge_size_raises_naming_size(size):
    # (2**31, 2) used to allocate 16 GiB lazily and get the process killed while writing it.
    with pytest.raises(ValueError, match=r"skip_fusion: size"):
        skip_fusion([torch.randn(1, 1, 2, 2)], torch.ones(1, 1), None, size)


@pytest.mark.parametrize("dtype", (torch.float8_e4m3fn, torch.float8_e5m2), ids=str)
def test_float8_raises_naming_the_argument(dtype):
    scores, weight, bias, size = good()
    with pytest.raises(TypeError, match=r"scores\[0\] must be a floating-point tensor \(float32"):
        skip_fusion([s.to(dtype) for s in scores], weight, bias, size)
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor \(float32"):
        skip_fusion(scores, weight.to(dtype), bias, size)
