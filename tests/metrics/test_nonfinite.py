"""Issue 16: every meter raises ValueError naming itself on non-finite predictions, never an
internal error, and its state is left as it was."""

import numpy as np
import pytest
import torch

from mtlfast.metrics import DepthMeter, EdgeMeter, NormalsMeter, SaliencyMeter, SegmentationMeter


def _normals():
    target = np.zeros((1, 3, 2, 2))
    target[:, 2] = 1.0
    return NormalsMeter(), np.ones((1, 3, 2, 2)), target


def _depth():
    return DepthMeter(), np.ones((1, 1, 2, 2)), np.full((1, 1, 2, 2), 2.0)


def _saliency():
    return SaliencyMeter(), np.full((1, 1, 2, 2), 0.7), np.array([[[[1, 0], [1, 0]]]])


def _edges():
    return EdgeMeter(thresholds=5), np.full((1, 1, 4, 4), 0.7), np.eye(4)[None, None]


def _segmentation():
    return SegmentationMeter(3), np.zeros((1, 3, 2, 2)), np.array([[[0, 1], [2, 1]]])


METERS = {
    "NormalsMeter": _normals,
    "DepthMeter": _depth,
    "SaliencyMeter": _saliency,
    "EdgeMeter": _edges,
    "SegmentationMeter": _segmentation,
}


@pytest.mark.parametrize("name", METERS)
@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf")], ids=("nan", "inf", "-inf")
)
@pytest.mark.parametrize("as_tensor", (False, True), ids=("numpy", "torch"))
def test_non_finite_prediction(name, value, as_tensor):
    meter, pred, target = METERS[name]()
    pred = pred.copy()
    pred.flat[1] = value
    if as_tensor:
        pred, target = torch.from_numpy(pred).float(), torch.from_numpy(target)
    if name == "SegmentationMeter" and not np.isnan(value):
        meter.update(pred, target)  # +-inf scores are ranked by the argmax
        assert meter.compute()["pixel_acc"] == pytest.approx(0.5 if value < 0 else 0.25)
        return
    with pytest.raises(ValueError, match=rf"{name}\.update: pred holds 1 (NaN|non-finite)"):
        meter.update(pred, target)
    with pytest.raises(RuntimeError, match=rf"{name}\.compute\(\) before any"):
        meter.compute()  # nothing was counted


def test_normals_single_nan_pixel_is_not_a_numpy_error():
    # used to fail in np.bincount: "'list' argument must have no negative elements"
    meter, pred, target = _normals()
    pred[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NormalsMeter"):
        meter.update(pred, target)


def test_depth_non_finite_target_is_invalid():
    meter, pred, target = _depth()
    target[0, 0, 0, 0] = np.inf
    target[0, 0, 0, 1] = np.nan
    meter.update(pred, target)
    assert meter.n == 2 and np.isfinite(meter.compute()["rmse"])


def test_normals_non_finite_target_is_invalid():
    """Found by tests/property: an inf or NaN label component reached np.bincount's error."""
    meter, pred, target = _normals()
    target[0, 0, 0, 0] = np.inf
    target[0, 1, 0, 1] = np.nan
    meter.update(pred, target)
    assert meter.n == 2 and np.isfinite(meter.compute()["mean"])
