"""The trunk as a chain of modules: split into segments, run keeping one anchor per segment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._replay import SegmentReplay, device_types_of, no_autocast

__all__ = ["CheckpointedTrunk", "run_modules", "split_segments", "trunk_modules"]


def split_segments(num_modules: int, segments: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` module ranges cutting a trunk of ``num_modules`` into segments.

    ``segments`` defaults to ``round(sqrt(num_modules))``, at least 1 (UberNet Sec. 4 after
    Chen et al.: sqrt(L) anchors, each segment sqrt(L) long). Sizes differ by at most one, the
    first segments taking the remainder.

    Shapes: num_modules L >= 1; segments S in [1, L]; returns S pairs covering 0..L in order.
    """
    if isinstance(num_modules, bool) or not isinstance(num_modules, int):
        raise TypeError(f"num_modules must be an int, got {type(num_modules).__name__}")
    if num_modules < 1:
        raise ValueError(f"the trunk needs at least one module, got {num_modules}")
    if segments is None:
        segments = max(1, round(math.sqrt(num_modules)))
    elif isinstance(segments, bool) or not isinstance(segments, int):
        raise TypeError(f"segments must be an int or None, got {type(segments).__name__}")
    if not 1 <= segments <= num_modules:
        raise ValueError(
            f"segments must be in [1, {num_modules}] for a trunk of {num_modules} modules, got {segments}"
        )
    base, extra = divmod(num_modules, segments)
    bounds, start = [], 0
    for s in range(segments):
        stop = start + base + (1 if s < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def trunk_modules(trunk: Any) -> list[nn.Module]:
    """The trunk's modules in order, checked: an nn.Sequential, nn.ModuleList or list/tuple of modules.

    Shapes: returns L >= 1 modules.
    """
    if isinstance(trunk, (nn.Sequential, nn.ModuleList)) or (
        isinstance(trunk, Sequence) and not isinstance(trunk, str)
    ):
        modules = list(trunk)
    else:
        raise TypeError(
            f"trunk must be an nn.Sequential, nn.ModuleList or a list of modules, got {type(trunk).__name__}"
        )
    if not modules:
        raise ValueError("trunk has no modules")
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"trunk[{i}] must be an nn.Module, got {type(m).__name__}")
    return modules


def run_modules(modules: Sequence[nn.Module], x: Any) -> Any:
    """Each module's output is the next one's single argument, tuples included (nn.Sequential's rule).

    Shapes: x the first module's input (a tensor or tuple of tensors); returns the last output.
    """
    for m in modules:
        x = m(x)
    return x


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _detached_leaves(anchor: Any, wants: bool) -> tuple[list[Any], Any]:
    """A segment's input cut from the graph before it: the anchor's leaves (floating tensors detached,
    requiring grad iff ``wants``) and their structure."""
    leaves, spec = tree_flatten(anchor)
    return [a.detach().requires_grad_(wants) if _is_float_tensor(a) else a for a in leaves], spec


def _requires_grad(x: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(x)[0])


class CheckpointedTrunk:
    """Runs the trunk under no_grad keeping each segment's input; backward recomputes segment by segment.

    Forward keeps S anchors (the inputs of the S segments, the first being ``images``) and returns
    the last output, the shared representation. :meth:`backward` takes the gradient at that
    representation and, last segment first, recomputes the segment from its anchor with autograd
    and backpropagates through it, so at most one segment's activations are alive at a time.
    Each anchor is released once its segment is done.

    With two or more segments the last one is not recomputed: its forward runs with autograd and
    its graph is kept until the backward, as ``torch.utils.checkpoint.checkpoint_sequential``
    does. That saves its second forward (in a dilated ResNet the last stage is the costliest) at
    the price of holding its activations while the heads run, which does not grow with the
    number of tasks either. ``keep_last=False`` recomputes it like the others: for a caller that
    holds something growing with the tasks while the heads run (a balancer's T branching-point
    gradients), so that the two are never alive together.

    Shapes: images any (N, ...) tensor or tuple of tensors; the representation and anchors whatever
    the modules produce (tensors or tuples of tensors); gradients have the representation's structure.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        bounds: Sequence[tuple[int, int]],
        keep_last: bool = True,
    ) -> None:
        self.segments = [list(modules[a:b]) for a, b in bounds]
        self.keep_last = keep_last
        self.anchors: list[Any] = []
        self.replays: list[SegmentReplay | None] = []
        self.needs_grad: list[bool] = []
        # the last segment run with autograd: (its input leaves, their structure, its output)
        self.kept: list[Any] | None = None
        self.kept_device_types: set[str] = set()

    def forward(self, images: Any) -> Any:
        """Trunk output without autograd; anchors, RNG, autocast and buffer states kept for the backward."""
        # Whether anything at or below segment s has a gradient to receive: segments below the
        # first trainable one are never recomputed (a frozen stem costs no second forward).
        below = _requires_grad(images)
        self.needs_grad = []
        for seg in self.segments:
            below = below or any(p.requires_grad for m in seg for p in m.parameters())
            self.needs_grad.append(below)
        x = images
        last = len(self.segments) - 1
        for s, seg in enumerate(self.segments):
            if s == last and s > 0 and self.keep_last and self.needs_grad[s]:
                return self._forward_kept(seg, x, self.needs_grad[s - 1])
            with torch.no_grad():
                replay = SegmentReplay.capture(seg, x)
                self.anchors.append(x)
                x = run_modules(seg, x)
                replay.after_forward()
                self.replays.append(replay)
        return x

    def _forward_kept(self, seg: list[nn.Module], anchor: Any, wants: bool) -> Any:
        """The last segment with autograd from its detached input; its graph kept, its output detached."""
        leaves, anchor_spec = _detached_leaves(anchor, wants)
        with torch.enable_grad():
            out = run_modules(seg, tree_unflatten(leaves, anchor_spec))
        self.anchors.append(None)
        self.replays.append(None)
        self.kept = [leaves, anchor_spec, out]
        self.kept_device_types = device_types_of(anchor, out)
        out_leaves, out_spec = tree_flatten(out)
        del out
        return tree_unflatten(
            [o.detach() if isinstance(o, torch.Tensor) else o for o in out_leaves], out_spec
        )

    def backward(self, grads: list[torch.Tensor | None], spec: Any) -> None:
        """Backpropagates ``grads`` (the representation's flattened gradient, ``spec`` its structure).

        Accumulates into the trunk's parameters (and into ``images`` when it requires grad), as
        ``loss.backward()`` does. Runs with autocast off, like every backward of the engine: each
        recomputed forward re-enters the autocast state its first forward had, so the caller's
        context at this point does not matter.
        """
        device_types = self.kept_device_types.union(
            *(r.device_types for r in self.replays if r is not None)
        )
        with no_autocast(device_types):
            self._backward(grads, spec)
        self.anchors.clear()
        self.replays.clear()
        self.kept = None

    def _backward(self, grads: list[torch.Tensor | None], spec: Any) -> None:
        for s in reversed(range(len(self.segments))):
            if not self.needs_grad[s] or all(g is None for g in grads):
                break
            if self.kept is not None and s == len(self.segments) - 1:
                kept, self.kept = self.kept, None
                box = [kept.pop()]  # the output: no reference but the box's
                leaves, anchor_spec = kept
                _backprop(s, box, grads, spec)
            else:
                anchor, self.anchors[s] = self.anchors[s], None
                if s == 0:
                    # images as given: a gradient flows into them (or their graph) exactly as in naive
                    x = anchor
                else:
                    leaves, anchor_spec = _detached_leaves(anchor, self.needs_grad[s - 1])
                    x = tree_unflatten(leaves, anchor_spec)
                del anchor
                replay = self.replays[s]
                with replay.buffers_as_before_forward():
                    with torch.enable_grad(), replay.forward_state():
                        box = [run_modules(self.segments[s], x)]
                    del x
                    _backprop(s, box, grads, spec)
            if s == 0:
                break
            grads = [
                a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in leaves
            ]
            spec = anchor_spec
            del leaves


def _backprop(s: int, box: list[Any], grads: list[torch.Tensor | None], spec: Any) -> None:
    """Backward of segment ``s`` from its output, the one item of ``box`` (structure ``spec``).

    Empties ``box`` and ``grads``: with the caller's references dropped, each output and gradient
    can die during the backward once autograd is done with it.
    """
    out_leaves, out_spec = tree_flatten(box.pop())
    if out_spec != spec or len(out_leaves) != len(grads):
        raise RuntimeError(
            f"trunk segment {s} produced a different structure on recomputation: {out_spec} vs {spec}"
        )
    pairs = [
        (o, g)
        for o, g in zip(out_leaves, grads)
        if g is not None and isinstance(o, torch.Tensor) and o.requires_grad
    ]
    # drop the caller's references too: each gradient dies once its segment is done
    del out_leaves
    grads.clear()
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
