"""Peak memory of a block of code and the bytes autograd saved for backward in it.

    with mtlfast.profiling.memory("cpu") as m:   # or "cuda", "cuda:1", torch.device(...)
        loss = model(x).sum()
        loss.backward()
    m.peak_extra_bytes   # peak bytes allocated during the block above those allocated at its start
    m.saved_bytes        # bytes of the distinct storages autograd saved for backward in the block

What each figure means, and how it is measured:

``start_bytes``, ``peak_bytes``, ``end_bytes``
    Bytes allocated by torch on the device when the block began, at its peak during the block,
    and when it ended. CUDA: the caching allocator's ``memory_allocated`` and
    ``max_memory_allocated`` of that device (after ``reset_peak_memory_stats``, with the device
    synchronized at both ends): tensors' blocks as the allocator rounds them, from every thread and
    stream, but not the allocator's cached free blocks (``memory_reserved``). CPU: ``None``, as
    torch keeps no count of the CPU bytes it has allocated; only the extra figures exist there.

``peak_extra_bytes``, ``end_extra_bytes``
    The same above ``start_bytes``: what the block needed beyond what already existed, and what
    it left allocated (its outputs, new ``.grad`` fields). CUDA: the differences of the figures
    above. CPU: from the allocation events of torch's profiler (``torch.profiler.profile(
    profile_memory=True)``): every allocation and free through torch's CPU allocator, with its
    address and size, in time order; the running sum of the bytes allocated during the block and
    not yet freed, its maximum and its final value. The sizes are the bytes requested (the
    allocator's alignment and malloc's bookkeeping are not counted). Frees of memory allocated
    before the block are left out (the profiler knows the size of memory allocated while it was
    running only), so both figures are exact when the block frees nothing that existed before it,
    and otherwise an upper bound of the true peak above the start. What the CPU figures miss:

    * allocations made on threads that do not carry the profiler's thread-local state: the
      workers of intra-op parallel regions (``at::parallel_for`` under OpenMP, e.g. a kernel's
      per-thread scratch allocated with ``at::empty`` inside the loop), and Python threads started
      inside the block. Autograd's backward of CPU tensors runs in the thread that calls it and is
      seen, as are threads that autograd and ``at::launch`` start (they inherit that state).
      Kernels that allocate their outputs and workspaces before their parallel loop, as ATen's
      and mtlfast's do, are counted whole;
    * memory that libraries allocate with their own allocators (BLAS packing buffers, OpenMP's
      stacks), and memory that is not a tensor.

``rss_peak_extra_bytes``
    CPU on Linux only (else ``None``): the peak resident set size of the whole process during the
    block above its resident size at the start (``VmHWM`` of /proc/self/status, reset through
    /proc/self/clear_refs). It sees every thread and allocator, but it is a cross-check, not a
    measure of what torch allocated: malloc hands out pages that earlier frees left resident
    without growing the RSS (after a warm-up run it can read near 0), and the untouched pages of a
    tensor from ``torch.empty`` are not resident. It becomes a tight check in a process started
    with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``, where glibc maps every block of
    64 KiB or more on its own and unmaps it when freed: there, for training steps of the ResNet-50
    network of benchmarks/bench_engine.py (250 to 570 MiB), it exceeded ``peak_extra_bytes`` by
    less than 3 MiB (the profiler's own buffers, small blocks, and all that the profiler misses).
    Not after :func:`mtlfast.train.keep_freed_memory` (which the trainer calls on the CPU): glibc
    then keeps freed memory resident for reuse, and the figure reads near 0 once warm.

``saved_bytes``, ``saved_tensors``
    The bytes and number of the distinct storages that autograd packed for backward during the
    block (counted by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook, which then hands
    the tensor on unchanged). Tensors sharing a storage (the output of one layer saved again as
    the input of the next, views of one tensor) count once, with their storage's full size, since
    a saved view keeps all of its storage alive. A storage freed and another allocated later at
    the same address count as two. This is the total that autograd saved over the whole block,
    not what was alive at its peak: a backward that frees saved tensors, a recomputation that
    saves the same activations again into new storages, all add up. Parameters and inputs that
    ops save count too, though they were allocated before the block. Tensors saved under other
    saved-tensors hooks pushed inside the block are not seen (autograd calls only the innermost
    pair): ``torch.utils.checkpoint`` (non-reentrant) packs its segments' tensors with its own
    hooks, and the inputs it keeps for the recomputation are not packed at all.

Overhead: on CPU the profiler records every op as well as every allocation, which slows the block
(a few percent for convolution-sized ops, much more for many tiny ops), and the pack hook runs
Python for every saved tensor. Never time a block and measure its memory in the same run. On
CUDA the peak statistics of the device are reset at the start of the block.

Blocks nest (each gets its own figures; on CPU the profiler is stopped and restarted at each
inner block's boundaries). CPU measurements can't overlap in two threads, nor run while another
``torch.profiler`` session is active.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["MemoryStats", "memory"]


@dataclass
class MemoryStats:
    """The figures of one :func:`memory` block (the module docstring says what each means); all
    ``None`` until the block ends, and those that the device lacks stay ``None``."""

    device: torch.device
    start_bytes: int | None = None
    peak_bytes: int | None = None
    end_bytes: int | None = None
    peak_extra_bytes: int | None = None
    end_extra_bytes: int | None = None
    rss_peak_extra_bytes: int | None = None
    saved_bytes: int | None = None
    saved_tensors: int | None = None


def memory(device: torch.device | str | int, *, saved_tensors: bool = True) -> _Measurement:
    """Context manager measuring the peak memory of its block on ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:<i>"``, a ``torch.device`` or a CUDA index) and, unless ``saved_tensors`` is false,
    the bytes autograd saved for backward in it; ``with memory(device) as m:`` gives the
    :class:`MemoryStats` ``m``, filled in when the block ends."""
    return _Measurement(_device(device), saved_tensors)


def _device(device: torch.device | str | int) -> torch.device:
    if isinstance(device, int):
        device = torch.device("cuda", device)
    elif not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            expected = "'cpu', 'cuda' or 'cuda:<index>'"
            raise ValueError(f"device: expected {expected}, got {device!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: only 'cpu' and 'cuda' are measured, got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r}: CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class _Measurement:
    """One ``with memory(...)`` block."""

    def __init__(self, device: torch.device, saved_tensors: bool) -> None:
        self.stats = MemoryStats(device)
        self._count_saved = saved_tensors
        self._entered = False
        self._peaks: list[_PeakWatch] = []
        self._allocations: _AllocationWatch | None = None
        self._saved: _SavedWatch | None = None
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def __enter__(self) -> MemoryStats:
        if self._entered:
            raise RuntimeError("mtlfast.profiling.memory: a measurement can be entered only once")
        self._entered = True
        device = self.stats.device
        try:
            if device.type == "cuda":
                counters: list[_Counter | None] = [_CudaCounter.get(device)]
            else:
                self._allocations = _CPU_EVENTS.enter()
                counters = [_RssCounter.get()]
            for counter in counters:
                if counter is not None:
                    watch = _PeakWatch(counter)
                    watch.start()
                    self._peaks.append(watch)
            if self._count_saved:
                hooks = torch.autograd.graph.saved_tensors_hooks(_SAVED.pack, _unpack)
                hooks.__enter__()
                self._hooks, self._saved = hooks, _SAVED.enter()
        except BaseException:
            self._close(None, None, None)  # undo what was started, then let the error out
            raise
        return self.stats

    def __exit__(self, *exc_info) -> None:
        self._close(*exc_info)

    def _close(self, *exc_info) -> None:
        """Ends what the block started, and fills in the figures."""
        stats = self.stats
        if self._hooks is not None:
            self._hooks.__exit__(*exc_info)
            stats.saved_bytes, stats.saved_tensors = _SAVED.exit(self._saved)
            self._hooks = None
        # The RSS first: reading the profiler's events takes memory of its own.
        for watch in self._peaks:
            start, peak, end = watch.stop()
            if isinstance(watch.counter, _RssCounter):
                stats.rss_peak_extra_bytes = peak - start
            else:
                stats.start_bytes, stats.peak_bytes, stats.end_bytes = start, peak, end
                stats.peak_extra_bytes, stats.end_extra_bytes = peak - start, end - start
        self._peaks = []
        if self._allocations is not None:
            _CPU_EVENTS.exit(self._allocations)
            stats.peak_extra_bytes = self._allocations.peak
            stats.end_extra_bytes = self._allocations.current
            self._allocations = None


# --- Peaks of process-wide counters that can be reset (CUDA's allocator, the process's RSS) ---


class _Counter:
    """A current value and a peak since the last reset, shared by the whole process."""

    active: list[_PeakWatch]

    def current(self) -> int:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class _PeakWatch:
    """The peak of a counter over one block. Blocks nest: an inner block resets the counter's
    peak, so it first folds the peak so far into every enclosing block's."""

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter
        self.start_value = self.peak_so_far = 0

    def start(self) -> None:
        counter = self.counter
        for outer in counter.active:
            outer.peak_so_far = max(outer.peak_so_far, counter.peak())
        counter.reset()
        self.start_value = self.peak_so_far = counter.current()
        counter.active.append(self)

    def stop(self) -> tuple[int, int, int]:
        counter = self.counter
        counter.active.remove(self)
        end, peak = counter.current(), counter.peak()
        return self.start_value, max(self.peak_so_far, peak, end), end


class _CudaCounter(_Counter):
    """The CUDA caching allocator's allocated bytes on one device."""

    _by_device: ClassVar[dict[torch.device, _CudaCounter]] = {}

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = []

    @classmethod
    def get(cls, device: torch.device) -> _CudaCounter:
        if device not in cls._by_device:
            cls._by_device[device] = cls(device)
        return cls._by_device[device]

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)


class _RssCounter(_Counter):
    """The process's resident set size (Linux /proc)."""

    _instance: _RssCounter | None = None
    _checked = False

    def __init__(self) -> None:
        self.active = []

    @classmethod
    def get(cls) -> _RssCounter | None:
        """The counter, or None where /proc/self cannot report and reset the peak RSS."""
        if not cls._checked:
            cls._checked = True
            counter = cls()
            try:
                counter.reset()
                counter.current(), counter.peak()
                cls._instance = counter
            except (OSError, ValueError, KeyError):
                cls._instance = None
        return cls._instance

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    value, unit = line.split()[1:3]
                    assert unit == "kB"
                    return int(value) * 1024
        raise KeyError(key)

    def current(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)


# --- CPU allocations, from the profiler's allocation events ---


class _AllocationWatch:
    """The bytes allocated during one CPU block and not yet freed: now and at their peak."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}  # address -> bytes, of the block's own allocations
        self.current = self.peak = 0

    def allocated(self, ptr: int, nbytes: int) -> None:
        # An address allocated again without a free in between was freed where the profiler could
        # not see it (module docstring): forget the first allocation.
        self.current += nbytes - self.live.get(ptr, 0)
        self.live[ptr] = nbytes
        self.peak = max(self.peak, self.current)

    def freed(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)  # 0: allocated before the block


class _CpuAllocationEvents:
    """The one profiler session of the process that feeds every active CPU block. At each block's
    entry and exit the session stops, its events go to the blocks active during it, and a new
    one starts if blocks remain."""

    def __init__(self) -> None:
        self.active: list[_AllocationWatch] = []
        self.thread: int | None = None
        self.profiler: torch.profiler.profile | None = None

    def enter(self) -> _AllocationWatch:
        if self.active and self.thread != threading.get_ident():
            raise RuntimeError(
                "mtlfast.profiling.memory: CPU measurements in two threads can't overlap"
            )
        if not self.active and torch._C._autograd._profiler_enabled():
            raise RuntimeError(
                "mtlfast.profiling.memory: a torch.profiler session is already running; CPU memory "
                "is measured with a profiler session of its own"
            )
        self._flush()
        watch = _AllocationWatch()
        self.active.append(watch)
        self.thread = threading.get_ident()
        self._start()
        return watch

    def exit(self, watch: _AllocationWatch) -> None:
        self._flush()
        self.active.remove(watch)
        if self.active:
            self._start()

    def _start(self) -> None:
        profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=False,
            with_stack=False,
        )
        profiler.__enter__()
        self.profiler = profiler

    def _flush(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        events = sorted(_allocation_events(profiler), key=lambda e: e[0])  # stable: ties keep order
        for _, ptr, nbytes in events:
            for watch in self.active:
                if nbytes > 0:
                    watch.allocated(ptr, nbytes)
                else:
                    watch.freed(ptr)


def _allocation_events(profiler: torch.profiler.profile) -> list[tuple[int, int, int]]:
    """(time ns, address, bytes: + allocated, - freed) of the session's CPU allocation events.

    The event tree (what ``torch.profiler._memory_profiler`` reads) rather than the flat event
    list: only its allocation events carry their address, which pairs each free with its
    allocation."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag != _EventType.Allocation:
            continue
        fields = event.extra_fields
        if fields.device.type == "cpu" and fields.alloc_size != 0:
            events.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    return events


_CPU_EVENTS = _CpuAllocationEvents()


# --- Tensors saved for backward ---


@dataclass(eq=False)  # identity: two watches may hold equal figures
class _SavedWatch:
    """The distinct storages saved during one block (weak references: the storages are freed as
    usual, while the references keep each storage's identity from being reused)."""

    storages: set[StorageWeakRef] = field(default_factory=set)
    nbytes: int = 0
    tensors: int = 0


class _SavedTensors:
    """The pack hook of every block, recording into all the blocks active in the process (a
    nested block's hooks replace its parent's for autograd, so each hook serves all of them)."""

    def __init__(self) -> None:
        self.active: list[_SavedWatch] = []
        self.lock = threading.Lock()  # autograd may pack on its worker threads

    def enter(self) -> _SavedWatch:
        watch = _SavedWatch()
        with self.lock:
            self.active.append(watch)
        return watch

    def exit(self, watch: _SavedWatch) -> tuple[int, int]:
        with self.lock:
            self.active.remove(watch)
        watch.storages.clear()
        return watch.nbytes, watch.tensors

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            key, nbytes = StorageWeakRef(storage), storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # no storage (sparse, wrappers)
            key, nbytes = None, tensor.numel() * tensor.element_size()
        with self.lock:
            for watch in self.active:
                if key is None or key not in watch.storages:
                    if key is not None:
                        watch.storages.add(key)
                    watch.nbytes += nbytes
                    watch.tensors += 1
        # detach(): the packed value must not hold the tensor itself, whose grad_fn may hold it
        # back (a reference cycle); detach() shares the storage, so nothing is copied.
        return tensor.detach()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_SAVED = _SavedTensors()
