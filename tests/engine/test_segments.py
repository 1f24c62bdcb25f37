"""Trunk segmentation: sqrt(L) anchors by default, any count from 1 to L, recomputed last first."""

import itertools

import pytest
import torch
from torch import nn

from mtlfast.engine import multi_branch_step, split_segments

from .models import H, Head, N, assert_same_grads, conv_trunk, loss_fns_for, run_both, targets_for

OUTS = {"seg": 3, "depth": 1}


def test_split_segments():
    assert split_segments(9) == [(0, 3), (3, 6), (6, 9)]
    assert split_segments(1) == [(0, 1)]
    assert split_segments(2) == [(0, 2)]  # round(sqrt(2)) = 1
    assert split_segments(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_segments(5, 5) == [(i, i + 1) for i in range(5)]
    for n in range(1, 30):
        bounds = split_segments(n)
        assert len(bounds) == max(1, round(n**0.5))
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("segments", [0, 10, -1])
def test_split_segments_out_of_range(segments):
    with pytest.raises(ValueError, match=r"segments must be in \[1, 9\]"):
        split_segments(9, segments)


@pytest.mark.parametrize(
    "segments,recomputed",
    [
        (
            None,
            [3, 4, 5, 0, 1, 2],
        ),  # three segments: the last one's graph is kept, the others redone last first
        (1, list(range(9))),  # one segment: everything recomputed from the images
    ],
)
def test_recomputation_order_of_a_nine_module_trunk(segments, recomputed):
    trunk = conv_trunk(9)
    heads = nn.ModuleDict({"depth": Head(1)})
    calls = []
    for i, m in enumerate(trunk):
        m.register_forward_hook(lambda m, args, out, i=i: calls.append(i))
    multi_branch_step(
        trunk,
        heads,
        torch.randn(N, 3, H, H),
        {"depth": torch.randn(N, 1, H, H)},
        loss_fns_for({"depth": 1}),
        segments=segments,
    )
    assert calls == [*range(9), *recomputed]


@pytest.mark.parametrize("segments", [1, 2, 7], ids=["one", "two", "L"])
def test_segment_counts_give_naive_gradients(segments):
    trunk = conv_trunk(7).double()
    heads = nn.ModuleDict({t: Head(o) for t, o in OUTS.items()}).double()
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for(OUTS),
        loss_fns_for(OUTS),
        segments=segments,
    )
    assert_same_grads(out, rtol=1e-10, atol=1e-12)


def test_module_list_trunk():
    trunk = nn.ModuleList(conv_trunk(4)).double()
    heads = nn.ModuleDict({"depth": Head(1)}).double()
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for({"depth": 1}),
        loss_fns_for({"depth": 1}),
    )
    assert_same_grads(out, rtol=1e-10, atol=1e-12)
