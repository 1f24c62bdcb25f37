"""Joint transforms: every target of a sample moves with its image.

All transforms take and return a sample dict in the layout of ``mtlfast.data`` (``image``
(3,H,W) float; ``semseg``/``parts`` (H,W) int64; ``saliency``/``edge``/``depth`` (1,H,W);
``normals`` (3,H,W)); keys they do not know (``labeled``, names) pass through unchanged.

- Labels and the other targets are resampled with nearest neighbours, so class ids stay ids,
  255 stays ignore, invalid depth (0) and invalid normals (0 vector) stay invalid, and no depth
  is ever averaged across an occlusion boundary. Only the image is interpolated (bilinear).
- Pixels coming from outside the input (crop padding, rotation corners) are ignore: 255 for
  semseg/parts/saliency/edge, 0 for normals and depth, 0 for the image.
- Normals are camera-frame vectors with x along the image's columns and y along its rows
  (x right, y down): a horizontal flip negates x, an in-plane rotation rotates (x, y) with the
  content. Scaling leaves normals and depth values unchanged (a change of focal length).

Random transforms draw from ``generator`` (a ``torch.Generator`` or ``numpy.random.Generator``)
and, without one, from torch's global generator (seeded per DataLoader worker), so a given
generator state gives the same output. A generator passed here is copied into every DataLoader
worker with the same state, so with workers leave it out (or reseed it in ``worker_init_fn``)
unless identical augmentations across workers are wanted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .tasks import IGNORE_INDEX

__all__ = [
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRotation",
    "RandomScale",
    "Resize",
    "ToTensor",
]

_LABELS = ("semseg", "parts")
_BINARY = ("saliency", "edge")
_FILL = {
    "semseg": IGNORE_INDEX,
    "parts": IGNORE_INDEX,
    "saliency": float(IGNORE_INDEX),
    "edge": float(IGNORE_INDEX),
    "normals": 0.0,
    "depth": 0.0,
    "image": 0.0,
}


def _uniform(generator, low: float, high: float) -> float:
    if generator is None:
        u = torch.rand(()).item()
    elif isinstance(generator, torch.Generator):
        u = torch.rand((), generator=generator).item()
    elif isinstance(generator, np.random.Generator):
        u = float(generator.random())
    else:
        raise TypeError(
            f"generator must be a torch.Generator or numpy.random.Generator, got {type(generator)}"
        )
    return low + (high - low) * u


def _spatial_keys(sample: dict):
    return [k for k in ("image", *_LABELS, *_BINARY, "normals", "depth") if k in sample]


def _as_chw(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (x[None], True) if x.dim() == 2 else (x, False)


def _size_arg(owner: str, size) -> tuple[int, int]:
    """``size``, an int or a pair (H, W) of ints >= 1, as a pair; ValueError naming it otherwise."""
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(
            f"{owner}: size must be an int >= 1 or a pair (H, W) of ints >= 1, got {size!r}"
        )
    return int(pair[0]), int(pair[1])


def _finite_floats(owner: str, name: str, values, expected: str) -> tuple[float, ...]:
    """``values`` as finite floats; ValueError naming ``name`` otherwise."""
    try:
        out = tuple(float(v) for v in (values if isinstance(values, Sequence) else [values]))
    except (TypeError, ValueError):
        out = (math.nan,)
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{owner}: {name} must be {expected}, got {values!r}")
    return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample


class ToTensor:
    """NumPy arrays in file layout -> the sample layout.

    ``image`` (H,W,3) uint8 (scaled to [0,1]) or float; ``semseg``/``parts`` (H,W) any int or
    float -> int64; ``saliency``/``edge``/``depth`` (H,W) or (H,W,1) -> (1,H,W) float32;
    ``normals`` (H,W,3) -> (3,H,W) float32. Tensors are left as they are.
    """

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        for k in _spatial_keys(sample):
            x = sample[k]
            if isinstance(x, torch.Tensor):
                continue
            x = np.asarray(x)
            if k == "image":
                scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
                chw = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
                out[k] = torch.from_numpy(chw * scale)
            elif k in _LABELS:
                # only a trailing channel axis goes: squeeze() would also drop H or W of 1
                plane = x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x
                out[k] = torch.from_numpy(np.ascontiguousarray(plane).astype(np.int64))
            elif k == "normals":
                chw = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
                out[k] = torch.from_numpy(chw)
            else:
                plane = np.ascontiguousarray(x.reshape(1, *x.shape[:2]), dtype=np.float32)
                out[k] = torch.from_numpy(plane)
        return out


class Normalize:
    """Standardise the image per channel: ``(image - mean) / std``; targets untouched."""

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        mean = _finite_floats("Normalize", "mean", mean, "finite numbers (one per channel)")
        std = _finite_floats("Normalize", "std", std, "finite numbers > 0 (one per channel)")
        if min(std) <= 0:
            raise ValueError(
                f"Normalize: std must be finite numbers > 0 (one per channel), got {std}"
            )
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise ValueError(
                f"Normalize: mean and std must have one value per channel (or one for all), "
                f"got {len(mean)} and {len(std)} values"
            )
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        image = sample["image"]
        values = max(len(self.mean), len(self.std))
        if values != 1 and (image.dim() < 3 or image.shape[-3] != values):
            raise ValueError(
                f"Normalize: mean and std have {values} values (one per channel) but the image "
                f"has shape {tuple(image.shape)}, expected (..., {values}, H, W)"
            )
        out["image"] = (image - self.mean) / self.std
        return out


def _resize(sample: dict, size: tuple[int, int]) -> dict:
    out = dict(sample)
    height, width = sample["image"].shape[-2:]
    for k in _spatial_keys(sample):
        x, squeezed = _as_chw(sample[k])
        if k == "image":
            y = F.interpolate(
                x[None],
                size=size,
                mode="bilinear",
                align_corners=False,
                antialias=size[0] < height or size[1] < width,
            )[0]
        else:
            y = F.interpolate(x[None].to(torch.float32), size=size, mode="nearest-exact")
            y = y[0].to(x.dtype)
        out[k] = y[0] if squeezed else y
    return out


class Resize:
    """Resize to a fixed (H, W): bilinear image, nearest targets."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _size_arg("Resize", size)

    def __call__(self, sample: dict) -> dict:
        return _resize(sample, self.size)


class RandomScale:
    """Rescale by a factor drawn uniformly from ``scales`` = (low, high), or chosen from a list
    of three or more factors; the new size is rounded to whole pixels."""

    def __init__(self, scales: Sequence[float] = (0.5, 2.0), generator=None):
        expected = "(low, high) with 0 < low <= high, or a list of three or more factors > 0"
        self.scales = _finite_floats("RandomScale", "scales", scales, expected)
        if (
            len(self.scales) < 2
            or min(self.scales) <= 0
            or (len(self.scales) == 2 and self.scales[0] > self.scales[1])
        ):
            raise ValueError(f"RandomScale: scales must be {expected}, got {scales!r}")
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        if len(self.scales) == 2:
            s = _uniform(self.generator, *self.scales)
        else:
            pick = int(_uniform(self.generator, 0, len(self.scales)))
            s = self.scales[min(pick, len(self.scales) - 1)]
        height, width = sample["image"].shape[-2:]
        return _resize(sample, (max(1, round(height * s)), max(1, round(width * s))))


class RandomCrop:
    """Crop a random (H, W) window; an input smaller than the window is padded (bottom/right)
    with ignore values first."""

    def __init__(self, size: int | Sequence[int], generator=None):
        self.size = _size_arg("RandomCrop", size)
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        th, tw = self.size
        height, width = sample["image"].shape[-2:]
        ph, pw = max(th - height, 0), max(tw - width, 0)
        top = int(_uniform(self.generator, 0, height + ph - th + 1))
        left = int(_uniform(self.generator, 0, width + pw - tw + 1))
        top, left = min(top, height + ph - th), min(left, width + pw - tw)
        for k in _spatial_keys(sample):
            x = sample[k]
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), value=_FILL[k])
            out[k] = x[..., top : top + th, left : left + tw].contiguous()
        return out


def hflip(sample: dict) -> dict:
    """Mirror left-right; normals' x component changes sign."""
    out = dict(sample)
    for k in _spatial_keys(sample):
        out[k] = sample[k].flip(-1)
    if "normals" in sample:
        n = out["normals"].clone()
        n[0] = -n[0]
        out["normals"] = n
    return out


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator=None):
        values = _finite_floats("RandomHorizontalFlip", "p", p, "a probability in [0, 1]")
        self.p = values[0]
        if len(values) != 1 or not isinstance(p, numbers.Real) or not 0.0 <= self.p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be a probability in [0, 1], got {p!r}")
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        return hflip(sample) if _uniform(self.generator, 0.0, 1.0) < self.p else sample


def rotate(sample: dict, degrees: float) -> dict:
    """Rotate about the image centre by ``degrees``, counter-clockwise as displayed, keeping
    the size; corners that come from outside are ignore; normals' (x, y) rotate with it."""
    out = dict(sample)
    height, width = sample["image"].shape[-2:]
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # Output pixel p samples the input at M p (pixel units about the centre); with y down, the
    # content turning counter-clockwise on screen means M = [[c, -s], [s, c]].
    m = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    to_norm = torch.diag(torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64))
    theta = torch.zeros(1, 2, 3, dtype=torch.float64)
    theta[0, :, :2] = to_norm @ m @ torch.linalg.inv(to_norm)
    grid = F.affine_grid(theta, (1, 1, height, width), align_corners=False).to(torch.float32)
    inside = (
        F.grid_sample(
            torch.ones(1, 1, height, width),
            grid,
            mode="nearest",
            padding_mode="zeros",
            align_corners=False,
        )[0, 0]
        > 0.5
    )
    for k in _spatial_keys(sample):
        x, squeezed = _as_chw(sample[k])
        mode = "bilinear" if k == "image" else "nearest"
        y = F.grid_sample(
            x[None].to(torch.float32), grid, mode=mode, padding_mode="zeros", align_corners=False
        )[0]
        y = torch.where(inside, y, torch.as_tensor(float(_FILL[k]))).to(x.dtype)
        out[k] = y[0] if squeezed else y
    if "normals" in sample:
        n = out["normals"]
        # Vectors turn with the content: v' = M^T v.
        nx, ny = n[0], n[1]
        out["normals"] = torch.stack([c * nx + s * ny, -s * nx + c * ny, n[2]])
    return out


class RandomRotation:
    """Rotate by an angle drawn uniformly from ``degrees`` = (low, high), or (-d, d) for a
    number ``d``."""

    def __init__(self, degrees: float | Sequence[float] = 10.0, generator=None):
        expected = "a finite number d >= 0 (for (-d, d)) or a pair (low, high) with low <= high"
        values = _finite_floats("RandomRotation", "degrees", degrees, expected)
        if np.isscalar(degrees) and values[0] >= 0:
            values = (-values[0], values[0])
        if len(values) != 2 or values[0] > values[1]:
            raise ValueError(f"RandomRotation: degrees must be {expected}, got {degrees!r}")
        self.degrees = values
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        return rotate(sample, _uniform(self.generator, *self.degrees))
