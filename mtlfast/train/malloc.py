"""glibc's malloc told to keep the memory that tensors free, for the next step to reuse.

A CPU training step allocates and frees the same large tensors every step. glibc serves a block
of 32 MiB or more (its ceiling for ``M_MMAP_THRESHOLD``, which no setting raises) by mapping
fresh pages and unmaps them when the tensor is freed, and hands the top of its heap back past a
threshold, so every step the kernel faults in and zeroes those pages again: about 1.3 us per
4 KiB page on a 2-core EPYC, 12 ms for one 32 MiB tensor whose fill takes 1 ms once mapped. The
trainer's UberNet step (VGG-16, 256x256, batch 4) allocates 177 such tensors (7.7 GiB, its
64 MiB first-stage maps among them) and took 1.7-2.0M page faults a step; PAD-Net's allocates 44
(its distillation's joint mask and message maps). :func:`keep_freed_memory` sets ``M_MMAP_MAX``
to 0 (every block from the heap) and ``M_TRIM_THRESHOLD`` to 2 GiB (the heap's top is not handed
back while less than that is free), so that after the first steps the heap holds the step's
peak and no page is faulted again (UberNet's step: 9.4 -> 6.3 s, benchmarks/malloc_step.py),
much as jemalloc or tcmalloc under ``LD_PRELOAD`` would, without the preload.

The cost: the process keeps the memory of its peak until it exits (its resident size no longer
falls between steps, and heap fragments add to it: peak RSS up to 11% higher in
benchmarks/results/README.md; torch's own peak is unchanged). The setting is process-wide, like
``torch.set_num_threads``, and lasts until changed; processes forked afterwards (data-loader
workers) inherit it. The trainer applies it on the CPU unless ``train.keep_freed_memory`` is
false.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# mallopt takes an int: the largest threshold it can be given
_TRIM_THRESHOLD = 2**31 - 1


def _glibc():
    """The process's C library if it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # musl and others: their malloc has no such settings
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to serve every block from its heap and to keep freed memory for reuse
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``) in this process.

    Returns True when both settings were taken, False where the C library is not glibc (macOS,
    Windows, musl): nothing is changed there. Blocks already mapped stay so until freed.
    """
    libc = _glibc()
    if libc is None:
        return False
    return (
        libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    )
