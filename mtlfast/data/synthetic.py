"""Procedural indoor scenes with exact ground truth for all six tasks (the embedded default).

Each sample is a room (floor, walls, ceiling) holding a few spheres, boxes and cylinders at
random positions, sizes, yaws and colours, seen by a pinhole camera pitched down towards the
floor. Rays are cast with vectorised NumPy, all pixels at once per primitive (an object only
against the rays that meet its bounding sphere), and the nearest hit gives all targets from
the same geometry:

- ``depth`` (1,H,W): z-depth in metres in the camera frame (never 0: every ray hits the room).
- ``normals`` (3,H,W): the analytic unit normal of the hit surface in the camera frame
  (x right, y down, z forward, OpenCV), oriented towards the camera. It is the normal of the
  surface that ``depth`` samples, so normals from back-projected depth agree on smooth parts.
- ``semseg`` (H,W): 0 floor, 1 wall (walls and ceiling), 2 + k the k-th entry of ``shapes``.
- ``parts`` (H,W): 0 off objects; each shape has two parts, ids ``1 + 2k`` and ``2 + 2k``:
  sphere upper / lower half, box top face / side faces, cylinder top cap / side (see
  ``part_names``).
- ``saliency`` (1,H,W): 1 on objects, 0 on the room.
- ``edge`` (1,H,W): one-pixel boundaries (marked on the upper/left pixel) of the semantic map
  and of every object's outline. Objects are convex, so their outlines are exactly the depth
  discontinuities; room surfaces meet without one (a wall-ceiling crease is no edge), and two
  objects that intersect also get their intersection curve.
- ``image`` (3,H,W) in [0,1]: Lambertian shading from a point light plus ambient, over per-class
  albedos with per-object jitter, a checkered floor and striped walls, plus uniform noise.

A sample is a pure function of ``(seed, index)``. Throughput with all six tasks, measured with
``OMP_NUM_THREADS=1 python -m mtlfast.data --size 128 --count 300`` (and ``--size 256
--count 100``) on a shared 2-core AMD EPYC whose load average was about 4.4 from other jobs
(so this process had roughly half a core): 125-164 images/s at 128x128 and 38-40 images/s at
256x256 over three runs; ``--workers 2`` gave 154 and 31 on the same saturated machine. A
256x256 image costs about 25 ms of one loaded core, a third of it shading.

Partial labels (``labels``): ``None`` labels every task; ``"random"`` labels each task with
probability ``label_prob`` (at least one per sample); a list of task tuples makes sample ``i``
come from source dataset ``i % len(labels)`` (UberNet Table 4), labelled for that source's
tasks only. Unlabelled targets are kept in the sample but filled with their ignore value
(255 for semseg/parts/saliency/edge, 0 for normals/depth), so every sample has the same keys
and shapes and ``torch.utils.data.default_collate`` or :func:`mtlfast.data.collate` batches them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .tasks import TASKS, ignore_target, label_boundaries

__all__ = ["SyntheticScenes"]

SHAPES = ("sphere", "box", "cylinder")
_PART_SUFFIXES = {
    "sphere": ("upper", "lower"),
    "box": ("top", "side"),
    "cylinder": ("top", "side"),
}
# Base albedo per shape; objects jitter around it, so colour is a cue but not the only one.
_SHAPE_COLOURS = {
    "sphere": (0.80, 0.25, 0.20),
    "box": (0.25, 0.70, 0.30),
    "cylinder": (0.25, 0.35, 0.85),
}


class SyntheticScenes(torch.utils.data.Dataset):
    """Rendered rooms with primitives; ``ds[i]`` is a sample dict (see the module docstring).

    Args:
        num_samples: length of the dataset.
        size: (H, W) or an int for square images.
        seed: base seed; sample ``i`` depends only on ``(seed, i)``.
        tasks: targets to include (default all six).
        shapes: object classes, a subset of ``("sphere", "box", "cylinder")`` in any order;
            semseg has ``2 + len(shapes)`` classes, parts ``1 + 2 * len(shapes)``.
        objects: (min, max) number of objects per scene, inclusive.
        noise: standard deviation of the (uniform) image noise.
        labels: ``None``, ``"random"`` or a list of task tuples (source datasets).
        label_prob: probability that a task is labelled, with ``labels="random"``.
        transform: callable applied to the sample dict.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        size: int | Sequence[int] = 128,
        seed: int = 0,
        tasks: Sequence[str] = TASKS,
        shapes: Sequence[str] = SHAPES,
        objects: tuple[int, int] = (2, 5),
        noise: float = 0.02,
        labels: None | str | Sequence[Sequence[str]] = None,
        label_prob: float = 0.5,
        transform=None,
    ):
        self.num_samples = int(num_samples)
        self.size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 2:
            raise ValueError(f"size must be an int or (H, W) with both >= 2, got {size!r}")
        self.seed = int(seed)
        self.tasks = tuple(tasks)
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; expected some of {TASKS}")
        self.shapes = tuple(shapes)
        distinct = len(set(self.shapes)) == len(self.shapes)
        if not self.shapes or not distinct or any(s not in SHAPES for s in self.shapes):
            raise ValueError(f"shapes must be distinct entries of {SHAPES}, got {shapes!r}")
        if not 0 <= objects[0] <= objects[1]:
            raise ValueError(f"objects must be (min, max) with 0 <= min <= max, got {objects!r}")
        self.objects = (int(objects[0]), int(objects[1]))
        self.noise = float(noise)
        if labels is not None and labels != "random":
            labels = [tuple(src) for src in labels]
            if not labels:
                raise ValueError("labels: the list of source datasets is empty")
            for src in labels:
                for t in src:
                    if t not in self.tasks:
                        raise ValueError(
                            f"labels: source {src!r} names task {t!r} not in tasks {self.tasks}"
                        )
        self.labels = labels
        self.label_prob = float(label_prob)
        self.transform = transform
        self.class_names = ("floor", "wall") + self.shapes
        self.part_names = ("background",) + tuple(
            f"{s}_{p}" for s in self.shapes for p in _PART_SUFFIXES[s]
        )
        self.num_classes = len(self.class_names)
        self.num_parts = len(self.part_names)
        height, width = self.size
        # Horizontal field of view of about 64 degrees whatever the resolution.
        self.focal = 0.8 * width
        self.principal_point = ((width - 1) / 2.0, (height - 1) / 2.0)
        self._rays = None  # (H*W, 3) camera rays, built on first render (once per worker)
        self._rays_sq = None

    def __len__(self) -> int:
        return self.num_samples

    def rays(self) -> np.ndarray:
        """Camera-frame ray directions with unit z: (H, W, 3) float64; point = depth * ray."""
        height, width = self.size
        cx, cy = self.principal_point
        v, u = np.mgrid[0:height, 0:width].astype(np.float64)
        return np.stack([(u - cx) / self.focal, (v - cy) / self.focal, np.ones_like(u)], axis=-1)

    def labeled(self, index: int) -> dict[str, bool]:
        """Which tasks sample ``index`` is labelled for."""
        if self.labels is None:
            return {t: True for t in self.tasks}
        if self.labels == "random":
            rng = np.random.default_rng([self.seed, index, 1])
            flags = rng.random(len(self.tasks)) < self.label_prob
            if not flags.any():
                flags[rng.integers(len(self.tasks))] = True
            return {t: bool(f) for t, f in zip(self.tasks, flags)}
        source = self.labels[index % len(self.labels)]
        return {t: t in source for t in self.tasks}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        scene = self.render(index)
        height, width = self.size
        labeled = self.labeled(index)
        sample = {"image": torch.from_numpy(scene["image"])}
        for task in self.tasks:
            if labeled[task]:
                sample[task] = torch.from_numpy(scene[task])
            else:
                sample[task] = ignore_target(task, height, width)
        sample["labeled"] = labeled
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def render(self, index: int) -> dict[str, np.ndarray]:
        """All targets of sample ``index`` as NumPy arrays in the sample layout, plus
        ``instance`` (H,W) int64: 0 floor, 1 ceiling, 2-4 walls, 5 + j the j-th object."""
        rng = np.random.default_rng([self.seed, index])
        height, width = self.size
        if self._rays is None:
            # float32 casting is accurate to far below a pixel at room scale and halves the
            # memory traffic of every pass.
            self._rays = self.rays().reshape(-1, 3).astype(np.float32)
            self._rays_sq = np.einsum("pi,pi->p", self._rays, self._rays)
        d_cam = self._rays
        pitch = rng.uniform(0.12, 0.35)
        c, s = math.cos(pitch), math.sin(pitch)
        # Columns are the camera axes in the world frame (world y points down, like the camera's).
        cam_to_world = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]], dtype=np.float32)
        d = d_cam @ cam_to_world.T
        cam_h = rng.uniform(1.2, 1.8)
        room_h = rng.uniform(2.6, 3.2)
        back = rng.uniform(5.5, 8.0)
        half_w = rng.uniform(2.5, 4.0)

        with np.errstate(divide="ignore", invalid="ignore"):
            # Room planes (floor, ceiling, back, left, right wall): the camera is inside the
            # room, so the nearest positive hit of the five is the room surface of every pixel.
            axes = np.array([1, 1, 2, 0, 0])
            coords = np.array([cam_h, cam_h - room_h, back, -half_w, half_w], dtype=np.float32)
            plane_normals = np.array(
                [[0, -1, 0], [0, 1, 0], [0, 0, -1], [1, 0, 0], [-1, 0, 0]], dtype=np.float32
            )
            t_planes = coords / d[:, axes]
            t_planes[~(t_planes > 0)] = np.inf
            inst = np.argmin(t_planes, axis=1)
            t_best = t_planes[np.arange(d.shape[0]), inst]
            normal = plane_normals[inst]
            part = np.zeros(d.shape[0], dtype=np.int64)

            objects = self._place_objects(rng, cam_h, back, half_w)
            d_sq = self._rays_sq  # rotation keeps lengths
            for j, obj in enumerate(objects):
                # Cast only the rays that meet the object's bounding sphere: objects cover a
                # small part of the image, and this test is as cheap as one sphere test.
                centre, bound = obj["bound"]
                centre = centre.astype(d.dtype)
                dc = d @ centre
                idx = np.flatnonzero(dc * dc - d_sq * (centre @ centre - bound * bound) >= 0)
                if idx.size == 0:
                    continue
                t, n, sub = _INTERSECT[obj["shape"]](d[idx], obj)
                closer = t < t_best[idx]
                sel = idx[closer]
                t_best[sel] = t[closer]
                normal[sel] = n[closer]
                inst[sel] = 5 + j
                part[sel] = 1 + 2 * self.shapes.index(obj["shape"]) + sub[closer]

        depth_world = t_best  # ray direction has unit camera-z, so t is the z-depth
        points = d * depth_world[:, None]
        n_cam = normal @ cam_to_world  # world -> camera is the transpose
        facing = np.einsum("pi,pi->p", n_cam, d_cam) > 0
        n_cam[facing] *= -1
        # Hit points carry float32 rounding; renormalise so normals are unit to float precision.
        n_cam /= np.sqrt(np.einsum("pi,pi->p", n_cam, n_cam))[:, None]

        semseg = np.where(inst == 0, 0, 1)
        obj_ids = inst - 5
        is_obj = inst >= 5
        if objects:
            shape_cls = np.array([2 + self.shapes.index(o["shape"]) for o in objects])
            semseg = np.where(is_obj, shape_cls[np.clip(obj_ids, 0, None)], semseg)
        image = self._shade(rng, points, normal, inst, objects, cam_h, room_h)

        hw = (height, width)
        semseg = semseg.reshape(hw).astype(np.int64)
        inst = inst.reshape(hw)
        # Room planes meet without a depth jump, so they share one region; objects are convex,
        # so an object's outline is exactly where depth jumps.
        edge = label_boundaries(np.where(inst >= 5, inst, semseg))
        return {
            "image": image.reshape(height, width, 3).transpose(2, 0, 1).astype(np.float32).copy(),
            "semseg": semseg,
            "parts": part.reshape(hw).astype(np.int64),
            "saliency": is_obj.reshape(1, *hw).astype(np.float32),
            "normals": n_cam.reshape(height, width, 3).transpose(2, 0, 1).astype(np.float32).copy(),
            "edge": edge.reshape(1, *hw).astype(np.float32),
            "depth": depth_world.reshape(1, *hw).astype(np.float32),
            "instance": inst,
        }

    def _place_objects(self, rng, cam_h, back, half_w):
        count = int(rng.integers(self.objects[0], self.objects[1] + 1))
        tan_half = 0.5 * self.size[1] / self.focal
        placed = []
        for _ in range(count):
            shape = self.shapes[int(rng.integers(len(self.shapes)))]
            obj = {"shape": shape}
            for _attempt in range(10):
                z = rng.uniform(2.2, back - 0.8)
                reach = min(half_w - 0.6, 0.85 * z * tan_half)
                x = rng.uniform(-reach, reach)
                radius = rng.uniform(0.25, 0.55)
                apart = ((x - o["x"]) ** 2 + (z - o["z"]) ** 2 for o in placed)
                if all(d2 > (radius + o["radius"]) ** 2 for d2, o in zip(apart, placed)):
                    break
            obj.update(x=x, z=z, radius=radius)
            if shape == "sphere":
                lift = rng.uniform(0.0, 0.6) if rng.random() < 0.3 else 0.0
                obj["center"] = np.array([x, cam_h - radius - lift, z])
                obj["bound"] = (obj["center"], radius)
            elif shape == "box":
                half = np.array([radius, rng.uniform(0.2, 0.6), radius * rng.uniform(0.6, 1.0)])
                obj["half"] = half
                obj["center"] = np.array([x, cam_h - half[1], z])
                obj["yaw"] = rng.uniform(0.0, math.pi)
                obj["bound"] = (obj["center"], float(np.linalg.norm(half)))
            else:
                obj["top"] = cam_h - rng.uniform(0.4, 1.3)
                obj["bottom"] = cam_h
                half_h = 0.5 * (obj["bottom"] - obj["top"])
                obj["bound"] = (np.array([x, cam_h - half_h, z]), math.hypot(radius, half_h))
            jitter = rng.normal(0, 0.08, 3)
            obj["albedo"] = np.clip(np.array(_SHAPE_COLOURS[shape]) + jitter, 0.05, 1.0)
            obj["stripes"] = rng.uniform(4.0, 12.0)
            placed.append(obj)
        return placed

    def _shade(self, rng, points, normal, inst, objects, cam_h, room_h):
        points = points.astype(np.float32)
        normal = normal.astype(np.float32)
        # Albedo = a colour per surface (floor, ceiling, 3 walls, objects) times a grey pattern:
        # a checker on the floor, stripes on the walls and objects.
        floor_tone = rng.uniform(0.35, 0.6, 3)
        wall_tone = rng.uniform(0.55, 0.85, 3)
        colours = [floor_tone] + [wall_tone] * 4 + [o["albedo"] for o in objects]
        colours = np.asarray(colours, dtype=np.float32)
        freq = np.array([0.0] * 5 + [o["stripes"] for o in objects], dtype=np.float32)
        checker = (np.floor(points[:, 0] * 2.0) + np.floor(points[:, 2] * 2.0)) % 2
        wall_freq = np.float32(rng.uniform(3.0, 8.0))
        stripes = np.where(
            inst < 5,
            0.9 + 0.1 * np.sin((points[:, 0] + points[:, 2]) * wall_freq),
            0.85 + 0.15 * np.sin(points[:, 1] * freq[inst]),
        )
        pattern = np.where(inst == 0, 0.75 + 0.25 * checker, stripes)
        light = np.array(
            [rng.uniform(-1.5, 1.5), cam_h - room_h + 0.3, rng.uniform(1.0, 4.0)], dtype=np.float32
        )
        to_light = light - points
        dist_sq = np.einsum("pi,pi->p", to_light, to_light)
        cosine = np.einsum("pi,pi->p", normal, to_light) / np.sqrt(dist_sq)
        falloff = np.minimum(6.0 / (2.0 + dist_sq), 1.5)
        intensity = 0.25 + 0.9 * np.clip(cosine, 0.0, None) * falloff
        image = colours[inst] * (pattern * intensity)[:, None].astype(np.float32)
        if self.noise > 0:
            # Uniform noise of standard deviation `noise`: as good as Gaussian here and several
            # times cheaper to draw.
            scale = np.float32(self.noise * math.sqrt(12.0))
            image += scale * (rng.random(image.shape, dtype=np.float32) - np.float32(0.5))
        return np.clip(image, 0.0, 1.0, out=image)


def _sphere(d, obj):
    centre, r = obj["center"].astype(d.dtype), obj["radius"]
    a = np.einsum("pi,pi->p", d, d)
    b = -2.0 * d @ centre
    c = centre @ centre - r * r
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(disc)) / (2 * a)
    t[~(disc >= 0) | ~(t > 0)] = np.inf
    hit = d * t[:, None]
    n = (hit - centre) / r
    # y points down: the upper half has y above (smaller than) the centre's.
    sub = (hit[:, 1] > centre[1]).astype(np.int64)
    return t, n, sub


def _box(d, obj):
    c, s = math.cos(obj["yaw"]), math.sin(obj["yaw"])
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=d.dtype)  # local -> world
    o_l = rot.T @ (-obj["center"].astype(d.dtype))
    d_l = d @ rot  # rot.T applied to each row
    half = obj["half"].astype(d.dtype)
    t1 = (-half - o_l) / d_l
    t2 = (half - o_l) / d_l
    near = np.minimum(t1, t2)
    far = np.maximum(t1, t2)
    near = np.where(np.isnan(near), -np.inf, near)
    far = np.where(np.isnan(far), np.inf, far)
    axis = np.argmax(near, axis=1)
    t_near = np.take_along_axis(near, axis[:, None], 1)[:, 0]
    t_far = far.min(axis=1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    rows = np.arange(d.shape[0])
    n_l = np.zeros_like(d)
    n_l[rows, axis] = -np.sign(d_l[rows, axis])
    n = n_l @ rot.T
    sub = ~((axis == 1) & (n_l[:, 1] < 0))
    return t, n, sub.astype(np.int64)


def _cylinder(d, obj):
    cx, cz, r = obj["x"], obj["z"], obj["radius"]
    top, bottom = obj["top"], obj["bottom"]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = -2.0 * (d[:, 0] * cx + d[:, 2] * cz)
    c = cx * cx + cz * cz - r * r
    disc = b * b - 4 * a * c
    t_side = (-b - np.sqrt(disc)) / (2 * a)
    y = t_side * d[:, 1]
    t_side[~(disc >= 0) | ~(t_side > 0) | ~((y >= top) & (y <= bottom))] = np.inf
    t_cap = top / d[:, 1]
    cap_x = t_cap * d[:, 0] - cx
    cap_z = t_cap * d[:, 2] - cz
    t_cap[~(t_cap > 0) | ~(cap_x**2 + cap_z**2 <= r * r)] = np.inf
    on_cap = t_cap < t_side
    t = np.where(on_cap, t_cap, t_side)
    hit = d * np.where(np.isfinite(t), t, 0.0)[:, None]
    n = np.stack([(hit[:, 0] - cx) / r, np.zeros_like(t), (hit[:, 2] - cz) / r], axis=1)
    n[on_cap] = (0.0, -1.0, 0.0)
    return t, n, (~on_cap).astype(np.int64)


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _cylinder}
