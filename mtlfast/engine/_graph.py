"""Autograd-graph queries used to check heads before any gradient is accumulated."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["reaches"]


def reaches(roots: Iterable[torch.Tensor], targets: Iterable[torch.Tensor]) -> bool:
    """Whether any root tensor's autograd graph contains the node that produced any target tensor.

    Targets must be non-leaf tensors (e.g. a view or an index of a leaf), so that each has its own
    node; the walk stops there and never enters the graph above them. It visits each node of the
    head's graph at most once, in Python, without running any backward.

    Shapes: any tensors.
    """
    wanted = {id(t.grad_fn): t.grad_fn for t in targets if t.grad_fn is not None}
    if not wanted:
        return False
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    # Node objects are kept alive while walking: a freed wrapper's id could be reused by another
    # node's (a missed path), and a live wrapper is the one torch hands out again for its node.
    seen: dict[int, object] = {}
    while stack:
        node = stack.pop()
        key = id(node)
        if key in wanted:
            return True
        if key in seen:
            continue
        seen[key] = node
        # reversed: a module's data input is usually its first edge, so it is explored first
        stack.extend(n for n, _ in reversed(node.next_functions) if n is not None)
    return False
