"""What a trunk segment's forward needs to run a second time identically: RNG, autocast, buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_flatten

__all__ = ["SegmentReplay", "device_types_of", "no_autocast"]


def device_types_of(*trees: Any) -> set[str]:
    """Device types ("cpu" always, plus "cuda", ...) of the tensors in the given structures."""
    types = {"cpu"}
    for tree in trees:
        types.update(t.device.type for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))
    return types


@contextlib.contextmanager
def no_autocast(device_types: Iterable[str]) -> Iterator[None]:
    """Turns autocast off for these device types: backward passes run outside it, as torch recommends."""
    with contextlib.ExitStack() as stack:
        for dt in sorted(set(device_types)):
            if torch.amp.is_autocast_available(dt) and torch.is_autocast_enabled(dt):
                stack.enter_context(torch.autocast(dt, enabled=False))
        yield


def _rng_module(device_type: str) -> Any:
    module = getattr(torch, device_type, None)
    if (
        module is None
        or not hasattr(module, "get_rng_state")
        or not hasattr(module, "set_rng_state")
    ):
        return None
    return module


def _get_rng_states(
    devices: Sequence[torch.device],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    return torch.get_rng_state(), [
        m.get_rng_state(d) if (m := _rng_module(d.type)) is not None else None for d in devices
    ]


def _set_rng_states(
    devices: Sequence[torch.device], states: tuple[torch.Tensor, list[torch.Tensor | None]]
) -> None:
    cpu_state, device_states = states
    torch.set_rng_state(cpu_state)
    for d, state in zip(devices, device_states):
        if state is not None:
            _rng_module(d.type).set_rng_state(state, d)


def _tracking_batch_norm(m: nn.Module) -> bool:
    # the modules whose statistics update we suppress on recomputation by a flag, not by buffer swaps
    return isinstance(m, _BatchNorm) and m.training and m.track_running_stats


class SegmentReplay:
    """Snapshot taken before one segment's first forward, to replay it during the backward.

    * RNG: the CPU generator's state and that of every accelerator device the segment's inputs,
      parameters or buffers live on (CUDA: each device's Philox seed and offset), restored for the
      recomputation (so dropout draws the same masks) and put back afterwards, so the step
      consumes randomness once, like plain autograd.
    * Autocast: enabled flag and dtype per device type, and the cache flag, re-entered for the
      recomputation whatever context the backward happens to run in.
    * Batch norm (``torch.nn.modules.batchnorm._BatchNorm`` subclasses, SyncBatchNorm included) in
      train mode with running statistics: ``track_running_stats`` is set to False while the
      segment is recomputed, so ``F.batch_norm`` gets no running statistics and neither they nor
      ``num_batches_tracked`` move a second time; the normalisation (batch statistics) is the same.
    * Other buffers a forward modifies (InstanceNorm running statistics, spectral-norm power
      iteration vectors, counters, mtlfast's TaskBatchNorm2d): every buffer of the segment's other
      modules is copied before the first forward; a module counts as stateful when the forward
      changed one of its buffers' version counter or replaced one. Its pre-forward buffers are
      swapped in for the recomputation (which therefore sees the same state as the first forward)
      and the post-forward ones swapped back once the segment's backward is done. Copies of
      modules the forward left alone are dropped at once. Writes that bypass the version counter
      (``.data`` writes, or kernels that mutate an argument they do not declare) go unnoticed, as
      do the buffers of a lazy module on the step that materialises them (run one forward first).
    """

    def __init__(self, modules: Sequence[nn.Module], inputs: Any) -> None:
        flat = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        seen: set[int] = set()
        self.modules: list[nn.Module] = []
        for top in modules:
            for m in top.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    self.modules.append(m)
        tensors = flat + [
            t for m in self.modules for t in (*m.parameters(False), *m.buffers(False))
        ]
        self.devices = sorted(
            {t.device for t in tensors if t.device.type not in ("cpu", "meta")},
            key=lambda d: (d.type, d.index or 0),
        )
        self.device_types = {"cpu"} | {d.type for d in self.devices}
        self.rng = _get_rng_states(self.devices)
        self.autocast = [
            (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
            for dt in sorted(self.device_types)
            if torch.amp.is_autocast_available(dt)
        ]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        # (module, name, object before, version before, copy before)
        self.buffers: list[tuple[nn.Module, str, torch.Tensor, int, torch.Tensor]] = []
        with torch.no_grad():
            for m in self.modules:
                if isinstance(m, _BatchNorm):
                    continue  # train mode: handled by the flag; eval mode: not updated
                for name, b in m._buffers.items():
                    if b is not None and not is_lazy(b):  # a lazy module's buffer has no value yet
                        self.buffers.append((m, name, b, b._version, b.detach().clone()))

    @classmethod
    def capture(cls, modules: Sequence[nn.Module], inputs: Any) -> SegmentReplay:
        """State before the segment's forward on ``inputs`` (call right before running it)."""
        return cls(modules, inputs)

    def after_forward(self) -> None:
        """Keeps the pre-forward copies of the modules the forward modified, drops the others."""
        changed = {
            id(m)
            for m, name, b, version, _ in self.buffers
            if m._buffers.get(name) is not b or b._version != version
        }
        self.buffers = [entry for entry in self.buffers if id(entry[0]) in changed]

    @contextlib.contextmanager
    def forward_state(self) -> Iterator[None]:
        """RNG, autocast and batch-norm flags as in the first forward; the caller's RNG restored after."""
        caller_rng = _get_rng_states(self.devices)
        frozen = [m for m in self.modules if _tracking_batch_norm(m)]
        try:
            _set_rng_states(self.devices, self.rng)
            for m in frozen:
                m.track_running_stats = False
            with contextlib.ExitStack() as stack:
                for dt, enabled, dtype in self.autocast:
                    stack.enter_context(
                        torch.autocast(
                            dt, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache
                        )
                    )
                yield
        finally:
            for m in frozen:
                m.track_running_stats = True
            _set_rng_states(self.devices, caller_rng)

    @contextlib.contextmanager
    def buffers_as_before_forward(self) -> Iterator[None]:
        """Swaps in the stateful buffers' pre-forward copies; puts the current ones back on exit.

        Swapping objects rather than copying values leaves the live buffers' version counters
        alone, and the recomputation's own updates land on the copies, which are then dropped.
        """
        current = [(m, name, m._buffers[name]) for m, name, _, _, _ in self.buffers]
        try:
            for m, name, _, _, before in self.buffers:
                m._buffers[name] = before
            yield
        finally:
            for m, name, b in current:
                m._buffers[name] = b
            self.buffers = []
