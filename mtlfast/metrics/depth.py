"""Depth: error statistics pooled over valid pixels."""

from __future__ import annotations

import numpy as np

from ._inputs import check_finite, same_shape, single_channel, to_numpy

__all__ = ["DepthMeter"]


class DepthMeter:
    """Pooled over every valid pixel (target > 0) of the dataset: ``rmse``, ``log_rmse``
    (natural log, as MTI-Net's ``eval_depth``), ``abs_rel`` = mean ``|p - t| / t`` and
    ``delta1..3`` = fraction with ``max(p / t, t / p) < 1.25**k``. Predictions are clamped to
    at least 1e-9 (the reference's guard) before logs and ratios.

    ``update(pred, target)``: pred, target (N, 1, H, W) or (N, H, W) in metres, target 0 = invalid.
    ``compute()`` -> {"rmse", "log_rmse", "abs_rel", "delta1", "delta2", "delta3": float}.
    Non-finite predictions (NaN or +-inf) raise ValueError naming the meter. Non-finite targets are invalid pixels.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sq = 0.0
        self.log_sq = 0.0
        self.abs_rel = 0.0
        self.delta = np.zeros(3, dtype=np.int64)

    def update(self, pred, target) -> None:
        pred = single_channel(to_numpy(pred, "pred"), "pred").astype(np.float64)
        target = single_channel(to_numpy(target, "target"), "target").astype(np.float64)
        same_shape(pred, target)
        check_finite(pred, "DepthMeter")
        valid = (target > 0) & np.isfinite(target)
        p = np.maximum(pred[valid], 1e-9)
        t = target[valid]
        self.n += t.size
        self.sq += ((p - t) ** 2).sum()
        self.log_sq += ((np.log(p) - np.log(t)) ** 2).sum()
        self.abs_rel += (np.abs(p - t) / t).sum()
        ratio = np.maximum(p / t, t / p)
        self.delta += np.array([(ratio < 1.25**k).sum() for k in (1, 2, 3)])

    def compute(self) -> dict:
        if self.n == 0:
            raise RuntimeError("DepthMeter.compute() before any valid pixel")
        d = self.delta / self.n
        return {
            "rmse": float(np.sqrt(self.sq / self.n)),
            "log_rmse": float(np.sqrt(self.log_sq / self.n)),
            "abs_rel": float(self.abs_rel / self.n),
            "delta1": float(d[0]),
            "delta2": float(d[1]),
            "delta3": float(d[2]),
        }
