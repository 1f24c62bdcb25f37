"""Backend registry and selection for the fused ops.

Every op has kernels in up to four backends: ``reference`` (pure PyTorch, everywhere), ``cpu``
(C++ in ``mtlfast._C``, CPU tensors), ``triton`` (CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was imported) and ``cuda`` (``kernels/*.cu``).
Without an override the fastest backend available for the tensors' device is used; a forced
backend that cannot run the given tensors is an error, never a silent substitution.

This module is the public selection API; how the ops register their kernels and route a call
(kernel, autograd.Function or custom op) is private plumbing in :mod:`mtlfast.ops._dispatch`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from .. import _extension

__all__ = ["BACKENDS", "available_backends", "current_backend", "use_backend"]

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Preference order per device type: the first available backend is taken.
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mtlfast_backend", default=None
)


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}"
        )
    return name


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _works_on(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu" and _extension.has_extension()
    if backend == "cuda":
        return device_type == "cuda" and _extension.has_cuda_kernels()
    if backend == "triton":
        if not _triton_importable():
            return False
        return device_type == "cuda" or (device_type == "cpu" and _triton_interpreted())
    return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run tensors on ``device`` here, fastest first."""
    device_type = torch.device(device).type
    order = _PREFERENCE.get(device_type, ("reference",))
    extra = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *extra) if _works_on(b, device_type)]


def current_backend() -> str | None:
    """The forced backend (``use_backend`` or ``MTLFAST_BACKEND``), or None for automatic."""
    forced = _override.get()
    if forced is not None:
        return forced
    env = os.environ.get("MTLFAST_BACKEND", "").strip()
    return _check_name(env, "MTLFAST_BACKEND") if env else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every fused op inside the block to run on backend ``name``."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)
