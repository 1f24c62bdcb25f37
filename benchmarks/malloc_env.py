"""The glibc malloc settings the CPU benchmarks run under: their one definition.

By default glibc maps a block afresh above a threshold that moves with what was last freed (up
to 32 MiB), and gives the top of its heap back to the OS past another: a tensor of a few MiB
allocated and freed on every call is then either reused or faulted in anew (the kernel zeroing
every page), depending on the heap's history, and identical runs of one attention_distill case
measured 4 to 23 ms apart. These settings fix glibc at its own steady state: blocks under 32 MiB
come from the heap and are reused, larger ones are mapped afresh on every call, as they are by
default; every implementation runs under them alike.

They must be in the environment before Python starts (glibc reads them once):
``make bench`` and ``make bench-quick`` take them from here (``python benchmarks/malloc_env.py``
prints them as ``NAME=VALUE`` words), the harness records them with each run and the report warns
when they were missing. Standard library only, so the Makefile can run it with any Python.
"""

from __future__ import annotations

import os

__all__ = ["MALLOC_ENV", "current"]

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def current() -> dict[str, str | None]:
    """The values of :data:`MALLOC_ENV`'s variables in this process's environment."""
    return {name: os.environ.get(name) for name in MALLOC_ENV}


if __name__ == "__main__":
    print(" ".join(f"{name}={value}" for name, value in MALLOC_ENV.items()))
