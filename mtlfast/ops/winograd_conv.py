"""``winograd_conv3x3``: a 3x3 'same' convolution (stride 1, padding 1) by Winograd's F(4x4, 3x3)
or F(2x2, 3x3).

Lavin & Gray (CVPR 2016): every 4x4 block of the output is computed from the 6x6 input tile
around it as ``A^T [(G g G^T) * (B^T d B)] A``, the products summed over input channels. Summed
over channels, the 36 element-wise products are 36 matrix products (tiles x C_in) @ (C_in x
C_out): 36 multiply-adds per 16 outputs per channel pair where the direct convolution takes 144,
a quarter of the arithmetic. The transforms (``B^T d B`` of every input tile, ``A^T m A`` of
every product tile, and their adjoints for the backward) are the C++ kernels of the ``cpu``
backend; the 36 matrix products of each direction, one per tile position, are oneDNN's (the
library behind ``F.conv2d`` on the CPU; one ``torch.bmm`` where torch lacks it, and in fp64). The
backward recomputes the input transform, so only x and the weight are saved, as for
``F.conv2d``. A ``create_graph`` backward (double backprop) takes aten's convolution backward,
which has a derivative.

It pays where the convolution is compute-bound and has channels for the matrix products to
fill. Forward and backward on a 2-core Xeon (AVX512, 2 threads, median of 7 alternating with
``F.conv2d``; ``benchmarks/bench_winograd_conv.py``): 256 -> 256 channels at (4, 256, 64, 64)
105 ms against oneDNN's 212 (0.50x), 512 -> 512 at 64x64 0.45x, at 32x32 0.53x, at 16x16
0.67x, 128 -> 128 at 128x128 0.69x and at 32x32 0.87x; but 64 -> 64 at 64x64 1.00x and
144 -> 144 at 8x8 1.46x, where the transforms' memory traffic outweighs the saved arithmetic.
So below :data:`MIN_CHANNELS` input or output channels, on maps under 16x16, for fp16/bf16
(oneDNN's own reduced-precision convolutions), off the CPU (cuDNN chooses its own algorithms),
under ``use_backend("reference")``, under CPU autocast and without the compiled extension, the
call is ``F.conv2d``. Where it pays between those bounds depends on the CPU: on a 2-core EPYC
(Zen 5, AVX512) 256 -> 256 at 64x64 took 0.58-0.63x of oneDNN's time, 512 -> 512 at 32x32
0.78-0.92x, but at 16x16 1.26-1.34x and 128 -> 128 at 32x32 1.6-1.7x (two runs); with the
longer ranges of :data:`_RANGE_BYTES` 0.48x, 0.69x, 1.26x and 1.21x (one run).
:func:`set_winograd_autotune` (the trainer's
``conv_algorithm: auto``) measures each shape on its first call instead of following the rule.

A dilated 'same' convolution (``dilation`` d, padding d) is the undilated one over its d x d
polyphase components as a batch (:mod:`mtlfast.ops._phases`): the bounds above hold for the
phase maps, H/d x W/d. UberNet's conv5 (512 -> 512, dilation 2) at 32x32, forward and backward
on a 2-core Zen 4 EPYC: 0.58x aten's dilated convolution's time; at 24x24 (12x12 phases, which
only :func:`set_winograd_autotune` measures) 0.70x; at 16x16 1.07x (8x8 phases, which only the
autotune measures, and where F(2x2, 3x3) wins: below).

F(2x2, 3x3) (``tile=2`` of the op; Lavin & Gray's other case): 2x2 output blocks from 4x4 input
tiles, 16 products per 4 outputs (2.25 times fewer multiply-adds than direct, where F(4x4) has 4),
but 16 weight tiles per kernel against 36, and its weight transform (halves only, exact in float)
and adjoint are C++ kernels too. On small maps with many channels, where F(4x4)'s 36 weight
tiles (36 MiB for 512 -> 512) outweigh its products, it wins: forward and backward on a 2-core
Zen 4 EPYC (2 threads, median of 7 alternating, channels-last), 512 -> 512 at (16, 512, 8, 8)
(ASTMT's layer4 at 256x256 as its 8x8 phases) 0.66x oneDNN's time where F(4x4) took 1.0x, at
(4, 512, 16, 16) 0.64x (F(4x4) 0.93x), 256 -> 256 at (4, 256, 16, 16) 0.75-1.04x (F(4x4)
1.06-1.37x); but 64 -> 64 at 64x64 1.13x and 128 -> 128 at 32x32 1.25x. Only
:func:`set_winograd_autotune`'s measurement takes it (the fixed rule is F(4x4)'s): it times both
transforms against ``F.conv2d`` on maps from 8x8 up.

Rounding: F(4x4, 3x3)'s transforms have entries up to 8 and -5, so the result differs from the
direct convolution by more than a reordering of the sums: about 1e-5 of the output's largest
magnitude in fp32 (measured 0.8-2.2e-5 on the benchmark's shapes), 1e-14 in fp64; F(2x2)'s
entries are 0, 1 and 1/2, and round less. Gradients are the exact adjoints of that computation
(``gradcheck`` in fp64).
"""

from __future__ import annotations

import functools
import time

import torch
from torch.nn import functional as F

from .. import _extension
from ._layout import memory_format_of as _format
from ._phases import from_phases, padded_phases, phase_fill
from .backends import current_backend

__all__ = ["MIN_CHANNELS", "set_winograd_autotune", "winograd_autotune_choices", "winograd_conv3x3"]

OP = "winograd_conv3x3"

#: Fewest input and output channels for which the Winograd path is taken (see the module docstring).
MIN_CHANNELS = 128

# Smallest map (H * W) for the Winograd path: at 8x8, 144 channels measured 1.2-1.5x oneDNN's time.
_MIN_PIXELS = 256

# Smallest map (or phase map of a dilated convolution) that set_winograd_autotune measures (the
# fixed rule takes _MIN_PIXELS): there F(2x2, 3x3) competes too, whose transforms and weight
# tiles cost less on small maps. Forward and backward, 2 threads, a Zen 4 EPYC, against oneDNN:
# 512 -> 512 at (16, 512, 8, 8) (ASTMT's layer4 as 8x8 phases) F(2x2) 0.68x, F(4x4) 1.03x; at
# (4, 512, 16, 16) 0.64x and 0.93x; at (4, 512, 8, 8) 0.90x and 2.8x; 256 -> 256 at
# (4, 256, 16, 16) 0.75-1.04x and 1.06-1.37x (runs differ); 128 -> 128 at 32x32 1.25x and 1.19x.
_AUTOTUNE_MIN_PIXELS = 64

# G of F(4x4, 3x3) (points 0, 1, -1, 2, -2, inf) and of F(2x2, 3x3) (0, 1, -1, inf), by the
# output tile's side
_G = {
    4: (
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
}


def _positions(tile: int) -> int:
    """Positions of the transformed tile of F(tile x tile, 3x3): (tile + 2)^2, 36 or 16."""
    return (tile + 2) ** 2


@functools.cache
def _gg(dtype: torch.dtype, tile: int = 4) -> torch.Tensor:
    """kron(G, G) (R^2, 9), R = tile + 2: the weight transform G g G^T of every 3x3 kernel as one
    matrix product."""
    g = torch.tensor(_G[tile], dtype=torch.float64)
    return torch.kron(g, g).to(dtype)


# One tensor of the op's buffers (a group's weight tiles; a range's tiles and products where one
# ``torch.bmm`` takes them) stays under glibc's 32 MiB ceiling for mapping a block afresh, 1 MiB
# spare for the allocator's alignment, so that glibc serves it from its heap, reused from one call
# to the next, rather than mapping (and the kernel zeroing) fresh pages on every call (see
# benchmarks/malloc_env.py): a (512, 512) kernel's 36 MiB of tiles in one tensor were mapped in
# afresh on every call, 10 ms of page faults on a (4, 512, 16, 16) convolution of 20.
_TENSOR_BYTES = 31 << 20

# Where oneDNN takes the products, a range's 36 blocks are allocated apart (each 1/36 of the
# range), so that ceiling does not bound it and the range is bounded by the op's transient memory
# alone: longer ranges are fewer, longer matrix products and fewer partial weight gradients to
# add. Forward and backward on a 2-core EPYC (Zen 5; 2 threads, median of 5 alternating): ranges
# of 64 MiB (with groups under 31 MiB) against 16 MiB (with groups under 16 MiB) took 0.68-0.78x
# the time of 256 -> 512 channels at 64x64 (PAD-Net's distillation), 0.84-0.88x of 512 -> 512 at
# 32x32, 0.86-0.94x of 128 -> 128 at 128x128 and 256 -> 256 at 64x64; 128 and 256 MiB gained at
# most 0.04 more.
_RANGE_BYTES = 64 << 20


def _chunks(x: torch.Tensor, channels: int, batched: bool, tile: int = 4) -> list[tuple[int, int]]:
    """(first, count) ranges of whole tile rows covering x's N * ceil(H/m) * ceil(W/m) tiles
    (m = ``tile``), each range's tiles of ``channels`` channels under :data:`_RANGE_BYTES`
    (under :data:`_TENSOR_BYTES` where they are one tensor, ``batched``)."""
    th, tw = -(-x.shape[2] // tile), -(-x.shape[3] // tile)
    rows = x.shape[0] * th
    row_bytes = _positions(tile) * channels * tw * x.element_size()
    bound = _TENSOR_BYTES if batched else _RANGE_BYTES
    pieces = max(1, min(rows, -(-rows * row_bytes // bound)))
    per = -(-rows // pieces)
    return [(r * tw, (min(rows, r + per) - r) * tw) for r in range(0, rows, per)]


def _blocks(like: torch.Tensor, count: int, c: int, batched: bool, tile: int = 4):
    """R^2 uninitialised (count, c) blocks of like's dtype, one per tile position (R = tile + 2):
    one (R^2, count, c) tensor for ``torch.bmm`` (batched), else a list of blocks allocated
    apart."""
    if batched:
        return like.new_empty((_positions(tile), count, c))
    return [like.new_empty((count, c)) for _ in range(_positions(tile))]


def _parts(blocks) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """The R^2 (count, c) blocks as the C++ transforms take them (their number tells the tile)."""
    return blocks.unbind(0) if isinstance(blocks, torch.Tensor) else blocks


def _groups(k: int, c: int, itemsize: int, tile: int = 4) -> list[tuple[int, int]]:
    """[a, b) ranges of output channels whose weight tiles (R^2, b - a, C_in), one tensor, stay
    under :data:`_TENSOR_BYTES`."""
    per = max(1, _TENSOR_BYTES // (_positions(tile) * c * itemsize))
    size = -(-k // -(-k // per))
    return [(a, min(k, a + size)) for a in range(0, k, size)]


def _weight_tiles(
    weight: torch.Tensor, groups: list[tuple[int, int]], tile: int = 4
) -> list[torch.Tensor]:
    """U (R^2, b - a, C_in) of every group of output channels: G g G^T of every (out, in)
    kernel, position-major."""
    k, c = weight.shape[:2]
    if tile == 2:  # exact in float (G's entries are halves): the C++ transform, any layout
        tiles = [weight.new_empty((16, b - a, c)) for a, b in groups]
        for (a, b), u in zip(groups, tiles):
            torch.ops.mtlfast_C.winograd_weight(weight[a:b], u.unbind(0))
        return tiles
    taps = weight.permute(2, 3, 0, 1).reshape(9, k * c)  # (9, C_out * C_in), tap-major
    gg = _gg(weight.dtype, tile)
    return [(gg @ taps[:, a * c : b * c]).view(-1, b - a, c) for a, b in groups]


def _tiles_by_group(weight: torch.Tensor, groups: list[tuple[int, int]], tile: int, made):
    """Each group's weight tiles in turn: ``made`` (F(4x4)'s, all made at once: its transform is
    one product over every kernel), or, None, F(2x2)'s made group by group (the caller drops
    each before taking the next), so that the backward frees them before it makes the weight
    gradient's: ASTMT's step with every stage recomputed peaked at 283 MiB with F(2x2) over
    layer4's phases (291 with its tiles kept through the backward, 277 without F(2x2)). Groups
    smaller than :data:`_TENSOR_BYTES` would hold less, but read the transformed input once per
    group: 512 -> 512 at (16, 512, 8, 8) in 4 groups took 1.5x the time of one (forward and
    backward, 2 threads, median of 9)."""
    if made is not None:
        yield from made
        return
    for a, b in groups:
        yield _weight_tiles(weight[a:b], [(0, b - a)], tile)[0]


def _weight_grad(grad_tiles: list[torch.Tensor], c: int) -> torch.Tensor:
    """F(4x4)'s weight gradient (C_out, C_in, 3, 3), contiguous, from the gradients at every
    group's weight tiles (36, b - a, C_in): G^T dU G (the adjoint of :func:`_weight_tiles`)."""
    # G^T-transformed back to taps as (out, in) rows of 9: contiguous, as the fake kernel says
    # (a tap-major result permuted had other strides, which torch.compile's backward rejected)
    gg = _gg(grad_tiles[0].dtype, 4)
    return torch.cat([(du.view(36, -1).t() @ gg).view(-1, c, 3, 3) for du in grad_tiles])


def _out_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty(
        (n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=_format(x)
    )


def _require_extension() -> None:
    if not _extension.has_extension():
        raise RuntimeError(
            f"{OP}: the compiled extension mtlfast._C is missing ({_extension.extension_error()})"
        )


@functools.cache
def _onednn_linear() -> bool:
    """Whether oneDNN's fp32 matrix product (inductor's ``mkldnn::_linear_pointwise``, private to
    torch) is here and answers as this module calls it: a tiny product, checked once."""
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        a, b = torch.ones(2, 3), torch.ones(4, 3)
        return torch.equal(_linear(a, b), torch.full((2, 4), 3.0))
    except (RuntimeError, TypeError):  # a torch whose op changed: bmm, not an error mid-training
        return False


def _batched(dtype: torch.dtype) -> bool:
    """Whether the products are one ``torch.bmm`` over the 36 positions (MKL's sgemm: in fp64 and
    where torch lacks oneDNN), not one oneDNN matrix product per position.

    On a 2-core EPYC (Zen 5, AVX512) MKL ran the products at 100-180 GFLOP/s where oneDNN, which
    picks its kernels by instruction set rather than by vendor, ran 250-410
    (``benchmarks/results/README.md``)."""
    return dtype != torch.float32 or not _onednn_linear()


def _linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T by oneDNN, a (M, K) and b (N, K) of any strides: a new dense (M, N) tensor."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _check_tile(tile: int) -> None:
    if tile not in _G:
        raise ValueError(f"{OP}: tile must be 4 (F(4x4, 3x3)) or 2 (F(2x2, 3x3)), got {tile!r}")


def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int = 4
) -> torch.Tensor:
    _require_extension()
    _check_tile(tile)
    c, k = x.shape[1], weight.shape[0]
    if x.numel() == 0 or k == 0:  # nothing to transform: aten's empty or bias-only result
        return F.conv2d(x, weight, bias, padding=1).contiguous(memory_format=_format(x))
    groups = _groups(k, c, x.element_size(), tile)
    made = _weight_tiles(weight, groups, tile) if tile == 4 else None
    bias = None if bias is None else bias.contiguous()
    out = _out_like(x, k)
    batched = _batched(x.dtype)
    for first, count in _chunks(x, max(c, max(b - a for a, b in groups)), batched, tile):
        tiles = _blocks(x, count, c, batched, tile)
        torch.ops.mtlfast_C.winograd_input(x, first, _parts(tiles))
        for (a, b), u in zip(groups, _tiles_by_group(weight, groups, tile, made)):
            if batched:
                products = torch.bmm(tiles, u.transpose(1, 2))
            else:
                products = [_linear(t, u_ij) for t, u_ij in zip(tiles, u)]
            del u
            part = None if bias is None else bias[a:b]
            torch.ops.mtlfast_C.winograd_output(_parts(products), first, part, out[:, a:b])
            del products
        del tiles
    return out


_winograd = torch.library.custom_op(
    "mtlfast::winograd_conv3x3", _forward, mutates_args=(), device_types="cpu"
)


@_winograd.register_fake
def _(x, weight, bias, tile=4):
    return _out_like(x, weight.shape[0])


def _backward_impl(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, tile: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_extension()
    _check_tile(tile)
    k, c = weight.shape[:2]
    if x.numel() == 0 or k == 0:
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, weight, [k], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, has_bias]
        )
        grad_x = grad_x.contiguous(memory_format=_format(x))
        return grad_x, grad_weight, grad_bias if has_bias else grad.new_empty((0,))
    groups = _groups(k, c, x.element_size(), tile)
    small = tile == 2
    made = None if small else _weight_tiles(weight, groups, tile)
    grad_x = _out_like(x, c).zero_()
    batched = _batched(x.dtype)
    # F(2x2) by oneDNN: each group's gradient blocks are the first range's products (see below)
    blocks = small and not batched
    if blocks:
        grad_weight_tiles = [None] * len(groups)
    else:
        grad_weight_tiles = [x.new_zeros((_positions(tile), b - a, c)) for a, b in groups]
    # F(2x2)'s weight gradient is made group by group from the last range (G^T dU G in C++)
    grad_weight = weight.new_empty((k, c, 3, 3)) if small else None
    ranges = _chunks(x, max(c, k), batched, tile)
    for r, (first, count) in enumerate(ranges):
        grad_tiles, input_tiles = [], None  # the latter: the gradient at the transformed input
        for (a, b), u in zip(groups, _tiles_by_group(weight, groups, tile, made)):
            g = _blocks(grad, count, b - a, batched, tile)
            torch.ops.mtlfast_C.winograd_output_t(grad[:, a:b], first, _parts(g))
            if batched:
                input_tiles = torch.bmm(g, u) if input_tiles is None else input_tiles.baddbmm_(g, u)
            else:
                part = [_linear(g_ij, u_ij.t()) for g_ij, u_ij in zip(g, u)]
                input_tiles = (
                    part if input_tiles is None else [t.add_(q) for t, q in zip(input_tiles, part)]
                )
                del part
            del u
            grad_tiles.append(g)
        torch.ops.mtlfast_C.winograd_input_t(_parts(input_tiles), first, grad_x)
        # the forward's transformed input, recomputed into the buffers just used
        torch.ops.mtlfast_C.winograd_input(x, first, _parts(input_tiles))
        for n, (a, b) in enumerate(groups):
            g, du, grad_tiles[n] = grad_tiles[n], grad_weight_tiles[n], None
            if batched:
                du.baddbmm_(g.transpose(1, 2), input_tiles)
            elif blocks:  # torch.mm reads the transposed g_ij in place (F(2x2)'s (256, 512)
                # blocks of (16, 512, 8, 8): 11.9 against 13.6 ms for oneDNN's 16, a Zen 4 EPYC)
                if du is None:
                    du = [torch.mm(g_ij.t(), t) for g_ij, t in zip(g, input_tiles)]
                else:
                    for g_ij, t, du_ij in zip(g, input_tiles, du):
                        du_ij.addmm_(g_ij.t(), t)
            else:  # oneDNN copies the transposed g_ij: still faster than MKL's products here
                for g_ij, t, du_ij in zip(g, input_tiles, du):
                    du_ij.add_(_linear(g_ij.t(), t.t()))
            del g
            if small and r == len(ranges) - 1:
                torch.ops.mtlfast_C.winograd_weight_t(_parts(du), grad_weight[a:b])
                du = None
            grad_weight_tiles[n] = du
            del du
        del grad_tiles, input_tiles
    if not small:
        grad_weight = _weight_grad(grad_weight_tiles, c)
    grad_bias = grad.sum((0, 2, 3)) if has_bias else grad.new_empty((0,))
    return grad_x, grad_weight, grad_bias


_winograd_backward = torch.library.custom_op(
    "mtlfast::winograd_conv3x3_backward", _backward_impl, mutates_args=(), device_types="cpu"
)


@_winograd_backward.register_fake
def _(grad, x, weight, has_bias, tile=4):
    return (
        _out_like(x, x.shape[1]),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        grad.new_empty((weight.shape[0],) if has_bias else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, tile = inputs
    ctx.has_bias, ctx.tile = bias is not None, tile
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: aten's backward, which has a derivative
        need = list(ctx.needs_input_grad[:2]) + [ctx.has_bias]
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, need
        ) + (None,)
    grad_x, grad_weight, grad_bias = _winograd_backward(
        grad.contiguous(), x, weight, ctx.has_bias, ctx.tile
    )
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None


_winograd.register_autograd(_backward, setup_context=_setup_context)


def _direct_flops(x_shape, w_shape) -> int:
    """FLOPs of the direct 3x3 'same' convolution that the op computes (2 per multiply-add)."""
    n, c, h, w = x_shape
    return 2 * n * h * w * c * w_shape[0] * 9


def _flop_formulas() -> dict:
    """``FlopCounterMode(custom_mapping=...)`` entries for the op and its backward: the direct
    convolution's FLOPs, as a convolution is counted whatever its algorithm (cuDNN's Winograd
    alike). A dispatch mode sees the custom op whole and counts nothing of what it calls, so
    without these :func:`mtlfast.models.summary` would lose every convolution that
    :func:`mtlfast.nn.use_winograd` (the trainer's default ``conv_algorithm``) switched over."""

    def forward(x_shape, w_shape, _bias, _tile=4, out_shape=None, **kwargs) -> int:
        return _direct_flops(x_shape, w_shape)

    def backward(_grad, x_shape, w_shape, _has_bias, _tile=4, out_shape=None, **kwargs) -> int:
        return 2 * _direct_flops(x_shape, w_shape)  # the input's and the weight's gradients

    return {
        torch.ops.mtlfast.winograd_conv3x3: forward,
        torch.ops.mtlfast.winograd_conv3x3_backward: backward,
    }


def set_winograd_autotune(enabled: bool) -> bool:
    """Choose between Winograd and ``F.conv2d`` by measuring, per convolution shape (process-wide,
    like ``torch.backends.cudnn.benchmark``); returns the previous setting.

    Off (the default), every eligible convolution (see the module docstring) takes the Winograd
    path. On, the first eligible call of each shape (batch, channels, map, dtype, memory format,
    thread count; maps from 8x8 up) times one forward and backward of ``F.conv2d``, F(4x4, 3x3)
    and F(2x2, 3x3) on its own tensors, a few repetitions alternating, and the shape takes the
    faster Winograd transform only where it ran in under :data:`_AUTOTUNE_MARGIN` of oneDNN's
    time (F(2x2) for calls autograd records only: :func:`_tile_for`); later calls reuse that
    choice. Which algorithm wins at a shape depends on the CPU: on a 2-core Xeon (AVX512, AMX) 512 -> 512 channels at
    16x16 took 0.67x of oneDNN's time, on a 2-core EPYC (AVX512) 1.24x. The measurement costs a
    few convolutions per shape once, and makes the choice (so results, to about 1e-5) depend on
    the timing: the trainer turns it on for ``train.conv_algorithm: auto`` unless
    ``train.deterministic``. Never under ``torch.compile`` (the fixed rule applies).
    """
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"set_winograd_autotune: enabled must be a bool, got {enabled!r}")
    previous, _autotune = _autotune, enabled
    return previous


def winograd_autotune_choices() -> dict[tuple, int]:
    """The shapes measured so far by :func:`set_winograd_autotune`'s measurement and the algorithm
    each takes: ``{(N, C_in, H, W, C_out, dtype, memory_format, threads): tile}``, tile 4 for
    F(4x4, 3x3), 2 for F(2x2, 3x3), 0 for ``F.conv2d`` (a copy; a dilated convolution's shape is
    its phase batch's, (N*d*d, C_in, H/d, W/d))."""
    return dict(_choices)


_autotune = False
_choices: dict[tuple, int] = {}
# Winograd's result is rounded differently (about 1e-5): in a near tie the direct one is kept
_AUTOTUNE_MARGIN = 0.95
# Timed calls of each algorithm: with 2, a slow phase of this host (seconds long, hitting the
# memory-bound transforms harder) once left UberNet's 128 -> 128 at 128x128 on F.conv2d, which it
# beats by 0.6x when measured alone
_AUTOTUNE_REPEATS = 4


def _measured_choice(x: torch.Tensor, weight: torch.Tensor) -> int:
    key = (*x.shape, weight.shape[0], x.dtype, _format(x), torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        from torch._subclasses.fake_tensor import is_fake
        from torch.utils._python_dispatch import _disable_current_modes

        if is_fake(x) or is_fake(weight):  # tracing: nothing to time, the fixed rule holds
            return _fixed_tile(x)
        # The measurement is no part of the model's computation: a dispatch mode around the
        # call (FlopCounterMode in mtlfast.models.summary, a profiler's, selective
        # checkpointing's) must see neither its convolutions nor its own overhead in the timing
        with _disable_current_modes():
            choice = _choices[key] = _measure(x.detach(), weight.detach())
    return choice


def _measure(x: torch.Tensor, weight: torch.Tensor) -> int:
    """One forward and backward of each algorithm (``F.conv2d``, F(4x4, 3x3), F(2x2, 3x3)),
    alternating, after one untimed call of each: the tile of the Winograd transform whose best
    time is the lower, where it is under the margin times oneDNN's best; else 0."""

    def direct():
        out = F.conv2d(x, weight, padding=1)
        torch.ops.aten.convolution_backward(
            out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
        )

    def winograd(tile):
        out = _forward(x, weight, None, tile)
        _backward_impl(out, x, weight, False, tile)

    algorithms = {0: direct, 4: lambda: winograd(4), 2: lambda: winograd(2)}
    best = dict.fromkeys(algorithms, float("inf"))
    with torch.no_grad(), torch.autograd.profiler.record_function("winograd_autotune"):
        for fn in algorithms.values():
            fn()
        for _ in range(_AUTOTUNE_REPEATS):
            for tile, fn in algorithms.items():
                start = time.perf_counter()
                fn()
                best[tile] = min(best[tile], time.perf_counter() - start)
    tile = min((4, 2), key=best.__getitem__)
    return tile if best[tile] < _AUTOTUNE_MARGIN * best[0] else 0


def _fixed_tile(x: torch.Tensor) -> int:
    """The fixed rule, for an eligible x: F(4x4, 3x3) on maps of :data:`_MIN_PIXELS` or more
    (F(2x2, 3x3), which wins on some CPUs and shapes but not others, only where measured)."""
    return 4 if x.shape[2] * x.shape[3] >= _MIN_PIXELS else 0


def _records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` now, so that a backward may follow."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _tile_for(
    x: torch.Tensor, weight: torch.Tensor, min_pixels: int | None = None, recorded: bool = True
) -> int:
    """How ``winograd_conv3x3(x, weight)`` (undilated) runs: the Winograd tile (4 or 2), or 0
    for ``F.conv2d``. Under autotune, maps of ``min_pixels`` or more (default
    :data:`_AUTOTUNE_MIN_PIXELS`) are measured; else the fixed rule.

    F(2x2, 3x3) is taken for a call autograd records (``recorded``) only: it was measured
    forward and backward, and a forward alone, as in inference, gains little from it (a third
    of a convolution's time) while its buffers (16 weight tiles, 16 transformed input tiles)
    come on top of small maps' activations: ASTMT's inference at 256x256 peaked at 111 MiB with
    it over layer4's phases, 88 without."""
    tuned = _autotune and not torch.compiler.is_compiling()
    if min_pixels is None:
        min_pixels = _AUTOTUNE_MIN_PIXELS if tuned else _MIN_PIXELS
    if not _eligible(x, weight, min_pixels):
        return 0
    tile = _measured_choice(x, weight) if tuned else _fixed_tile(x)
    return 0 if tile == 2 and not recorded else tile


def _eligible(
    x: torch.Tensor, weight: torch.Tensor, min_pixels: int = _MIN_PIXELS, pixels: int | None = None
) -> bool:
    """Whether the Winograd path may take x (its map, or ``pixels`` for a dilated x's phases)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and weight.device == x.device
        # dynamo cannot read the backend's context variable; a compiled graph takes the op
        and (torch.compiler.is_compiling() or current_backend() != "reference")
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
        and (x.shape[2] * x.shape[3] if pixels is None else pixels) >= min_pixels
        and x.shape[0] > 0
        and _extension.has_extension()
        and not torch.is_autocast_enabled("cpu")
    )


def winograd_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, dilation: int = 1
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)`` for 3x3 kernels, by
    Winograd F(4x4, 3x3) on CPU (or, where :func:`set_winograd_autotune` measured it faster,
    F(2x2, 3x3)).

    A dilated one (``dilation`` d > 1) runs as the undilated convolution over its d x d phases
    as a batch (each phase map H/d x W/d; a map d does not divide is padded to a multiple first,
    while that adds at most half its pixels): the same products and sums. Falls back to
    ``F.conv2d`` where the Winograd path does not pay or cannot run (see the module docstring;
    the map bounds hold for the phase maps); the output has x's memory format either way.

    Shapes: x (N, C_in, H, W); weight (C_out, C_in, 3, 3); bias (C_out,) or None;
    output (N, C_out, H, W).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{OP}: x must be a 4-d tensor (N, C_in, H, W), got {got}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (weight.shape[0], x.shape[1], 3, 3):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"{OP}: weight must have shape (C_out, C_in={x.shape[1]}, 3, 3), got {got}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{OP}: bias must have shape (C_out,) = ({weight.shape[0]},), got {got}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{OP}: dilation must be a positive int, got {dilation!r}")
    return conv3x3(x, weight, bias, dilation, _records(x, weight, bias))


def conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int,
    recorded: bool,
) -> torch.Tensor:
    """:func:`winograd_conv3x3` on checked arguments, for callers inside their own autograd
    function (where autograd records nothing): ``recorded`` says whether a backward will follow
    (:func:`_tile_for`), as their backward then assumes."""
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)
    if dilation > 1:
        return _dilated(x, weight, bias, dilation, recorded)
    tile = _tile_for(x, weight, recorded=recorded)
    if not tile:
        return F.conv2d(x, weight, bias, padding=1)
    return _winograd(x, weight, bias, tile)


def _dilated(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d: int, recorded: bool
):
    """winograd_conv3x3 with dilation d > 1 (see :func:`_dilated_phases`)."""
    plan = _dilated_phases(x, weight, d, recorded)
    if plan is None:
        return F.conv2d(x, weight, bias, padding=d, dilation=d)
    phases, tile = plan
    if tile:
        out = _winograd(phases, weight, bias, tile)
    else:
        out = F.conv2d(phases, weight, bias, padding=1)
    h, w = x.shape[-2:]
    return from_phases(out, d)[..., :h, :w].contiguous(memory_format=_format(x))


def _dilated_phases(
    x: torch.Tensor, weight: torch.Tensor, d: int, recorded: bool = True
) -> tuple[torch.Tensor, int] | None:
    """How a 3x3 'same' convolution of x with dilation d > 1 runs: None, aten's dilated
    convolution; else (x's phases, padded as :func:`phase_fill` says; the Winograd tile that
    takes them, by the fixed rule or, under autotune, the phase batch's measurement, 0 for
    none; ``recorded`` as for :func:`_tile_for`). Where Winograd does not win a measured phase
    batch, F.conv2d over the phases runs,
    which is what the measurement timed (and aten's dilated weight gradient takes a large buffer
    besides: :mod:`mtlfast.nn.adapters`)."""
    h, w = x.shape[-2:]
    fill = phase_fill(h, w, d)
    if fill is None:
        return None
    tuned = _autotune and not torch.compiler.is_compiling()
    min_pixels = _AUTOTUNE_MIN_PIXELS if tuned else _MIN_PIXELS
    if not _eligible(x, weight, min_pixels, (h + fill[3]) * (w + fill[1]) // (d * d)):
        return None
    phases = padded_phases(x, d, fill)
    return phases, _tile_for(phases, weight, min_pixels, recorded)


def conv3x3_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    need_input: bool = True,
    need_weight: bool = True,
    *,
    winograd: bool = True,
    recorded: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The input and weight gradients of ``conv3x3(x, weight, None, 1, recorded)`` (no bias)
    given ``grad`` at its output, by the path that forward takes (``winograd=False``: that of
    ``F.conv2d``), for callers with their own autograd function that recompute the forward:
    the distillation's, whose forward is a plain call inside its function (``recorded`` False,
    no F(2x2)), and the residual adapters', which tell their forward a backward follows.
    Unneeded gradients are returned as None.

    Shapes: grad (N, C_out, H, W); x (N, C_in, H, W); weight (C_out, C_in, 3, 3).
    """
    tile = _tile_for(x, weight, recorded=recorded) if winograd and grad.dtype == x.dtype else 0
    if tile:
        grad_x, grad_weight, _ = _winograd_backward(grad.contiguous(), x, weight, False, tile)
    else:
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            stride=[1, 1],
            padding=[1, 1],
            dilation=[1, 1],
            transposed=False,
            output_padding=[0, 0],
            groups=1,
            output_mask=[need_input, need_weight, False],
        )
    return (grad_x if need_input else None), (grad_weight if need_weight else None)
