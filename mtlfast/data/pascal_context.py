"""PASCAL-Context in the multi-task release used by ASTMT and MTI-Net (no download)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ._io import DataFileError, read_mat, read_png, read_rgb, require_file
from .tasks import IGNORE_INDEX
from .transforms import ToTensor

__all__ = ["HUMAN_PART_GROUPS", "PascalContext"]

# PASCAL-Part person part names -> ASTMT's six groups (0 is background):
# 1 head, 2 torso, 3 upper arm, 4 lower arm (with hand), 5 upper leg, 6 lower leg (with foot).
HUMAN_PART_GROUPS = {
    "hair": 1,
    "head": 1,
    "lear": 1,
    "rear": 1,
    "lebrow": 1,
    "rebrow": 1,
    "leye": 1,
    "reye": 1,
    "mouth": 1,
    "nose": 1,
    "neck": 2,
    "torso": 2,
    "luarm": 3,
    "ruarm": 3,
    "llarm": 4,
    "rlarm": 4,
    "lhand": 4,
    "rhand": 4,
    "luleg": 5,
    "ruleg": 5,
    "llleg": 6,
    "rlleg": 6,
    "lfoot": 6,
    "rfoot": 6,
}
PERSON_CLASS = 15  # PASCAL VOC class index of person in PASCAL-Part's `class_ind`
TASKS = ("semseg", "parts", "saliency", "normals", "edge")


class PascalContext(torch.utils.data.Dataset):
    """PASCAL-Context multi-task (ASTMT / MTI-Net release): 4998 train, 5105 val images.

    ``ds[i]`` is a sample dict: ``image`` (3,H,W) float in [0,1] and the requested targets at
    the image's own size (H,W vary: crop or resize before batching), plus ``labeled`` and
    ``name`` (the image id). Files under ``root``, for image id ``x``:

    - image: ``JPEGImages/x.jpg``; ids: ``ImageSets/Context/{split}.txt``.
    - ``semseg`` (H,W): ``semseg/VOC12/x.png`` if present, else ``semseg/pascal-context/x.png``;
      palette indices kept as they are (21 classes, 0 background, 255 ignore).
    - ``parts`` (H,W): ``human_parts/x.mat``, a PASCAL-Part ``anno`` struct whose ``objects``
      carry ``class_ind`` and ``parts`` (each ``part_name``, ``mask``). Part masks of person
      objects (``class_ind`` 15) are painted with :data:`HUMAN_PART_GROUPS` (0 background,
      1-6 head/torso/upper arm/lower arm/upper leg/lower leg), later parts over earlier ones as
      in ASTMT. An image with no person object is all 255 and ``labeled["parts"]`` is False;
      an image with people but no part masks is all background, as in ASTMT.
    - ``saliency`` (1,H,W): ``sal_distill/x.png`` / 255 thresholded at 0.5 (> 0.5 is salient).
    - ``normals`` (3,H,W): ``normals_distill/x.png`` decoded as ``2 * v / 255 - 1`` and scaled
      to unit length; kept only on pixels whose PASCAL-Context label (``LabelMap`` in
      ``pascal-context/trainval/x.mat``) is one of the NYU-compatible classes, the rest 0
      (invalid). Those classes are the names in ``json/nyu_classes.json`` (except
      ``unknown``) looked up in ``json/context_classes.json`` (name -> LabelMap id), plus
      ``tvmonitor``, as in the release; or pass ``normals_classes`` (LabelMap ids) directly.
    - ``edge`` (1,H,W): boundaries of ``LabelMap`` (non-zero 4-neighbour Laplacian, mirrored
      border) thinned to one pixel (``skimage.morphology.thin``), as in ASTMT.

    A missing or corrupt file raises ``FileNotFoundError`` / ``DataFileError`` naming it.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        tasks: Sequence[str] = TASKS,
        transform=None,
        normals_classes: Iterable[int] | None = None,
    ):
        self.root = os.fspath(root)
        self.split = split
        self.tasks = tuple(tasks)
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"PascalContext has no task {t!r}; expected some of {TASKS}")
        self.transform = transform
        split_file = os.path.join(self.root, "ImageSets", "Context", f"{split}.txt")
        require_file(split_file, "split list")
        with open(split_file) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        self._normals_classes = None
        if "normals" in self.tasks:
            self._normals_classes = (
                np.array(sorted(int(c) for c in normals_classes))
                if normals_classes is not None
                else self._nyu_compatible_classes()
            )

    def _nyu_compatible_classes(self) -> np.ndarray:
        files = [
            os.path.join(self.root, "json", n) for n in ("nyu_classes.json", "context_classes.json")
        ]
        loaded = []
        for path in files:
            require_file(path, "class list for the normals mask")
            try:
                with open(path) as f:
                    loaded.append(json.load(f))
            except (OSError, ValueError) as exc:
                raise DataFileError(f"cannot read class list {path}: {exc}") from exc
        nyu, context = loaded
        ids = [context[name] for name in nyu if name in context and name != "unknown"]
        ids.append(context["tvmonitor"])
        return np.array(sorted(int(i) for i in ids))

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def __getitem__(self, index: int) -> dict:
        name = self.ids[index]
        image = read_rgb(self._path("JPEGImages", f"{name}.jpg"))
        height, width = image.shape[:2]
        raw = {"image": image}
        labeled = {}
        label_map = None
        if "edge" in self.tasks or "normals" in self.tasks:
            label_map = self._label_map(name, (height, width))
        for task in self.tasks:
            labeled[task] = True
            if task == "semseg":
                raw[task] = self._semseg(name)
            elif task == "parts":
                parts = self._parts(name, (height, width))
                labeled[task] = parts is not None
                raw[task] = parts if parts is not None else np.full((height, width), IGNORE_INDEX)
            elif task == "saliency":
                raw[task] = self._saliency(name)
            elif task == "normals":
                raw[task] = self._normals(name, label_map)
            elif task == "edge":
                raw[task] = _thin_boundaries(label_map)
            _check_size(raw[task], (height, width), self._task_file(task, name))
        sample = ToTensor()(raw)
        sample["labeled"] = labeled
        sample["name"] = name
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _task_file(self, task: str, name: str) -> str:
        return {
            "semseg": self._semseg_path(name),
            "parts": self._path("human_parts", f"{name}.mat"),
            "saliency": self._path("sal_distill", f"{name}.png"),
            "normals": self._path("normals_distill", f"{name}.png"),
            "edge": self._path("pascal-context", "trainval", f"{name}.mat"),
        }[task]

    def _semseg_path(self, name: str) -> str:
        voc = self._path("semseg", "VOC12", f"{name}.png")
        return voc if os.path.isfile(voc) else self._path("semseg", "pascal-context", f"{name}.png")

    def _semseg(self, name: str) -> np.ndarray:
        path = self._semseg_path(name)
        label = read_png(path, "semantic label image", max_value=255)
        if label.ndim != 2:
            raise DataFileError(
                f"semantic label image {path} is not single-channel (shape {label.shape})"
            )
        return label

    def _label_map(self, name: str, size) -> np.ndarray:
        path = self._path("pascal-context", "trainval", f"{name}.mat")
        label_map = read_mat(path, "LabelMap", "PASCAL-Context label map")
        _check_size(label_map, size, path)
        return label_map

    def _parts(self, name: str, size) -> np.ndarray | None:
        path = self._path("human_parts", f"{name}.mat")
        anno = read_mat(path, "anno", "PASCAL-Part annotation")
        try:
            objects = _field(anno[0, 0], "objects", 1)
            objects = objects[0] if objects.size else []
            target = None
            for obj in objects:
                if int(np.asarray(_field(obj, "class_ind", 1)).squeeze()) != PERSON_CLASS:
                    continue
                if target is None:
                    target = np.zeros(size, dtype=np.int64)
                parts = _field(obj, "parts", 3)
                for part in parts[0] if parts.size else []:
                    part_name = str(np.asarray(_field(part, "part_name", 0)).squeeze())
                    if part_name not in HUMAN_PART_GROUPS:
                        raise DataFileError(
                            f"PASCAL-Part annotation {path}: unknown person part {part_name!r}"
                        )
                    mask = np.asarray(_field(part, "mask", 1)).astype(bool)
                    _check_size(mask, size, path)
                    target[mask] = HUMAN_PART_GROUPS[part_name]
        except DataFileError:
            raise
        except (IndexError, KeyError, ValueError, TypeError) as exc:
            raise DataFileError(
                f"PASCAL-Part annotation {path} does not have the anno.objects.parts layout: {exc}"
            ) from exc
        return target

    def _saliency(self, name: str) -> np.ndarray:
        sal = read_png(self._path("sal_distill", f"{name}.png"), "saliency image", max_value=255)
        sal = sal.astype(np.float32)
        if sal.ndim == 3:
            sal = sal[..., 0]
        return (sal / 255.0 > 0.5).astype(np.float32)

    def _normals(self, name: str, label_map: np.ndarray) -> np.ndarray:
        path = self._path("normals_distill", f"{name}.png")
        raw = read_png(path, "normals image", max_value=255)
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise DataFileError(f"normals image {path} is not RGB (shape {raw.shape})")
        normals = 2.0 * raw[..., :3].astype(np.float32) / 255.0 - 1.0
        norm = np.linalg.norm(normals, axis=-1, keepdims=True)
        valid = np.isin(label_map, self._normals_classes) & (norm[..., 0] > 0.5)
        return np.where(valid[..., None], normals / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def _field(record, name: str, position: int):
    names = getattr(getattr(record, "dtype", None), "names", None)
    return record[name] if names and name in names else record[position]


def _check_size(array: np.ndarray, size, path: str) -> None:
    if tuple(np.shape(array)[:2]) != tuple(size):
        raise DataFileError(
            f"{path}: size {tuple(np.shape(array)[:2])} differs from the image's {tuple(size)}"
        )


def _thin_boundaries(label_map: np.ndarray) -> np.ndarray:
    from scipy.ndimage import convolve
    from skimage.morphology import thin

    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    laplacian = convolve(label_map.astype(np.float64), kernel, mode="mirror")
    return thin(np.abs(laplacian) > 0).astype(np.float32)
