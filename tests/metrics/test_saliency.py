"""SaliencyMeter: per-image Jaccard / precision / recall averaged, max over thresholds."""

import numpy as np
import pytest

from mtlfast.metrics import SALIENCY_THRESHOLDS, SaliencyMeter


def test_thresholds_default():
    np.testing.assert_allclose(SALIENCY_THRESHOLDS, np.linspace(0.2, 0.9, 15))


def test_hand_computed():
    pred = np.array([[[[0.9, 0.9, 0.1, 0.8]]], [[[0.1, 0.1, 0.1, 0.6]]]])
    gt = np.array([[[[1, 0, 1, 255]]], [[[0, 0, 0, 0]]]], dtype=np.float32)
    m = SaliencyMeter(thresholds=[0.5])
    m.update(pred, gt)
    out = m.compute()
    # image 0 (3 valid pixels): tp 1, fp 1, fn 1 -> J 1/3, P 1/2, R 1/2.
    # image 1: predicts pixel 3 on empty ground truth -> J 0, P 0, R 0.
    assert out["mIoU"] == pytest.approx((1 / 3 + 0) / 2)
    p, r = 0.25, 0.25
    assert out["precision"][0] == pytest.approx(p)
    assert out["recall"][0] == pytest.approx(r)
    assert out["maxF"] == pytest.approx(2 * p * r / (p + r), rel=1e-9)
    m = SaliencyMeter(thresholds=[0.5, 0.95], beta2=0.3)
    m.update(pred, gt)
    out = m.compute()
    assert out["maxF"] == pytest.approx(1.3 * p * r / (0.3 * p + r), rel=1e-9)
    # At 0.95 nothing is predicted: image 1 is empty/empty (J = 1), image 0 gets J = 0.
    assert out["mIoUs"][1] == pytest.approx(0.5)


def test_perfect_prediction_and_ignore():
    rng = np.random.default_rng(0)
    gt = (rng.random((3, 1, 8, 8)) > 0.5).astype(np.float32)
    pred = gt.copy()
    gt[0, 0, 0, :] = 255
    pred[0, 0, 0, :] = 1 - pred[0, 0, 0, :]  # wrong only where ignored
    m = SaliencyMeter()
    m.update(pred, gt)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(1.0)
    assert out["maxF"] == pytest.approx(1.0)
    m.reset()
    m.update(pred[:1], np.full_like(gt[:1], 255))
    with pytest.raises(RuntimeError):
        m.compute()
