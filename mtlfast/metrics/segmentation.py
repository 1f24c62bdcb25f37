"""Mean intersection-over-union from a dataset-pooled confusion matrix."""

from __future__ import annotations

import numpy as np

from ._inputs import check_finite, same_shape, to_numpy

__all__ = ["SegmentationMeter"]


class SegmentationMeter:
    """mIoU over a dataset, as MTI-Net's ``eval_semseg``: per class ``IoU = tp / (tp + fp + fn)``
    with counts pooled over every pixel seen, then the mean over all ``num_classes`` classes.
    A class absent from both predictions and ground truth has IoU 0 (the reference divides by
    ``max(tp + fp + fn, 1e-8)``), so it lowers the mean. Ignored pixels count nowhere; a
    predicted id outside ``[0, num_classes)`` is a miss (fn) of the true class only.

    ``update(pred, target)``: pred (N, H, W) int class ids, or (N, C, H, W) scores (argmax over
    C); target (N, H, W) or (N, 1, H, W) int, ``ignore_index`` = ignored.
    ``compute()`` -> {"mIoU": float, "IoU": list of num_classes floats, "pixel_acc": float};
    RuntimeError before any counted pixel, as every meter.

    Scores must have C = ``num_classes`` channels (ValueError otherwise). NaN scores raise
    ValueError naming the meter, as every meter's non-finite predictions do; +-inf scores are
    ranked by the argmax like any other (a -inf log-probability is a legitimate score).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        # Column num_classes collects predictions outside the class range.
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, pred, target) -> None:
        pred = to_numpy(pred, "pred")
        target = to_numpy(target, "target")
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if pred.ndim == target.ndim + 1:
            if pred.ndim != 4 or pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"SegmentationMeter.update: pred scores must be (N, C, H, W) with C = num_classes = "
                    f"{self.num_classes}, got {tuple(pred.shape)}"
                )
            check_finite(pred, "SegmentationMeter", allow_inf=True)
            pred = pred.argmax(axis=1)
        same_shape(pred, target)
        if np.issubdtype(target.dtype, np.floating) or np.issubdtype(pred.dtype, np.floating):
            raise TypeError(
                "SegmentationMeter.update: pred (as class ids) and target must hold integers"
            )
        target = target.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        valid = target != self.ignore_index
        if ((target[valid] < 0) | (target[valid] >= self.num_classes)).any():
            raise ValueError(
                f"SegmentationMeter.update: target holds ids outside [0, {self.num_classes}) other than the ignore index"
            )
        target, pred = target[valid], pred[valid]
        pred = np.where((pred >= 0) & (pred < self.num_classes), pred, self.num_classes)
        k = self.num_classes + 1
        self.confusion += np.bincount(target * k + pred, minlength=self.num_classes * k).reshape(
            self.num_classes, k
        )

    def compute(self) -> dict:
        c = self.confusion
        if not c.any():
            raise RuntimeError("SegmentationMeter.compute() before any valid pixel")
        tp = np.diag(c[:, : self.num_classes]).astype(np.float64)
        fn = c.sum(axis=1) - tp
        fp = c[:, : self.num_classes].sum(axis=0) - tp
        iou = tp / np.maximum(tp + fp + fn, 1e-8)
        total = c.sum()
        return {
            "mIoU": float(iou.mean()),
            "IoU": iou.tolist(),
            "pixel_acc": float(tp.sum() / total) if total else 0.0,
        }
