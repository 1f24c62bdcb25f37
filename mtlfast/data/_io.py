"""File readers that name the file in every error, so a bad file fails with its path instead of
deep inside a DataLoader worker."""

from __future__ import annotations

import contextlib
import os

import numpy as np

__all__ = ["DataFileError", "read_mat", "read_npy", "read_png", "read_rgb", "require_file"]


class DataFileError(OSError):
    """A dataset file exists but cannot be decoded (corrupt, truncated, wrong content)."""


def require_file(path: str, what: str = "file") -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    return path


@contextlib.contextmanager
def _reading(path: str, what: str):
    require_file(path, what)
    try:
        yield
    except (FileNotFoundError, DataFileError):
        raise
    except Exception as exc:  # decoders raise anything from ValueError to struct.error
        raise DataFileError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc


# No dataset array is complex, a Python object, a string or a record: such a file is not data.
_NEVER_DATA = "cOSUV"
_KIND_NAMES = {
    "b": "bool",
    "i": "signed int",
    "u": "unsigned int",
    "f": "float",
    "c": "complex",
    "O": "object",
    "S": "bytes",
    "U": "str",
    "V": "record",
}


def _check_array(
    data: np.ndarray,
    path: str,
    what: str,
    kinds: str | None,
    max_value: int | None,
    refuse: str = _NEVER_DATA,
) -> np.ndarray:
    """``data`` read from ``path``, checked: DataFileError naming the file when its dtype is not
    of ``kinds`` (numpy dtype kinds, e.g. "f"; default: any kind not in ``refuse``) or a value
    exceeds ``max_value``."""
    data = np.asarray(data)
    allowed = kinds if kinds is not None else "".join(k for k in _KIND_NAMES if k not in refuse)
    if data.dtype.kind not in allowed:
        names = ", ".join(_KIND_NAMES.get(k, k) for k in allowed)
        raise DataFileError(f"{what} {path} holds {data.dtype} values; expected {names}")
    if max_value is not None and data.size and data.max() > max_value:
        raise DataFileError(
            f"{what} {path} holds the value {data.max()} ({data.dtype}), above {max_value}: "
            f"not a label image of this dataset (a 16-bit PNG?)"
        )
    return data


def read_rgb(path: str, what: str = "image") -> np.ndarray:
    """An image file as (H,W,3) uint8 RGB."""
    from PIL import Image

    with _reading(path, what), Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_png(path: str, what: str = "label image", max_value: int | None = None) -> np.ndarray:
    """An image file as stored (palette indices, grey or RGB values): (H,W) or (H,W,C).

    ``max_value``: the largest value the file may hold (255 for 8-bit class ids: a 16-bit PNG
    with a value above it is not a label image); DataFileError naming the file otherwise.
    """
    from PIL import Image

    with _reading(path, what), Image.open(path) as im:
        return _check_array(np.asarray(im), path, what, None, max_value)


def read_mat(
    path: str,
    key: str,
    what: str = "MATLAB file",
    kinds: str | None = None,
    max_value: int | None = None,
) -> np.ndarray:
    """Variable ``key`` of a .mat file; DataFileError naming the file when its dtype kind is
    not in ``kinds`` (numpy kinds, e.g. "f"; default: refuse complex; MATLAB structs are
    object or record arrays) or a value exceeds ``max_value``."""
    from scipy.io import loadmat

    with _reading(path, what):
        data = loadmat(path)
        if key not in data:
            names = sorted(k for k in data if not k.startswith("__"))
            raise DataFileError(f"{what} {path} has no variable {key!r} (it has {names})")
        return _check_array(data[key], path, what, kinds, max_value, refuse="c")


def read_npy(path: str, what: str = "array", kinds: str | None = None) -> np.ndarray:
    """A .npy array; DataFileError naming the file when its dtype kind is not in ``kinds``
    (numpy kinds, e.g. "f" for depth in metres; default: refuse complex, object, str, record)."""
    with _reading(path, what):
        return _check_array(np.load(path, allow_pickle=False), path, what, kinds, None)
