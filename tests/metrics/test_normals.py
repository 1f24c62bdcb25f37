"""NormalsMeter: angles pooled over valid pixels."""

import numpy as np
import pytest

from mtlfast.metrics import NormalsMeter


def test_hand_computed():
    target = np.zeros((1, 3, 1, 5))
    pred = np.zeros((1, 3, 1, 5))
    # (1, 0, 0) at pixels 0-3; pixel 4 invalid.
    target[0, :, 0, :4] = [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    pred[0, :, 0, 0] = [3, 0, 0]  # 0 deg
    pred[0, :, 0, 1] = [1, 1, 0]  # 45 deg
    pred[0, :, 0, 2] = [0, 2, 0]  # 90 deg
    pred[0, :, 0, 3] = [np.cos(np.radians(20)), np.sin(np.radians(20)), 0]  # 20 deg
    pred[0, :, 0, 4] = [-1, 0, 0]  # ignored
    m = NormalsMeter()
    m.update(pred, target)
    out = m.compute()
    angles = np.array([0, 45, 90, 20])
    assert out["mean"] == pytest.approx(angles.mean())
    assert out["median"] == pytest.approx(np.median(angles), abs=1e-3)
    assert out["rmse"] == pytest.approx(np.sqrt((angles**2).mean()))
    assert (out["11.25"], out["22.5"], out["30"]) == pytest.approx((25.0, 50.0, 50.0))


def test_random_against_numpy_and_perfect():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(3, 3, 9, 7))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    target[1, :, 2:5] = 0
    pred = target + 0.6 * rng.normal(size=target.shape)
    m = NormalsMeter()
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    p = np.moveaxis(pred, 1, -1)
    t = np.moveaxis(target, 1, -1)
    valid = np.linalg.norm(t, axis=-1) > 0
    p = p[valid] / np.linalg.norm(p[valid], axis=-1, keepdims=True)
    a = np.degrees(np.arccos(np.clip((p * t[valid]).sum(-1), -1, 1)))
    out = m.compute()
    assert out["mean"] == pytest.approx(a.mean())
    assert out["median"] == pytest.approx(np.median(a), abs=1e-3)
    assert out["rmse"] == pytest.approx(np.sqrt((a**2).mean()))
    assert out["30"] == pytest.approx(100 * (a < 30).mean())
    m.reset()
    m.update(2 * target, target)
    out = m.compute()
    assert out["mean"] < 1e-3 and out["11.25"] == 100.0
