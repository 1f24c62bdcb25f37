"""File readers that name the file in every error, so a bad file fails with its path instead of
deep inside a DataLoader worker."""

from __future__ import annotations

import contextlib
import os

import numpy as np

__all__ = ["DataFileError", "read_rgb", "read_png", "read_mat", "read_npy", "require_file"]


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


def read_rgb(path: str, what: str = "image") -> np.ndarray:
    """An image file as (H,W,3) uint8 RGB."""
    from PIL import Image

    with _reading(path, what), Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_png(path: str, what: str = "label image") -> np.ndarray:
    """An image file as stored (palette indices, grey or RGB values): (H,W) or (H,W,C)."""
    from PIL import Image

    with _reading(path, what), Image.open(path) as im:
        return np.asarray(im)


def read_mat(path: str, key: str, what: str = "MATLAB file") -> np.ndarray:
    """Variable ``key`` of a .mat file."""
    from scipy.io import loadmat

    with _reading(path, what):
        data = loadmat(path)
        if key not in data:
            names = sorted(k for k in data if not k.startswith("__"))
            raise DataFileError(f"{what} {path} has no variable {key!r} (it has {names})")
        return data[key]


def read_npy(path: str, what: str = "array") -> np.ndarray:
    with _reading(path, what):
        return np.load(path, allow_pickle=False)
