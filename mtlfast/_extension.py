"""Loading of the compiled extension ``mtlfast._C`` and what it offers on this machine."""

from __future__ import annotations

import functools
import importlib

import torch

__all__ = ["cpu_isa", "extension_error", "has_cuda_kernels", "has_extension", "kernels"]


@functools.cache
def _load() -> str | None:
    """Import ``mtlfast._C`` once; return the error text if it is missing or broken."""
    try:
        importlib.import_module("mtlfast._C")
    except Exception as exc:  # noqa: BLE001 - a broken build can raise anything: ImportError, OSError, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def extension_error() -> str | None:
    """Why the compiled extension cannot be used, or None when it loaded."""
    return _load()


# a constant to torch.compile, which cannot trace the import (a graph break, or an error under
# fullgraph=True, in every op that asks)
@torch.compiler.assume_constant_result
def has_extension() -> bool:
    """True when ``mtlfast._C`` imported and registered its kernels."""
    return _load() is None


def kernels(op: str):
    """``torch.ops.mtlfast_C`` with the extension loaded, for the op named ``op``; a RuntimeError
    naming the op and the reason when it cannot be."""
    if not has_extension():
        raise RuntimeError(f"{op}: the compiled extension mtlfast._C is missing ({_load()})")
    return torch.ops.mtlfast_C


@functools.cache
def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    if not has_extension():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "mtlfast_C::attention_distill_fwd", "CUDA"
    )


def cpu_isa() -> str | None:
    """Instruction set the C++ CPU kernels dispatch to here ("avx512", "avx2", "default")."""
    return torch.ops.mtlfast_C.cpu_isa() if has_extension() else None
