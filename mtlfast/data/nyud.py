"""NYUD-v2 multi-task (795 train / 654 val) in the three layouts in circulation (no download)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ._io import DataFileError, read_mat, read_npy, read_png, read_rgb, require_file
from .transforms import ToTensor

__all__ = ["NYUD", "NYUD_LAYOUTS"]

TASKS = ("semseg", "normals", "edge", "depth")

# Per layout, per key: (folder, extension). "image" lists extensions to try in order.
NYUD_LAYOUTS = {
    # MTI-Net's NYUD_MT: everything but images and labels as NumPy arrays.
    "mtinet": {
        "image": ("images", (".jpg", ".png")),
        "semseg": ("segmentation", ".png"),
        "depth": ("depth", ".npy"),
        "normals": ("normals", ".npy"),
        "edge": ("edge", ".npy"),
    },
    # ATRC (and the repositories built on it): PNG images and labels, depth as NumPy.
    "atrc": {
        "image": ("images", (".png", ".jpg")),
        "semseg": ("segmentation", ".png"),
        "depth": ("depth", ".npy"),
        "normals": ("normals", ".png"),
        "edge": ("edge", ".png"),
    },
    # ASTMT's (fblib) NYUD_MT: labels and depth in .mat files, normals as JPEG.
    "astmt": {
        "image": ("images", (".jpg", ".png")),
        "semseg": ("segmentation", ".mat"),
        "depth": ("depth", ".mat"),
        "normals": ("normals", ".jpg"),
        "edge": ("edge", ".png"),
    },
}
_MAT_KEYS = {"semseg": "segmentation", "depth": "depth"}
# task -> (numpy dtype kinds its arrays may have, the largest class id), None: unchecked
_FILE_KINDS = {"depth": ("f", None), "semseg": ("uif", 255)}


class NYUD(torch.utils.data.Dataset):
    """NYUD-v2 for multi-task learning; ``ds[i]`` is a sample dict at the stored size
    (425x560 in these releases) with ``image`` (3,H,W) in [0,1], the requested targets,
    ``labeled`` (all True) and ``name``.

    Ids come from ``gt_sets/{split}.txt`` under ``root``. The file layout is detected from the
    first id (or forced with ``layout``), see :data:`NYUD_LAYOUTS`:

    - ``"mtinet"``: ``images/x.jpg``, ``segmentation/x.png``, ``depth/x.npy``,
      ``normals/x.npy``, ``edge/x.npy``;
    - ``"atrc"``: ``images/x.png``, ``segmentation/x.png``, ``depth/x.npy``, ``normals/x.png``,
      ``edge/x.png``;
    - ``"astmt"``: ``images/x.jpg``, ``segmentation/x.mat`` (variable ``segmentation``),
      ``depth/x.mat`` (variable ``depth``), ``normals/x.jpg``, ``edge/x.png``.

    Decoding, the same in every layout (our reading of the three releases' loaders):

    - ``semseg`` (H,W): stored 0 = unlabelled, 1-40 = the 40 classes; shifted by one, so
      classes are 0-39 and unlabelled becomes 255 (as MTI-Net, ATRC and ASTMT do).
    - ``depth`` (1,H,W): metres as stored (float); non-finite or non-positive values -> 0.
    - ``normals`` (3,H,W): float arrays are taken as vectors, 8-bit images decoded as
      ``2 * v / 255 - 1``; then scaled to unit length, with vectors shorter than 0.5 (e.g. a
      zero vector) set to 0 (invalid). Components are kept in the stored order and sign; the
      joint transforms assume x right and y down in the image.
    - ``edge`` (1,H,W): float arrays > 0.5, 8-bit images / 255 > 0.5.

    A missing or corrupt file raises ``FileNotFoundError`` / ``DataFileError`` naming it; when
    no layout matches, the error names the files each layout lacks.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        tasks: Sequence[str] = TASKS,
        transform=None,
        layout: str | None = None,
    ):
        self.root = os.fspath(root)
        self.split = split
        self.tasks = tuple(tasks)
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"NYUD has no task {t!r}; expected some of {TASKS}")
        self.transform = transform
        split_file = require_file(os.path.join(self.root, "gt_sets", f"{split}.txt"), "split list")
        with open(split_file) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        if not self.ids:
            raise ValueError(f"split list {split_file} is empty")
        if layout is not None and layout not in NYUD_LAYOUTS:
            raise ValueError(
                f"unknown NYUD layout {layout!r}; expected one of {tuple(NYUD_LAYOUTS)}"
            )
        self.layout = layout or self._detect_layout(self.ids[0])

    def _candidates(self, layout: str, key: str, name: str) -> list[str]:
        folder, exts = NYUD_LAYOUTS[layout][key]
        exts = (exts,) if isinstance(exts, str) else exts
        return [os.path.join(self.root, folder, name + e) for e in exts]

    def _detect_layout(self, name: str) -> str:
        def has(layout, key):
            return any(os.path.isfile(p) for p in self._candidates(layout, key, name))

        missing, complete = {}, []
        for layout, keys in NYUD_LAYOUTS.items():
            lacks = [
                self._candidates(layout, k, name)[0]
                for k in ("image", *self.tasks)
                if not has(layout, k)
            ]
            if lacks:
                missing[layout] = lacks
            else:
                # Several layouts can hold the requested tasks' files (they share some):
                # prefer the one that also explains the most of the other files.
                complete.append((sum(has(layout, k) for k in keys), layout))
        if complete:
            return max(complete, key=lambda c: c[0])[1]
        detail = "; ".join(f"{k} lacks {', '.join(v)}" for k, v in missing.items())
        raise FileNotFoundError(
            f"NYUD at {self.root}: no known layout has the files for {name!r} ({detail})"
        )

    def _file(self, key: str, name: str) -> str:
        paths = self._candidates(self.layout, key, name)
        for p in paths:
            if os.path.isfile(p):
                return p
        return require_file(paths[0], f"NYUD {key} file")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        name = self.ids[index]
        image_path = self._file("image", name)
        raw = {"image": read_rgb(image_path)}
        size = raw["image"].shape[:2]
        for task in self.tasks:
            path = self._file(task, name)
            raw[task] = _DECODE[task](self._read(task, path), path)
            if raw[task].shape[:2] != size:
                raise DataFileError(
                    f"{path}: size {raw[task].shape[:2]} differs from the image's {size}"
                    f" ({image_path})"
                )
        sample = ToTensor()(raw)
        sample["labeled"] = {t: True for t in self.tasks}
        sample["name"] = name
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _read(self, task: str, path: str) -> np.ndarray:
        # What each task's file may hold: depth is metres (float only: an int or bool depth
        # file is something else, cast silently it would be wrong); class ids, like every
        # 8-bit image, are at most 255 (a 16-bit PNG above it is not this dataset's label).
        kinds, max_value = _FILE_KINDS.get(task, (None, None))
        if path.endswith(".npy"):
            return read_npy(path, f"NYUD {task} array", kinds=kinds)
        if path.endswith(".mat"):
            return read_mat(path, _MAT_KEYS[task], f"NYUD {task} file", kinds, max_value)
        return read_png(path, f"NYUD {task} image", max_value=255)


def _plane(x: np.ndarray, path: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    elif x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise DataFileError(f"{path}: expected a single-channel (H,W) map, got shape {x.shape}")
    return x


def _semseg(x, path):
    x = _plane(x, path).astype(np.int64)
    return np.where(x == 0, 255, x - 1)


def _depth(x, path):
    x = _plane(x, path).astype(np.float32)
    return np.where(np.isfinite(x) & (x > 0), x, 0.0).astype(np.float32)


def _normals(x, path):
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[2] != 3:
        x = x.transpose(1, 2, 0)
    if x.ndim != 3 or x.shape[2] != 3:
        raise DataFileError(f"{path}: expected (H,W,3) normals, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = 2.0 * x.astype(np.float32) / 255.0 - 1.0
    x = np.nan_to_num(x.astype(np.float32))
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0.5, x / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def _edge(x, path):
    x = _plane(x, path)
    if np.issubdtype(x.dtype, np.integer):
        return (x.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    return (x.astype(np.float32) > 0.5).astype(np.float32)


_DECODE = {"semseg": _semseg, "depth": _depth, "normals": _normals, "edge": _edge}
