"""DepthMeter: errors pooled over valid pixels."""

import numpy as np
import pytest

from mtlfast.metrics import DepthMeter


def test_hand_computed():
    target = np.array([[[[1.0, 2.0, 4.0, 0.0]]]])
    pred = np.array([[[[1.0, 3.0, 2.0, 9.0]]]])
    m = DepthMeter()
    m.update(pred[..., :2], target[..., :2])
    m.update(pred[..., 2:], target[..., 2:])
    out = m.compute()
    assert out["rmse"] == pytest.approx(np.sqrt((0 + 1 + 4) / 3))
    assert out["log_rmse"] == pytest.approx(np.sqrt((0 + np.log(1.5) ** 2 + np.log(2) ** 2) / 3))
    assert out["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    # ratios 1, 1.5, 2: < 1.25 -> 1/3; < 1.5625 -> 2/3; < 1.953 -> 2/3.
    assert (out["delta1"], out["delta2"], out["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_perfect_and_nonpositive_prediction():
    rng = np.random.default_rng(0)
    target = rng.random((2, 1, 5, 5)) + 0.5
    m = DepthMeter()
    m.update(target, target)
    out = m.compute()
    assert out["rmse"] == 0 and out["log_rmse"] == 0 and out["delta1"] == 1
    m.reset()
    m.update(np.full((1, 1, 1, 1), -3.0), np.ones((1, 1, 1, 1)))  # clamped to 1e-9
    assert np.isfinite(m.compute()["log_rmse"])
