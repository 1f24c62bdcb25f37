"""The one rank-aware place for console output, progress bars and file writes.

Every process of a data-parallel run (``torch.distributed``) builds the same :class:`Runtime`;
only rank 0 prints, draws progress bars and writes files, so the trainer has no second code
path for distributed runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["Runtime", "atomic_write", "atomic_write_bytes"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a file system without directory handles: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells it (os.umask would race)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, mode: str = "wb", before_replace=None) -> None:
    """Writes ``path`` so that it is either the old file or the whole new one, whatever happens.

    ``write(file)`` fills a temporary file in the same directory; it is flushed and fsync'ed,
    then ``os.replace``d over ``path`` and the directory fsync'ed. ``before_replace`` (tests)
    runs between the two. A failure leaves the old file and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a run's files get the usual umask permissions
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> None:
    """:func:`atomic_write` of a whole text or byte string."""
    mode = "w" if isinstance(data, str) else "wb"
    atomic_write(path, lambda f: f.write(data), mode)


class Runtime:
    """Rank, world size and the main-process-only side effects of a run.

    Attributes: rank, world_size (from ``torch.distributed`` when it is initialised, else 0 and
    1), is_main (rank 0), show_progress (bars wanted and on the main process).
    """

    def __init__(self, progress: bool = True) -> None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world_size = dist.get_world_size() if initialised else 1
        self.is_main = self.rank == 0
        self.show_progress = progress and self.is_main

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on the main process only (to stdout, flushed)."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def warn(self, message: str) -> None:
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def progress(
        self, total: int | None, desc: str, initial: int = 0, unit: str = "step", leave: bool = True
    ):
        """A tqdm bar on the main process when bars are wanted and tqdm is installed, else a no-op."""
        if self.show_progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                return tqdm(
                    total=total,
                    desc=desc,
                    initial=initial,
                    unit=unit,
                    dynamic_ncols=True,
                    leave=leave,
                    file=sys.stderr,
                )
        return _NoBar()

    def write_json(self, path: str | os.PathLike, obj: Any) -> None:
        if self.is_main:
            atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        if self.is_main:
            atomic_write_bytes(path, text)


class _NoBar:
    """Stands in for a tqdm bar where none is drawn."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        pass
