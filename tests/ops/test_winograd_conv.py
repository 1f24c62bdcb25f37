"""winograd_conv3x3 against F.conv2d: values, gradients, layouts, chunking, fallbacks, opcheck;
F(4x4, 3x3) and F(2x2, 3x3) alike."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import mtlfast.ops.winograd_conv as wc
from mtlfast._extension import has_extension
from mtlfast.ops import use_backend, winograd_conv3x3

from .conftest import make

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")

LAYOUTS = ("contiguous", "channels_last", "inner_strided")
# (N, C_in, H, W), C_out: odd maps (partial tiles), channel counts off the vector width, 1x1 maps,
# and maps 64 or more wide, whose NCHW output is written a tile row at a time
SHAPES = [
    ((2, 5, 7, 9), 3),
    ((1, 17, 13, 4), 20),
    ((3, 1, 1, 1), 2),
    ((1, 33, 8, 8), 16),
    ((2, 3, 4, 5), 1),
    ((1, 5, 9, 66), 19),
    ((2, 2, 4, 64), 33),
    ((0, 3, 5, 5), 2),
]


def _tol(dtype):
    # F(4x4, 3x3)'s transforms carry entries up to 8: about 1e-5 of the output's scale in fp32
    return (2e-5, 2e-5) if dtype == torch.float32 else (1e-12, 1e-12)


def _close(got, want, dtype):
    assert got.shape == want.shape
    if want.numel() == 0:
        return
    atol, rtol = _tol(dtype)
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("shape,k", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tile", [4, 2])
def test_cpu_matches_conv2d_forward_and_backward(shape, k, layout, dtype, bias, tile):
    torch.manual_seed(0)
    x = make(shape, dtype, layout).requires_grad_()
    w = (torch.randn(k, shape[1], 3, 3, dtype=dtype) / 3).requires_grad_()
    b = torch.randn(k, dtype=dtype, requires_grad=True) if bias else None
    got = wc._winograd(x, w, b, tile)  # the op itself, whatever the size thresholds say
    want = F.conv2d(x, w, b, padding=1)
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want, dtype)
    channels_last = (
        layout == "channels_last" and shape[0] > 0 and shape[1] > 1 and shape[2] * shape[3] > 1
    )
    assert got.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    grad = torch.randn_like(want)
    inputs = (x, w) + ((b,) if bias else ())
    for g, r in zip(
        torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)
    ):
        _close(g, r, dtype)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [4, 2])
def test_cpu_chunks_of_tile_rows_and_channel_groups_match_one_chunk(
    monkeypatch, rows, layout, dtype, tile
):
    """Ranges of whole tile rows (here 1 or 3 rows of 3 tiles, the last range shorter) and
    groups of output channels (2 groups of 3 and 2 with rows=1): the input adjoint adds across
    range boundaries, the weight gradient sums the ranges, each group writes its channels (fp32:
    oneDNN's products where torch has them, fp64: torch.bmm's). F(2x2): 10 rows of 6 tiles, in
    ranges of 1 or 2 rows."""
    torch.manual_seed(1)
    size = torch.tensor([], dtype=dtype).element_size()
    x = make((2, 6, 10, 11), dtype, layout).requires_grad_()
    w = torch.randn(5, 6, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True)
    bound = rows * (tile + 2) ** 2 * 6 * 3 * size
    monkeypatch.setattr(wc, "_RANGE_BYTES", bound)
    monkeypatch.setattr(wc, "_TENSOR_BYTES", bound)
    batched = wc._batched(dtype)
    ranges = {(4, 1): 6, (4, 3): 2, (2, 1): 10, (2, 3): 5}[tile, rows]
    assert len(wc._chunks(x, 6, batched, tile)) == ranges
    assert len(wc._groups(5, 6, size, tile)) == (2 if rows == 1 else 1)
    got = wc._winograd(x, w, b, tile)
    grads = torch.autograd.grad(got, (x, w, b), torch.ones_like(got))
    want = F.conv2d(x, w, b, padding=1)
    wants = torch.autograd.grad(want, (x, w, b), torch.ones_like(want))
    for g, r in zip((got, *grads), (want, *wants)):
        _close(g, r, dtype)


def test_cpu_products_without_onednn_match(monkeypatch):
    """The products by one torch.bmm where torch lacks oneDNN's: the same values and gradients."""
    torch.manual_seed(2)
    x = torch.randn(2, 7, 9, 10, requires_grad=True)
    w = torch.randn(5, 7, 3, 3, requires_grad=True)
    for tile in (4, 2):
        got = wc._winograd(x, w, None, tile)
        grads = torch.autograd.grad(got, (x, w), torch.ones_like(got))
        with monkeypatch.context() as m:
            m.setattr(wc, "_onednn_linear", lambda: False)
            again = wc._winograd(x, w, None, tile)
            agains = torch.autograd.grad(again, (x, w), torch.ones_like(again))
        for g, r in zip((got, *grads), (again, *agains)):
            _close(g, r, torch.float32)


def test_onednn_probe_falls_back_to_bmm_when_the_op_fails(monkeypatch):
    """oneDNN's product is private to torch: a release where it answers otherwise means bmm."""

    def broken(*args):
        raise RuntimeError("mkldnn::_linear_pointwise: schema changed")

    monkeypatch.setattr(wc, "_linear", broken)
    wc._onednn_linear.cache_clear()
    try:
        assert wc._onednn_linear() is False and wc._batched(torch.float32)
    finally:
        wc._onednn_linear.cache_clear()


@pytest.fixture
def autotune():
    """set_winograd_autotune(True) for one test, with no choices from other tests."""
    previous, saved = wc.set_winograd_autotune(True), dict(wc._choices)
    wc._choices.clear()
    yield
    wc.set_winograd_autotune(previous)
    wc._choices.clear()
    wc._choices.update(saved)


@pytest.mark.usefixtures("autotune")
@pytest.mark.parametrize("faster", [0, 4, 2])
def test_autotune_measures_each_shape_once_and_follows_it(monkeypatch, faster):
    calls = []

    def measure(x, weight):
        calls.append((tuple(x.shape), weight.shape[0]))
        return faster

    monkeypatch.setattr(wc, "_measure", measure)
    torch.manual_seed(0)
    x = torch.randn(2, 128, 16, 16, requires_grad=True)
    w = (torch.randn(128, 128, 3, 3) / 30).requires_grad_()
    got = winograd_conv3x3(x, w)
    (gx,) = torch.autograd.grad(got.sum(), x)
    winograd_conv3x3(x.detach(), w)  # the same shape: no second measurement
    winograd_conv3x3(x[:1], w)  # another batch: measured
    winograd_conv3x3(torch.randn(2, 8, 16, 16), torch.randn(8, 8, 3, 3))  # not eligible: never
    assert calls == [((2, 128, 16, 16), 128), ((1, 128, 16, 16), 128)]
    choices = wc.winograd_autotune_choices()
    assert set(choices.values()) == {faster} and len(choices) == 2
    want = wc._winograd(x, w, None, faster) if faster else F.conv2d(x, w, padding=1)
    (want_gx,) = torch.autograd.grad(want.sum(), x)
    assert torch.equal(got, want) and torch.equal(gx, want_gx)


@pytest.mark.usefixtures("autotune")
def test_autotune_real_measurement_gives_a_choice():
    x = torch.randn(1, 128, 16, 16)
    w = torch.randn(128, 128, 3, 3) / 30
    got = winograd_conv3x3(x, w)
    ((key, choice),) = wc.winograd_autotune_choices().items()
    assert key[:5] == (1, 128, 16, 16, 128) and choice in (0, 2, 4)
    want = wc._winograd(x, w, None, choice) if choice else F.conv2d(x, w, padding=1)
    assert torch.equal(got, want)


@pytest.mark.usefixtures("autotune")
def test_autotune_measurement_is_unseen_by_a_dispatch_mode():
    # a FLOP counter (mtlfast.models.summary) around the first call of a shape counts the call,
    # not the measurement's convolutions; the choice is measured and kept all the same
    x = torch.randn(1, 128, 16, 16)
    w = torch.randn(128, 128, 3, 3) / 30
    counter = FlopCounterMode(display=False, custom_mapping=wc._flop_formulas())
    with counter:
        got = winograd_conv3x3(x, w)
    assert counter.get_total_flops() == 2 * 16 * 16 * 128 * 128 * 9
    ((_key, choice),) = wc.winograd_autotune_choices().items()
    want = wc._winograd(x, w, None, choice) if choice else F.conv2d(x, w, padding=1)
    assert torch.equal(got, want)


@pytest.mark.usefixtures("autotune")
def test_autotune_takes_the_fixed_rule_on_fake_tensors(monkeypatch):
    monkeypatch.setattr(wc, "_measure", lambda *a: pytest.fail("measured fake tensors"))
    with FakeTensorMode():
        x = torch.empty(1, 128, 16, 16)
        w = torch.empty(128, 128, 3, 3)
        assert wc._tile_for(x, w) == 4
    assert wc.winograd_autotune_choices() == {}


def test_autotune_switch_checks_its_argument():
    with pytest.raises(TypeError, match="set_winograd_autotune: enabled must be a bool"):
        wc.set_winograd_autotune("yes")
    assert wc.set_winograd_autotune(wc.set_winograd_autotune(True)) is True


@pytest.mark.parametrize("tile", [4, 2])
def test_cpu_gradcheck(tile):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: wc._winograd(x, w, b, tile), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: wc._winograd(x, w, None, tile), (x, w))


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_cpu_small_tile_weight_transform_takes_any_weight_layout(layout):
    """F(2x2)'s weight transform and its adjoint are C++ kernels reading the weight's strides."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, 3, 3, dtype=torch.float64)
    w = (
        w.contiguous(memory_format=torch.channels_last)[:, :6]
        if layout == "channels_last"
        else w[:, ::2]
    )
    w.requires_grad_()
    got = wc._winograd(x, w, None, 2)
    want = F.conv2d(x, w, padding=1)
    _close(got, want, torch.float64)
    grad = torch.randn_like(want)
    for g, r in zip(
        torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(want, (x, w), grad)
    ):
        _close(g, r, torch.float64)


def test_tile_must_be_4_or_2():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"tile must be 4 \(F\(4x4, 3x3\)\) or 2"):
        wc._winograd(x, w, None, 3)


def test_cpu_opcheck():
    x = torch.randn(2, 3, 6, 5)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    for tile in (4, 2):
        torch.library.opcheck(
            torch.ops.mtlfast.winograd_conv3x3.default, (x.requires_grad_(), w, b, tile)
        )
        torch.library.opcheck(
            torch.ops.mtlfast.winograd_conv3x3.default,
            (x.contiguous(memory_format=torch.channels_last), w, None, tile),
        )


def test_cpu_large_layer_takes_winograd_path():
    """At 128 channels and 16x16 the public function runs the op (not F.conv2d): its output is
    within rounding of the convolution but not bitwise equal to it."""
    torch.manual_seed(0)
    x = torch.randn(2, 128, 16, 16)
    w = torch.randn(128, 128, 3, 3) / 30
    got, want = winograd_conv3x3(x, w), F.conv2d(x, w, padding=1)
    _close(got, want, torch.float32)
    assert not torch.equal(got, want)


@pytest.mark.parametrize(
    "case",
    ["few_channels", "small_map", "bfloat16", "float16", "reference_backend", "autocast"],
)
def test_falls_back_to_conv2d_exactly(case):
    torch.manual_seed(0)
    c, size, dtype = wc.MIN_CHANNELS, 16, torch.float32
    if case == "few_channels":
        c = wc.MIN_CHANNELS - 1
    elif case == "small_map":
        size = 8
    elif case in ("bfloat16", "float16"):
        dtype = getattr(torch, case)
    x = torch.randn(1, c, size, size).to(dtype)
    w = (torch.randn(c, c, 3, 3) / 30).to(dtype)
    if case == "reference_backend":
        with use_backend("reference"):
            got = winograd_conv3x3(x, w)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = winograd_conv3x3(x, w), F.conv2d(x, w, padding=1)
        assert torch.equal(got, want)
        return
    else:
        got = winograd_conv3x3(x, w)
    assert torch.equal(got, F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("winograd", [True, False])
def test_conv3x3_backward_matches_aten(winograd):
    torch.manual_seed(0)
    x = torch.randn(1, 128, 16, 16, dtype=torch.float64)
    w = torch.randn(128, 128, 3, 3, dtype=torch.float64) / 30
    grad = torch.randn(1, 128, 16, 16, dtype=torch.float64)
    gx, gw = wc.conv3x3_backward(grad, x, w, winograd=winograd)
    rx, rw, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    _close(gx, rx, torch.float64)
    _close(gw, rw, torch.float64)
    assert wc.conv3x3_backward(grad, x, w, need_input=False)[0] is None
    assert wc.conv3x3_backward(grad, x, w, need_weight=False)[1] is None


def test_bad_input_names_the_argument():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="x must be a 4-d"):
        winograd_conv3x3(x[0], torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, C_in=4, 3, 3\)"):
        winograd_conv3x3(x, torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \(C_out,\) = \(2,\)"):
        winograd_conv3x3(x, torch.randn(2, 4, 3, 3), torch.randn(3))


def test_cpu_kernel_checks_its_tiles():
    x = torch.randn(1, 4, 5, 5)

    def blocks(*shape, dtype=torch.float32):
        return torch.empty(36, *shape, dtype=dtype).unbind(0)

    with pytest.raises(RuntimeError, match="tiles must have shape"):
        torch.ops.mtlfast_C.winograd_input(x, 0, blocks(4, 3))
    with pytest.raises(RuntimeError, match=r"36 tensors \(F\(4x4, 3x3\)\) or 16"):
        torch.ops.mtlfast_C.winograd_input(x, 0, blocks(4, 4)[:35])
    with pytest.raises(RuntimeError, match="only F.2x2, 3x3.'s 16 blocks"):
        torch.ops.mtlfast_C.winograd_weight(torch.randn(2, 4, 3, 3), blocks(2, 4))
    with pytest.raises(RuntimeError, match=r"weight must be \(C_out, C_in, 3, 3\)"):
        torch.ops.mtlfast_C.winograd_weight(torch.randn(2, 4, 5, 5), blocks(2, 4)[:16])
    with pytest.raises(RuntimeError, match="tiles must have 2 rows"):
        torch.ops.mtlfast_C.winograd_weight(torch.randn(2, 4, 3, 3), blocks(1, 4)[:16])
    with pytest.raises(RuntimeError, match="at position 35"):  # every block the same Q
        torch.ops.mtlfast_C.winograd_input(x, 0, [*blocks(4, 4)[:35], torch.empty(3, 4)])
    with pytest.raises(RuntimeError, match="must be dense"):
        torch.ops.mtlfast_C.winograd_input(x, 0, torch.empty(36, 4, 8)[:, :, ::2].unbind(0))
    with pytest.raises(RuntimeError, match="are not within"):
        torch.ops.mtlfast_C.winograd_input(x, 2, blocks(4, 4))
    with pytest.raises(RuntimeError, match="whole rows"):
        torch.ops.mtlfast_C.winograd_input_t(blocks(1, 4), 1, torch.empty(1, 4, 5, 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.mtlfast_C.winograd_input(x.half(), 0, blocks(4, 4, dtype=torch.half))


@pytest.mark.parametrize("tile", [4, 2])
def test_cpu_double_backward_by_aten(tile):
    """A create_graph backward runs aten's convolution backward, which has a derivative."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: wc._winograd(x, w, b, tile), (x, w, b))


def test_cpu_ranges_of_blocks_apart_take_the_range_bound(monkeypatch):
    """oneDNN's path allocates a range's 36 blocks apart: its ranges follow _RANGE_BYTES; one
    torch.bmm tensor (fp64) follows the one-tensor bound _TENSOR_BYTES."""
    x = torch.zeros(2, 6, 10, 11)
    row = 36 * 6 * 3 * 4
    monkeypatch.setattr(wc, "_RANGE_BYTES", 6 * row)
    monkeypatch.setattr(wc, "_TENSOR_BYTES", row)
    assert wc._chunks(x, 6, batched=False) == [(0, 18)]
    assert len(wc._chunks(x, 6, batched=True)) == 6


# ---- dilated: the undilated op over the phases ---------------------------------------------------

# (N, C, H, W), dilation: maps the dilation divides, one it does not (34x33 padded to 34x34), a
# dilation of 3, channels-last
DILATED = [((2, 128, 32, 32), 2), ((1, 128, 34, 33), 2), ((1, 128, 48, 51), 3)]


@pytest.mark.parametrize("shape,d", DILATED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [False, True])
def test_dilated_takes_winograd_over_the_phases(shape, d, layout, bias):
    """Where the phase maps reach the fixed rule's 16x16, a dilated call runs the op over the
    phases: within rounding of aten's dilated convolution (not bitwise), gradients too, in x's
    memory format."""
    torch.manual_seed(0)
    x = make(shape, torch.float32, layout).requires_grad_()
    w = (torch.randn(128, shape[1], 3, 3) / 30).requires_grad_()
    b = torch.randn(128, requires_grad=True) if bias else None
    got = winograd_conv3x3(x, w, b, dilation=d)
    want = F.conv2d(x, w, b, padding=d, dilation=d)
    _close(got, want, torch.float32)
    assert not torch.equal(got, want)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(want)
    inputs = (x, w) + ((b,) if bias else ())
    for g, r in zip(
        torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)
    ):
        _close(g, r, torch.float32)


@pytest.mark.parametrize(
    "shape,d",
    [
        ((2, 128, 16, 16), 2),  # 8x8 phases: under the fixed rule's 16x16
        ((1, 128, 33, 30), 2),  # padded to 34x30: 17x15 phases, 255 pixels
        ((1, 128, 20, 20), 12),  # padded to 24x24: 1.44 times the pixels, but 2x2 phases
        ((1, 128, 17, 17), 16),  # padding to 32x32 would add more than half the pixels
        ((1, 127, 32, 32), 2),  # too few channels
    ],
)
def test_dilated_falls_back_to_dilated_conv2d_exactly(shape, d):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w = torch.randn(shape[1], shape[1], 3, 3) / 30
    got = winograd_conv3x3(x, w, dilation=d)
    assert torch.equal(got, F.conv2d(x, w, padding=d, dilation=d))


def test_dilated_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 128, 34, 33, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(128, 128, 3, 3, dtype=torch.float64) / 30).requires_grad_()
    assert wc._eligible(x, w, pixels=17 * 17)
    assert torch.autograd.gradcheck(
        lambda x, w: winograd_conv3x3(x, w, dilation=2), (x, w), fast_mode=True
    )


@pytest.mark.usefixtures("autotune")
@pytest.mark.parametrize("faster", [0, 4, 2])
def test_autotune_measures_the_phase_batch(monkeypatch, faster):
    """Under autotune the phase batch is measured (12x12 and 8x8 phases too, under the fixed
    rule's 16x16) and the algorithm measured fastest runs over the phases; 6x6 phases are never
    measured."""
    calls = []

    def measure(x, weight):
        calls.append(tuple(x.shape))
        return faster

    monkeypatch.setattr(wc, "_measure", measure)
    torch.manual_seed(0)
    x = torch.randn(1, 128, 24, 24, requires_grad=True)  # recorded: F(2x2) is taken too
    w = torch.randn(128, 128, 3, 3) / 30
    got = winograd_conv3x3(x, w, dilation=2)
    winograd_conv3x3(torch.randn(1, 128, 16, 16), w, dilation=2)
    winograd_conv3x3(torch.randn(1, 128, 12, 12), w, dilation=2)
    assert calls == [(4, 128, 12, 12), (4, 128, 8, 8)]
    want = F.conv2d(x, w, padding=2, dilation=2)
    _close(got, want, torch.float32)
    if faster:
        assert not torch.equal(got, want)


@pytest.mark.usefixtures("autotune")
@pytest.mark.parametrize("dilation", [1, 2])
def test_small_tiles_only_where_autograd_records(monkeypatch, dilation):
    """F(2x2) measured fastest runs where a backward follows; a call autograd does not record
    (inference, no input needing a gradient) takes F.conv2d, whose buffers are none."""
    monkeypatch.setattr(wc, "_measure", lambda x, weight: 2)
    tiles = []
    op = wc._winograd

    def spy(x, weight, bias, tile):
        tiles.append(tile)
        return op(x, weight, bias, tile)

    monkeypatch.setattr(wc, "_winograd", spy)
    torch.manual_seed(0)
    x = torch.randn(1, 128, 16 * dilation, 16 * dilation)
    w = (torch.randn(128, 128, 3, 3) / 30).requires_grad_()
    want = F.conv2d(x, w, padding=dilation, dilation=dilation)
    got = winograd_conv3x3(x, w, dilation=dilation)
    assert tiles == [2]
    _close(got, want, torch.float32)
    with torch.no_grad():
        inferred = winograd_conv3x3(x, w, dilation=dilation)
    frozen = winograd_conv3x3(x, w.detach(), dilation=dilation)
    assert tiles == [2]
    _close(inferred, want, torch.float32)
    assert torch.equal(inferred, frozen)
    if dilation == 1:  # conv3x3_backward follows the flag it is given: aten's unrecorded
        grad = torch.ones_like(want)
        _, gw = wc.conv3x3_backward(grad, x, w.detach(), recorded=False)
        _, aten, _ = torch.ops.aten.convolution_backward(
            grad, x, w.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
        )
        assert torch.equal(gw, aten)
        _, gw = wc.conv3x3_backward(grad, x, w.detach(), recorded=True)
        assert not torch.equal(gw, aten)
        _close(gw, aten, torch.float32)


def test_dilation_must_be_a_positive_int():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="dilation must be a positive int"):
            winograd_conv3x3(x, w, dilation=bad)


def test_cpu_backward_opcheck():
    """The backward op's real outputs have its fake kernel's strides (a contiguous weight
    gradient): torch.compile's backward graph checks them."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5)
    w = torch.randn(4, 3, 3, 3)
    grad = torch.randn(2, 4, 6, 5)
    for xs, g in ((x, grad), (x.contiguous(memory_format=torch.channels_last), grad)):
        for tile in (4, 2):
            torch.library.opcheck(
                torch.ops.mtlfast.winograd_conv3x3_backward.default, (g, xs, w, True, tile)
            )
    assert wc._backward_impl(grad, x, w, True, 4)[1].is_contiguous()
    assert wc._backward_impl(grad, x, w, True, 2)[1].is_contiguous()


def test_compiles_whole_with_its_backward():
    """torch.compile(fullgraph=True) of an undilated and a dilated call, forward and backward:
    the op runs in the graph (not bitwise aten's) and agrees with eager."""
    torch.manual_seed(0)
    x = torch.randn(1, 128, 32, 32, requires_grad=True)
    w = (torch.randn(128, 128, 3, 3) / 30).requires_grad_()

    def both(x, w):
        return winograd_conv3x3(x, w) + winograd_conv3x3(x, w, dilation=2)

    got = torch.compile(both, fullgraph=True)(x, w)
    want = both(x, w)
    aten = F.conv2d(x, w, padding=1) + F.conv2d(x, w, padding=2, dilation=2)
    assert not torch.equal(got, aten)
    _close(got, want, torch.float32)
    for g, r in zip(
        torch.autograd.grad(got.sum(), (x, w)), torch.autograd.grad(want.sum(), (x, w))
    ):
        _close(g, r, torch.float32)
