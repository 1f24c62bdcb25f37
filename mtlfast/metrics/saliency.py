"""Saliency: mIoU and maximal F-measure over thresholds, as the ASTMT / MTI-Net ``eval_sal``."""

from __future__ import annotations

import numpy as np

from ._inputs import check_finite, same_shape, single_channel, to_numpy

__all__ = ["SALIENCY_THRESHOLDS", "SaliencyMeter"]

#: ``np.linspace(0.2, 0.9, 15)``, the thresholds of the releases.
SALIENCY_THRESHOLDS = np.linspace(0.2, 0.9, 15)


class SaliencyMeter:
    """Per image and threshold ``t``, the mask ``pred > t`` gives a Jaccard index (1 when mask
    and ground truth are both empty), a precision and a recall; each is averaged over images;
    ``F_t = (1 + beta2) P_t R_t / (beta2 P_t + R_t)`` from the averaged P and R; ``mIoU`` and
    ``maxF`` are the maxima over thresholds. The releases compute ``2PR / (P + R)``, i.e.
    ``beta2 = 1`` (the default); the saliency literature's ``beta2 = 0.3`` is an option.
    Ignored pixels count nowhere; an image without a valid pixel is skipped.

    ``update(pred, target)``: pred (N, 1, H, W) or (N, H, W) probabilities in [0, 1] (apply a
    sigmoid to logits); target the same shape, 1 = salient, 0 = not, ``ignore_index`` = ignored.
    ``compute()`` -> {"mIoU", "maxF": float, "mIoUs", "F", "precision", "recall": per threshold}.
    Non-finite predictions (NaN or +-inf) raise ValueError naming the meter.
    """

    def __init__(
        self, thresholds=SALIENCY_THRESHOLDS, beta2: float = 1.0, ignore_index: int = 255
    ) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
        self.beta2 = float(beta2)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self._jaccard: list[np.ndarray] = []
        self._precision: list[np.ndarray] = []
        self._recall: list[np.ndarray] = []

    def update(self, pred, target) -> None:
        pred = single_channel(to_numpy(pred, "pred"), "pred").astype(np.float64)
        target = single_channel(to_numpy(target, "target"), "target")
        same_shape(pred, target)
        check_finite(pred, "SaliencyMeter")
        for p, t in zip(pred, target):
            valid = t != self.ignore_index
            if not valid.any():
                continue
            p, gt = p[valid], t[valid] >= 0.5
            mask = p[None, :] > self.thresholds[:, None]  # (K, P)
            tp = (mask & gt).sum(1).astype(np.float64)
            fp = (mask & ~gt).sum(1)
            fn = (~mask & gt).sum(1)
            union = tp + fp + fn
            self._jaccard.append(np.where(union == 0, 1.0, tp / np.maximum(union, 1)))
            self._precision.append(tp / (tp + fp + 1e-12))
            self._recall.append(tp / (tp + fn + 1e-12))

    def compute(self) -> dict:
        if not self._jaccard:
            raise RuntimeError("SaliencyMeter.compute() before any image with a valid pixel")
        mious = np.mean(self._jaccard, axis=0)
        prec = np.mean(self._precision, axis=0)
        rec = np.mean(self._recall, axis=0)
        f = (1 + self.beta2) * prec * rec / (self.beta2 * prec + rec + 1e-12)
        return {
            "mIoU": float(mious.max()),
            "maxF": float(f.max()),
            "mIoUs": mious.tolist(),
            "F": f.tolist(),
            "precision": prec.tolist(),
            "recall": rec.tolist(),
        }
