"""Checkpoints: atomic to write, plain data to read (``torch.load(..., weights_only=True)``).

A checkpoint is a dict of plain containers, numbers, strings and tensors: ``format``, ``version``
(of mtlfast), ``step``, ``model`` (the state dict), ``optimizer``, ``scheduler``, ``scaler``,
``rng`` (Python, NumPy, torch CPU and every CUDA device), ``data`` (sampler position and seed),
``config`` (the resolved config) and ``trainer`` (best score, evaluation history). Loading one
never executes code: no pickled class, function or NumPy array is accepted.
"""

from __future__ import annotations

import io
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._runtime import atomic_write

__all__ = [
    "CheckpointError",
    "capture_rng",
    "checkpoint_files",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "mtlfast-checkpoint-1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")

#: called between writing a checkpoint's temporary file and moving it into place (tests kill
#: the process there); None in normal use
_before_replace = None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``, directory fsync).

    A process killed at any moment leaves either the previous file or the new one, whole.
    """
    state = {"format": FORMAT, **state}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialised first, so a failure leaves no partial file behind
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), before_replace=_before_replace)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, corrupt, not a mtlfast checkpoint, or holding objects other
            than plain data (a pickle that would run code is refused without running it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for truncation and refused globals)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a mtlfast checkpoint dict"
        )
    if "model" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model' state dict")
    if state.get("format", FORMAT) != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {state.get('format')!r}; expected {FORMAT!r}"
        )
    return state


def checkpoint_files(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the ``step_<N>.pt`` files in ``directory``, newest first."""
    directory = Path(directory)
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _STEP_FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest_checkpoint(
    directory: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``directory`` that loads, with a warning for each newer one that
    does not (a run killed while writing leaves none, but disks fail); None when there is none."""
    for _, path in checkpoint_files(directory):
        try:
            return path, load_checkpoint(path, map_location)
        except (CheckpointError, OSError) as e:
            warnings.warn(f"{e}; falling back to an older checkpoint", stacklevel=2)
    return None


# --------------------------------------------------------------------------------------------
# random number generators as plain data


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors, lists and numbers."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undoes :func:`capture_rng` (CUDA states only where devices match in number)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
