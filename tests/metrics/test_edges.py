"""Edge evaluation: matching against brute force, BSDS counts, ODS / OIS / AP."""

import itertools

import numpy as np
import pytest

from mtlfast.metrics import EdgeMeter, edge_counts, edge_scores, match_edges


def _brute_force(pred, gt, radius):
    p, g = np.argwhere(pred), np.argwhere(gt)
    options = [
        [None] + [j for j in range(len(g)) if np.hypot(*(p[i] - g[j])) <= radius]
        for i in range(len(p))
    ]
    best = 0
    for assignment in itertools.product(*options):
        used = [j for j in assignment if j is not None]
        if len(used) == len(set(used)):
            best = max(best, len(used))
    return best


def test_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(60):
        pred = np.zeros((6, 6), bool)
        gt = np.zeros((6, 6), bool)
        pred.flat[rng.choice(36, rng.integers(0, 6), replace=False)] = True
        gt.flat[rng.choice(36, rng.integers(0, 6), replace=False)] = True
        radius = rng.choice([0.0, 1.0, 1.5, 2.0, 3.0])
        assert match_edges(pred, gt, radius) == _brute_force(pred, gt, radius), trial


def test_matching_prefers_cardinality_over_greedy():
    # Greedy nearest matching pairs p0 with g1 (distance 0) and leaves g0 / p1 unmatched;
    # the maximum matching pairs p0-g0 and p1-g1.
    pred = np.zeros((1, 5), bool)
    gt = np.zeros((1, 5), bool)
    pred[0, [1, 3]] = True
    gt[0, [0, 1]] = True
    assert match_edges(pred, gt, 2.0) == 2
    assert match_edges(pred, gt, 1.0) == 1


def test_counts_of_a_shifted_line():
    gt = np.zeros((20, 20))
    gt[10, 2:18] = 1
    pred = np.zeros((20, 20))
    pred[11, 2:18] = 0.9  # one pixel off: matched when radius >= 1
    pred[3, 3] = 0.4  # a weak false positive
    radius = 0.05 * np.hypot(20, 20)  # ~1.41 px
    counts = edge_counts(pred, gt, thresholds=[0.3, 0.5, 0.95], max_dist=0.05)
    np.testing.assert_array_equal(counts, [[16, 16, 16, 17], [16, 16, 16, 16], [0, 16, 0, 0]])
    assert radius > 1
    tight = edge_counts(pred, gt, thresholds=[0.5], max_dist=0.01)
    np.testing.assert_array_equal(tight, [[0, 16, 0, 16]])


def test_thinning_and_ignore():
    gt = np.zeros((12, 12))
    gt[6, :] = 1
    pred = np.zeros((12, 12))
    pred[5:8, :] = 0.8  # a 3-pixel-thick band thins to about one line
    thick = edge_counts(pred, gt, thresholds=[0.5], max_dist=0.01, thin=False)[0]
    thin = edge_counts(pred, gt, thresholds=[0.5], max_dist=0.01, thin=True)[0]
    assert thick[3] == 36 and thin[3] < 20
    gt_ignored = gt.copy()
    gt_ignored[:, :6] = 255  # ground truth and predictions there count nowhere
    c = edge_counts(pred, gt_ignored, thresholds=[0.5], max_dist=0.01, thin=False)[0]
    assert c[1] == 6 and c[3] == 18


def test_perfect_and_empty_predictions():
    rng = np.random.default_rng(1)
    gt = np.zeros((2, 1, 16, 16))
    gt[0, 0, 4, 2:14] = 1
    gt[1, 0, 2:14, 9] = 1
    m = EdgeMeter(thresholds=9)
    m.update(gt * rng.uniform(0.5, 1.0, gt.shape), gt)
    out = m.compute()
    assert out["odsF"] == pytest.approx(1.0) and out["oisF"] == pytest.approx(1.0)
    m.reset()
    m.update(np.zeros_like(gt), gt)
    out = m.compute()
    assert out["odsF"] == 0 and out["oisF"] == 0 and out["AP"] == 0


def test_scores_hand_computed():
    t = [0.25, 0.5, 0.75]
    # image 0 is best at threshold 0 (F = 1), image 1 at threshold 2 (F = 1).
    counts = np.array(
        [
            [[10, 10, 10, 10], [5, 10, 5, 5], [0, 10, 0, 0]],
            [[10, 10, 10, 40], [10, 10, 10, 20], [10, 10, 10, 10]],
        ]
    )
    out = edge_scores(counts, t)
    assert out["oisF"] == pytest.approx(1.0)
    # Pooled: R = [1, 0.75, 0.5], P = [0.4, 0.6, 1.0]; F = [0.571, 0.667, 0.667].
    # findBestRF interpolates between thresholds 1 and 2: the maximum of F on that segment.
    a = np.linspace(0, 1, 100)
    r, p = 0.5 * a + 0.75 * (1 - a), 1.0 * a + 0.6 * (1 - a)
    f = 2 * p * r / (p + r)
    assert out["odsF"] == pytest.approx(f.max())
    assert out["odsT"] == pytest.approx(0.75 * a[f.argmax()] + 0.5 * (1 - a[f.argmax()]))
    # AP: precision interpolated at recall 0.50, 0.51, ..., 1.00 (51 samples) / 100.
    grid = np.linspace(0, 1, 101)[50:]
    want = np.interp(grid, [0.5, 0.75, 1.0], [1.0, 0.6, 0.4]).sum() / 100
    assert out["AP"] == pytest.approx(want)


def test_default_thresholds_and_streaming():
    rng = np.random.default_rng(2)
    gt = (rng.random((3, 1, 10, 10)) > 0.9).astype(float)
    pred = np.clip(gt * 0.7 + rng.random(gt.shape) * 0.4, 0, 1)
    m = EdgeMeter()
    assert len(m.thresholds) == 99 and m.thresholds[0] == pytest.approx(0.01)
    m.update(pred[:1], gt[:1])
    m.update(pred[1:], gt[1:])
    one = EdgeMeter()
    one.update(pred, gt)
    assert m.compute() == one.compute()
