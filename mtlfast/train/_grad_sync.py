"""Bucketed all-reduce of ``.grad`` that starts while the memory engine's backward still runs.

The engine runs its own backward (each head's, then the trunk's segment by segment), so
``DistributedDataParallel``'s autograd hooks never see it. :class:`GradientSync` hooks each
parameter's gradient accumulation instead: a bucket (about 25 MiB of consecutive parameters in
the order their gradients arrive: the heads first, then the trunk from its last layer back)
is sent with an asynchronous all-reduce as soon as all its gradients are in, while the engine
goes on with the next head or trunk segment. Buckets are sent in one fixed order on every rank
(a bucket whose predecessors are not ready waits for them), so the collectives pair up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["GradientSync"]

DEFAULT_BUCKET_BYTES = 25 * 2**20


class _Bucket:
    """Consecutive parameters of one dtype and device, and the flat buffer they are sent in.

    The buffer holds the gradients, then one presence flag per parameter: a parameter whose
    gradient is None on a rank (its head did not run there) counts as zero in the average, and
    gets a gradient wherever any rank had one.

    Shapes: buffer (numel + P,) for P parameters of ``numel`` elements in all.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        self.buffer: torch.Tensor | None = None
        self.work = None
        self.pending = 0
        self.seen: set[int] = set()

    def fill(self) -> torch.Tensor:
        p0 = self.params[0]
        if self.buffer is None:
            self.buffer = torch.empty(
                self.numel + len(self.params), dtype=p0.dtype, device=p0.device
            )
        grads, flags = self.buffer[: self.numel], self.buffer[self.numel :]
        views = grads.split(self.sizes)
        present = [p.grad is not None for p in self.params]
        for p, view, has in zip(self.params, views, present):
            if has:
                # NCHW element order whatever the gradient's layout (channels-last weights,
                # train.memory_format): one strided copy, and every rank's buffer pairs up
                view.view_as(p).copy_(p.grad)
            else:
                view.zero_()
        flags.copy_(torch.tensor(present, dtype=flags.dtype))
        return self.buffer

    def write_back(self, world: int) -> None:
        grads, flags = self.buffer[: self.numel], self.buffer[self.numel :]
        grads.div_(world)
        for p, view, flag in zip(self.params, grads.split(self.sizes), flags.tolist()):
            if flag == 0:
                continue  # no rank had a gradient: it stays None, as on one process
            if p.grad is None:  # in the parameter's layout, as autograd would have made it
                p.grad = torch.empty_like(p).copy_(view.view_as(p))
            else:
                p.grad.copy_(view.view_as(p))


class GradientSync:
    """Averages the ``.grad`` of ``params`` over the ranks of ``group`` around one backward.

    Per step: :meth:`start` arms the hooks, the backward runs (``multi_branch_step``, or any
    code that accumulates ``.grad``), :meth:`finish` sends the buckets not sent yet, waits for
    all and writes the averages into ``.grad``. Each parameter's gradient must be accumulated at
    most once between the two calls once its bucket is sent (the engine's contract); a later
    accumulation raises RuntimeError naming the parameter.

    Args:
        params: parameters in the order their gradients are expected (frozen ones are left
            out; a parameter listed twice counts once).
        group: the process group (default the world).
        bucket_bytes: the size above which a new bucket starts (one parameter larger than it
            is a bucket of its own).
        names: optional parameter -> name, for error messages.

    Attributes after :meth:`finish`: ``stats``, a dict with ``buckets``, ``bytes`` (sent per
    rank per step), ``early`` (buckets sent during the backward), ``wait_s`` (time
    :meth:`finish` waited for the collectives) and ``copy_s`` (time spent filling buffers).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        group=None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        names: dict[int, str] | None = None,
    ) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.group = group
        self.world = dist.get_world_size(group)
        self.names = names or {}
        seen: set[int] = set()
        ordered = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                ordered.append(p)
        self.buckets: list[_Bucket] = []
        current: list[torch.Tensor] = []
        size = 0
        for p in ordered:
            nbytes = p.numel() * p.element_size()
            if current and (
                size + nbytes > bucket_bytes
                or p.dtype != current[0].dtype
                or p.device != current[0].device
            ):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(_Bucket(current))
        self._where = {
            id(p): (b, i)
            for b, bucket in enumerate(self.buckets)
            for i, p in enumerate(bucket.params)
        }
        self._armed = False
        self._absent: set[int] = set()
        self._next = 0
        self._copy_s = 0.0
        self.stats: dict = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank sends into the all-reduces of one step (buffers with their flags)."""
        return sum((b.numel + len(b.params)) * b.params[0].element_size() for b in self.buckets)

    def start(self, absent: Iterable[torch.Tensor] = ()) -> None:
        """Arms the hooks for one backward; ``absent``: parameters whose gradient will not come on
        this rank (a head that does not run here), so their buckets need not wait for them."""
        skip = self._absent = {id(p) for p in absent}
        for bucket in self.buckets:
            bucket.work = None
            bucket.seen = set()
            bucket.pending = sum(1 for p in bucket.params if id(p) not in skip)
        self._armed, self._next, self._copy_s = True, 0, 0.0
        self._send_ready()

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        b, i = self._where[id(p)]
        bucket = self.buckets[b]
        if bucket.work is not None:
            name = self.names.get(id(p), f"of shape {tuple(p.shape)}")
            raise RuntimeError(
                f"GradientSync: parameter {name} received a gradient after its bucket was sent "
                "(used twice in one step, or listed out of order as absent); its ranks would "
                "diverge"
            )
        if id(p) not in self._absent and i not in bucket.seen:
            bucket.seen.add(i)
            bucket.pending -= 1
            if bucket.pending <= 0 and b == self._next:
                self._send_ready()

    def _send(self, bucket: _Bucket) -> None:
        tick = time.perf_counter()
        buffer = bucket.fill()
        self._copy_s += time.perf_counter() - tick
        bucket.work = dist.all_reduce(buffer, group=self.group, async_op=True)

    def _send_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending <= 0:
            self._send(self.buckets[self._next])
            self._next += 1

    def finish(self) -> None:
        """Sends the remaining buckets in order, waits for every all-reduce and writes the averaged
        gradients (a parameter no rank had a gradient for keeps None)."""
        if not self._armed:
            raise RuntimeError("GradientSync.finish() without start()")
        early = self._next
        try:
            while self._next < len(self.buckets):
                self._send(self.buckets[self._next])
                self._next += 1
            tick = time.perf_counter()
            for bucket in self.buckets:
                bucket.work.wait()
            waited = time.perf_counter() - tick
            for bucket in self.buckets:
                bucket.write_back(self.world)
        finally:
            self._armed = False
        self.stats = {
            "buckets": len(self.buckets),
            "bytes": self.bytes_per_step,
            "early": early,
            "wait_s": waited,
            "copy_s": self._copy_s,
        }

    def close(self) -> None:
        """Removes the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def parameters_in_gradient_order(
    heads: Iterable[torch.nn.Module], trunk: Sequence[torch.nn.Module], rest: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """The order the engine's gradients arrive in: each head's parameters (last layer first), in
    the heads' order, then the trunk's from its last module back, then ``rest``."""
    out: list[torch.Tensor] = []
    for head in heads:
        out += reversed(list(head.parameters()))
    for module in reversed(list(trunk)):
        out += reversed(list(module.parameters()))
    out += list(rest)
    return out
