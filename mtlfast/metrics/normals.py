"""Surface normals: angular error statistics pooled over valid pixels."""

from __future__ import annotations

import numpy as np

from ._inputs import check_finite, same_shape, to_numpy

__all__ = ["NormalsMeter"]


class NormalsMeter:
    """Angle in degrees between the L2-normalised prediction and label at every valid pixel (label
    not the zero vector), pooled over the dataset: ``mean``, ``median``, ``rmse`` and the
    percentages of pixels with an angle ``< 11.25``, ``< 22.5`` and ``< 30`` degrees (ASTMT /
    MTI-Net ``eval_normals``).

    The median comes from a histogram of ``median_resolution``-degree bins (the mid-point of
    the bin(s) holding the middle pixel(s)), so it is within half a bin (5e-4 degrees by
    default) of the exact median while memory stays constant.

    ``update(pred, target)``: pred (N, 3, H, W) any scale; target (N, 3, H, W) unit vectors or 0.
    ``compute()`` -> {"mean", "median", "rmse", "11.25", "22.5", "30": float}.
    Non-finite predictions (NaN or +-inf) raise ValueError naming the meter. A target with a
    non-finite component is an invalid pixel, like the zero vector.
    """

    CUTS = (11.25, 22.5, 30.0)

    def __init__(self, median_resolution: float = 1e-3) -> None:
        self.resolution = float(median_resolution)
        self.bins = int(np.ceil(180.0 / self.resolution)) + 1
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum = 0.0
        self.sum_sq = 0.0
        self.below = np.zeros(len(self.CUTS), dtype=np.int64)
        self.hist = np.zeros(self.bins, dtype=np.int64)

    def update(self, pred, target) -> None:
        pred = to_numpy(pred, "pred").astype(np.float64)
        target = to_numpy(target, "target").astype(np.float64)
        same_shape(pred, target)
        if pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"pred and target must be (N, 3, H, W), got {tuple(pred.shape)}")
        check_finite(pred, "NormalsMeter")
        norm_t = np.linalg.norm(target, axis=1)
        # a label with a NaN or infinite component is invalid, as DepthMeter's non-finite depth
        valid = (norm_t != 0) & np.isfinite(target).all(axis=1)
        p = np.moveaxis(pred, 1, -1)[valid]
        t = np.moveaxis(target, 1, -1)[valid]
        p = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-12)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        angle = np.degrees(np.arccos(np.clip((p * t).sum(1), -1.0, 1.0)))
        self.n += angle.size
        self.sum += angle.sum()
        self.sum_sq += (angle**2).sum()
        self.below += np.array([(angle < c).sum() for c in self.CUTS])
        idx = np.minimum((angle / self.resolution).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _median(self) -> float:
        cum = np.cumsum(self.hist)
        lo = np.searchsorted(cum, (self.n - 1) // 2, side="right")
        hi = np.searchsorted(cum, self.n // 2, side="right")
        return float((lo + hi + 1) * self.resolution / 2)

    def compute(self) -> dict:
        if self.n == 0:
            raise RuntimeError("NormalsMeter.compute() before any valid pixel")
        pct = 100.0 * self.below / self.n
        return {
            "mean": self.sum / self.n,
            "median": self._median(),
            "rmse": float(np.sqrt(self.sum_sq / self.n)),
            "11.25": float(pct[0]),
            "22.5": float(pct[1]),
            "30": float(pct[2]),
        }
