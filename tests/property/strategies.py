"""Hypothesis strategies shared by the property tests: tensors in every layout, with special values.

Values come from a seeded generator, not element by element from hypothesis (which would be slow
and shrink poorly); hypothesis chooses the shape, dtype, layout, seed and which elements are set
to specials (inf, -inf, nan, -0.0).
"""

from __future__ import annotations

import math
import re

import torch
from hypothesis import strategies as st

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: rtol/atol of a backend against the reference, per dtype (the ops' own test tolerances)
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float64: (1e-9, 1e-9),
}
SPECIALS = (math.inf, -math.inf, math.nan, -0.0)
#: layouts a tensor of rank >= 2 can come in; channels_last only for rank 4
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")


def layout_of(shape: tuple[int, ...], draw_layout: str) -> str:
    if draw_layout == "channels_last" and len(shape) != 4:
        return "contiguous"
    if draw_layout == "expanded" and (not shape or shape[0] < 1):
        return "contiguous"
    return draw_layout


def make(shape, dtype, layout, seed, scale=1.0, specials=()):
    """A tensor of ``shape`` and ``dtype`` stored as ``layout``, values N(0, scale) from ``seed``,
    with ``specials`` ((flat position, value), positions taken modulo the size) written in.

    Expanded tensors repeat their first row (stride 0 along dim 0): specials land in every row.
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    layout = layout_of(shape, layout)
    base_shape = (1, *shape[1:]) if layout == "expanded" else shape
    values = torch.randn(base_shape, generator=g, dtype=torch.float64) * scale
    flat = values.view(-1)
    for pos, v in specials:
        if flat.numel():
            flat[pos % flat.numel()] = v
    values = values.to(dtype)
    if layout == "contiguous":
        return values
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        # stored with the last two dims swapped: non-contiguous, dense
        if len(shape) < 2:
            return values
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        # every other element of a twice-as-wide last dim
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype) if shape else values
        if shape:
            wide[..., ::2] = values
            return wide[..., ::2]
        return values
    if layout == "expanded":
        return values.expand(shape)
    raise ValueError(layout)


@st.composite
def specials(draw, max_count=3):
    """A few (position, special value) pairs, often none."""
    n = draw(st.integers(0, max_count))
    return [(draw(st.integers(0, 10_000)), draw(st.sampled_from(SPECIALS))) for _ in range(n)]


def names_argument(message: str, names) -> bool:
    """Whether ``message`` names one of ``names`` as a word (``x`` in "x must", not in "max")."""
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", message) for n in names)


def assert_agree(got: torch.Tensor, expected: torch.Tensor, what: str, exact_specials=True) -> None:
    """Same shape and dtype, NaN and +-inf where ``expected`` has them, close elsewhere.

    ``exact_specials=False``: only the non-finite positions must match (NaN or +-inf either).
    """
    assert got.shape == expected.shape, (
        f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    )
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    g, e = got.detach().double(), expected.detach().double()
    fin_g, fin_e = g.isfinite(), e.isfinite()
    assert torch.equal(fin_g, fin_e), (
        f"{what}: non-finite at {int((fin_g ^ fin_e).sum())} differing positions"
    )
    if exact_specials:
        nan_g, nan_e = g.isnan(), e.isnan()
        assert torch.equal(nan_g, nan_e), (
            f"{what}: NaN at {int((nan_g ^ nan_e).sum())} differing positions"
        )
        inf_g = g.isinf()
        assert torch.equal(g[inf_g], e[inf_g]), f"{what}: infinities of different signs"
    finite = fin_e
    rtol, atol = TOL[expected.dtype]
    # a value near an overflow or far from 1 keeps its relative tolerance
    torch.testing.assert_close(
        g[finite], e[finite], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )
