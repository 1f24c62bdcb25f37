"""Private plumbing of the fused ops: the kernel registry and how a call is routed.

Each op registers one kernel per backend and dtype set (:func:`register_kernel`); :func:`kernel`
picks the one to run (the forced backend of :mod:`mtlfast.ops.backends`, or the fastest that
can run the tensors). :func:`choose` decides whether a call goes to the kernels directly, to a
``torch.autograd.Function`` calling them, or to the ``torch.library`` custom op. Not public API.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _extension
from .backends import (
    _check_name,
    _override,
    _works_on,
    available_backends,
    current_backend,
    use_backend,
)

__all__ = [
    "autograd_function",
    "choose",
    "kernel",
    "register_kernel",
    "remember_backend",
    "remembered_backend",
    "runs_directly",
]

_kernels: dict[tuple[str, str], tuple[Callable, frozenset]] = {}
_warned_fallback = False


def remember_backend(ctx) -> None:
    """Record the backend forced around a forward on its autograd ``ctx``.

    Autograd may run the backward on a worker thread (always for CUDA tensors), where the
    ``use_backend`` of the forward's thread is not in effect; ``remembered_backend`` restores it.
    """
    ctx.mtlfast_backend = _override.get()


def remembered_backend(ctx) -> contextlib.AbstractContextManager:
    """Context in which a backward runs on the backend its forward was forced to."""
    forced = getattr(ctx, "mtlfast_backend", None)
    return use_backend(forced) if forced is not None else contextlib.nullcontext()


def register_kernel(op: str, backend: str, dtypes: tuple[torch.dtype, ...]) -> Callable:
    """Decorator registering ``fn`` as ``op``'s kernel in ``backend`` for ``dtypes``."""
    _check_name(backend, "register_kernel")

    def decorate(fn: Callable) -> Callable:
        _kernels[(op, backend)] = (fn, frozenset(dtypes))
        return fn

    return decorate


def _warn_fallback_once(device_type: str) -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    reason = _extension.extension_error() or "it was built without kernels for this device"
    warnings.warn(
        f"mtlfast: the compiled extension mtlfast._C cannot run {device_type} tensors ({reason}); "
        "fused ops fall back to the slower pure-PyTorch reference backend.",
        RuntimeWarning,
        stacklevel=4,
    )


def kernel(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The kernel of ``op`` to run for tensors of ``device`` and ``dtype``."""
    forced = current_backend()
    if forced is not None:
        fn, dtypes = _kernels.get((op, forced), (None, frozenset()))
        if fn is None:
            raise RuntimeError(f"mtlfast.{op}: backend {forced!r} has no kernel for this op")
        if not _works_on(forced, device.type):
            raise RuntimeError(
                f"mtlfast.{op}: backend {forced!r} cannot run {device.type} tensors here; "
                f"available: {available_backends(device)}"
            )
        if dtype not in dtypes:
            raise TypeError(f"mtlfast.{op}: backend {forced!r} does not support {dtype}")
        return fn
    key = (op, device.type, dtype)
    fn = _automatic.get(key)
    if fn is None:
        fn = _automatic[key] = _fastest(op, device, dtype)
    return fn


# The automatic choice per (op, device type, dtype): what can run is fixed once the process has
# imported mtlfast (the extension loads once; TRITON_INTERPRET is read when Triton is imported).
_automatic: dict[tuple[str, str, torch.dtype], Callable] = {}


def _fastest(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    for backend in available_backends(device):
        fn, dtypes = _kernels.get((op, backend), (None, frozenset()))
        if fn is not None and dtype in dtypes:
            if backend == "reference" and device.type in ("cpu", "cuda"):
                compiled = "cpu" if device.type == "cpu" else "cuda"
                if not _works_on(compiled, device.type):
                    _warn_fallback_once(device.type)
            return fn
    raise RuntimeError(f"mtlfast.{op}: no backend supports {dtype} on {device.type}")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no __torch_function__ of their own


def _route(tensors: tuple[torch.Tensor | None, ...]) -> str:
    """ "op", "function" or "kernel": see :func:`choose`."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: dynamo stops here
        return "op"
    grad = torch.is_grad_enabled()
    needs_grad = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "op"
        needs_grad = needs_grad or (grad and t.requires_grad)
    if torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None:
        return "op"
    return "function" if needs_grad else "kernel"


def runs_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may call its kernel without going through its ``torch.library`` op or autograd.

    True in plain eager inference and in an ordinary backward (grad mode off): plain tensors, none
    needing a gradient (or grad mode off), no torch.compile, jit tracing, functorch transform, or
    dispatch or torch-function mode that must see the op. The custom op's Python dispatch costs
    some 30 us a call, more than the kernel of a small call.
    """
    return _route(tensors) == "kernel"


def choose(
    kernel: Callable, function: Callable, op: Callable, *tensors: torch.Tensor | None
) -> Callable:
    """What an op's public function calls with its arguments, given its tensor arguments.

    ``kernel`` (the kernels directly) where :func:`runs_directly`; ``function`` (the ``apply`` of a
    ``torch.autograd.Function`` calling the kernels directly, :func:`autograd_function`) in plain
    eager autograd, where only autograd needs to see the op; ``op`` (the ``torch.library`` custom
    op) everywhere else: torch.compile, jit tracing, functorch transforms, dispatch and
    torch-function modes, tensor subclasses. The custom op's autograd costs some 90 us more per
    forward and backward than the Function's, which computes the same.
    """
    route = _route(tensors)
    return kernel if route == "kernel" else function if route == "function" else op


def autograd_function(
    name: str, forward: Callable, setup_context: Callable, backward: Callable
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` from the functions an op registers with
    ``register_autograd`` (``setup_context(ctx, inputs, output)``, ``backward(ctx, *grads)``)
    and its kernel-calling ``forward``: the op's autograd without the op, for :func:`choose`.

    Its forward takes ``ctx`` and calls setup_context itself: a Function with a
    ``setup_context`` method binds its arguments with ``inspect.signature`` on every call
    (some 50 us).
    """

    def forward_with_ctx(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward_with_ctx),
            "backward": staticmethod(backward),
        },
    )
