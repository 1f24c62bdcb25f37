"""Which strategy the memory engine is running now, for modules that adapt to it."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_STRATEGY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mtlfast_engine_strategy", default=None
)


def current_strategy() -> str | None:
    """The ``strategy`` of the :func:`~mtlfast.engine.multi_branch_step` running now ("recompute"
    or "naive"), None outside one. A head may read it in its forward: MTI-Net's decoder then
    recomputes its per-task layers in backward too, so that its memory stays flat in the number
    of tasks as the engine's does."""
    return _STRATEGY.get()


@contextlib.contextmanager
def running(strategy: str) -> Iterator[None]:
    token = _STRATEGY.set(strategy)
    try:
        yield
    finally:
        _STRATEGY.reset(token)
