"""The polyphase split of mtlfast.ops._phases: strided slices as a batch, the inverse, layouts."""

from __future__ import annotations

import pytest
import torch

from mtlfast.ops._phases import from_phases, padded_phases, phase_fill, to_phases


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(
    "shape,d", [((2, 3, 6, 4), 2), ((1, 5, 9, 6), 3), ((2, 1, 4, 4), 2), ((1, 4, 1, 2), 1)]
)
def test_phases_are_the_strided_slices_and_invert(shape, d, fmt):
    t = torch.randn(shape).contiguous(memory_format=fmt)
    phases = to_phases(t, d)
    want = torch.stack(
        [t[b, :, i::d, j::d] for b in range(shape[0]) for i in range(d) for j in range(d)]
    )
    assert torch.equal(phases, want)
    assert phases.is_contiguous(memory_format=fmt)
    back = from_phases(phases, d)
    assert torch.equal(back, t) and back.is_contiguous(memory_format=fmt)


def test_fill_pads_to_a_multiple_while_that_adds_at_most_half():
    assert phase_fill(32, 32, 2) == (0, 0, 0, 0)
    assert phase_fill(33, 30, 2) == (0, 0, 0, 1)
    assert phase_fill(20, 20, 12) == (0, 4, 0, 4)  # 576 of 600 allowed pixels
    assert phase_fill(17, 17, 16) is None
    assert phase_fill(3, 5, 2) is None  # 24 pixels for 15
    t = torch.randn(1, 2, 5, 6)
    phases = padded_phases(t, 2, phase_fill(5, 6, 2))
    assert phases.shape == (4, 2, 3, 3)
    assert torch.equal(from_phases(phases, 2)[..., :5, :6], t)
