"""Recompute mode frees each branch before the next one runs: memory does not grow with tasks."""

import weakref

import pytest
import torch
from torch import nn

from mtlfast.engine import multi_branch_step

from .models import H, Head, N, conv_trunk, loss_fns_for, targets_for


class _Box:
    """What autograd keeps of a saved tensor while the graph lives (weakref-able)."""

    def __init__(self, t):
        self.t = t


class Spy(nn.Module):
    """A head that records weak references to its activations, its output and what autograd saves,
    and, when it runs, how many of the earlier heads' are still alive."""

    def __init__(self, out, log):
        super().__init__()
        self.head, self.log = Head(out), log

    def forward(self, x):
        self.log["alive_at_start"].append(sum(r() is not None for r in self.log["refs"]))
        h = self.head.a(x)
        out = self.head.b(torch.relu(h))
        self.log["refs"] += [weakref.ref(h), weakref.ref(out)]
        return out


@pytest.mark.parametrize(
    "strategy,segments", [("naive", None), ("recompute", None), ("recompute", 1)]
)
def test_branch_is_freed_before_the_next_runs(strategy, segments):
    outs = {"seg": 3, "depth": 1, "normals": 3}
    log = {"refs": [], "alive_at_start": []}
    trunk = conv_trunk(4)
    heads = nn.ModuleDict({t: Spy(o, log) for t, o in outs.items()})
    targets = {t: v.float() if v.is_floating_point() else v for t, v in targets_for(outs).items()}

    def pack(t):
        box = _Box(t)
        log["refs"].append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        multi_branch_step(
            trunk,
            heads,
            torch.randn(N, 3, H, H),
            targets,
            loss_fns_for(outs),
            strategy=strategy,
            segments=segments,
        )
    if strategy == "recompute":
        # nothing of branches 1 and 2 (activations, predictions, saved tensors, loss graphs) is
        # alive when branch 2 (3) starts: only what the trunk's forward saved, which is the kept
        # last segment's graph with two segments and nothing with one (all recomputed)
        alive = log["alive_at_start"]
        assert alive == [alive[0]] * 3
        assert (alive[0] == 0) == (segments == 1)
    else:
        # control: plain autograd keeps the trunk and every branch alive until the single backward
        first, second, third = log["alive_at_start"]
        assert 0 < first < second < third
