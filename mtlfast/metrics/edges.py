"""Edge detection: BSDS-style odsF, oisF and AP without MATLAB.

Per threshold the prediction is binarised and thinned; predicted and ground-truth edge pixels
are paired one-to-one within ``max_dist`` times the image diagonal by a maximum-cardinality
bipartite matching (a unit-capacity max flow); matched / total counts on both sides give recall
and precision. This follows the edges toolbox (``edgesEvalImg`` / ``edgesEvalDir``) except for
the matching: BSDS's ``correspondPixels`` solves a min-cost assignment with an outlier cost
of 100 x the radius, on a sparse graph it builds itself. With that outlier cost, any augmenting
path shorter than ~200 edges lowers the cost, so it too returns (near-)maximum matchings,
preferring shorter pairs; only the counts matter here. Small count differences from the MATLAB
code are possible.
"""

from __future__ import annotations

import numpy as np

from ._inputs import check_finite, same_shape, single_channel, to_numpy

__all__ = [
    "MAX_DIST_NYUD",
    "MAX_DIST_PASCAL",
    "EdgeMeter",
    "edge_counts",
    "edge_scores",
    "match_edges",
]

#: Maximum mis-localisation as a fraction of the image diagonal (ASTMT appendix, [10] there).
MAX_DIST_PASCAL = 0.0075
MAX_DIST_NYUD = 0.011
_EPS = np.finfo(np.float64).eps  # MATLAB's eps, as in the toolbox's max(eps, .)


def match_edges(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """Size of a maximum one-to-one matching of ``pred`` to ``gt`` pixels at distance <= radius.

    Solved as a unit-capacity max flow (source -> pred -> gt -> sink) with Dinic's algorithm:
    ``scipy.sparse.csgraph.maximum_bipartite_matching`` can take exponential time on the
    layered graphs that edge maps make (scipy issue #26147; minutes for one 512x512 map).

    Shapes: pred, gt (H, W) bool; radius in pixels. Returns the number of matched pairs.
    """
    # scipy / scikit-image are imported on first use: `import mtlfast` stays quick.
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow
    from scipy.spatial import cKDTree

    p = np.argwhere(pred)
    g = np.argwhere(gt)
    if len(p) == 0 or len(g) == 0:
        return 0
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(g), radius, output_type="ndarray")
    if len(pairs) == 0:
        return 0
    n_p, n_g = len(p), len(g)
    source, sink = n_p + n_g, n_p + n_g + 1
    # Built from the index pairs, not the distances: a zero distance must stay an edge.
    rows = np.concatenate([np.full(n_p, source), pairs["i"], n_p + np.arange(n_g)])
    cols = np.concatenate([np.arange(n_p), n_p + pairs["j"], np.full(n_g, sink)])
    ones = np.ones(len(rows), dtype=np.int32)
    graph = csr_matrix((ones, (rows, cols)), shape=(sink + 1, sink + 1))
    return int(maximum_flow(graph, source, sink, method="dinic").flow_value)


def _thresholds(thresholds) -> np.ndarray:
    if np.ndim(thresholds) == 0:
        k = int(thresholds)
        if k < 1:
            raise ValueError(f"thresholds must be >= 1 or a list, got {thresholds}")
        return np.linspace(1 / (k + 1), 1 - 1 / (k + 1), k)
    return np.asarray(thresholds, dtype=np.float64).ravel()


def edge_counts(
    pred: np.ndarray,
    target: np.ndarray,
    thresholds=99,
    max_dist: float = MAX_DIST_PASCAL,
    thin: bool = True,
    ignore_index: int = 255,
) -> np.ndarray:
    """``edgesEvalImg`` for one image: per threshold ``[cntR, sumR, cntP, sumP]``.

    ``pred >= max(eps, t)`` is thinned (``skimage.morphology.thin``, MATLAB's
    ``bwmorph(E, 'thin', inf)``); predicted pixels on ignored target pixels are dropped;
    the target's edge pixels (value 1) are used as given.

    Shapes: pred (H, W) in [0, 1]; target (H, W) with 1 = edge, 0 = not, ``ignore_index``;
    thresholds an int K (``linspace(1/(K+1), 1-1/(K+1), K)``) or a sequence. Returns (K, 4) int64.
    """
    from skimage.morphology import thin as _thin

    ts = _thresholds(thresholds)
    keep = target != ignore_index
    gt = (target >= 0.5) & keep
    radius = max_dist * float(np.hypot(*target.shape))
    out = np.zeros((len(ts), 4), dtype=np.int64)
    previous = None
    for k, t in enumerate(ts):
        e = pred >= max(_EPS, t)
        if thin and e.any():
            e = _thin(e)
        e &= keep
        if previous is not None and np.array_equal(e, previous[0]):
            out[k] = previous[1]
            continue
        matched = match_edges(e, gt, radius)
        out[k] = (matched, gt.sum(), matched, e.sum())
        previous = (e, out[k].copy())
    return out


def _f(p, r):
    return 2 * p * r / np.maximum(_EPS, p + r)


def _best_rf(p: np.ndarray, r: np.ndarray, t: np.ndarray) -> tuple[float, float, float, float]:
    """The toolbox's ``findBestRF``: the best F on 100 points of each segment between thresholds."""
    if len(t) == 1:
        return float(r[0]), float(p[0]), float(_f(p[0], r[0])), float(t[0])
    a = np.linspace(0, 1, 100)
    best = (-1.0, 0.0, 0.0, 0.0)
    for j in range(1, len(t)):
        rj = r[j] * a + r[j - 1] * (1 - a)
        pj = p[j] * a + p[j - 1] * (1 - a)
        tj = t[j] * a + t[j - 1] * (1 - a)
        fj = _f(pj, rj)
        k = int(np.argmax(fj))
        if fj[k] > best[0]:
            best = (float(fj[k]), float(rj[k]), float(pj[k]), float(tj[k]))
    f, r_, p_, t_ = best
    return r_, p_, f, t_


def edge_scores(counts: np.ndarray, thresholds) -> dict:
    """``edgesEvalDir`` from per-image counts: ODS, OIS and AP.

    Shapes: counts (num_images, K, 4) as :func:`edge_counts`; thresholds as there.
    Returns {"odsF", "odsP", "odsR", "odsT", "oisF", "oisP", "oisR", "AP": float}.
    """
    ts = _thresholds(thresholds)
    counts = np.asarray(counts, dtype=np.float64)
    cnt_r, sum_r, cnt_p, sum_p = np.moveaxis(counts, -1, 0)  # (I, K) each
    # OIS: every image at its own best threshold, the counts then pooled.
    r_img = cnt_r / np.maximum(_EPS, sum_r)
    p_img = cnt_p / np.maximum(_EPS, sum_p)
    best = np.argmax(_f(p_img, r_img), axis=1)
    rows = np.arange(len(best))
    ois_r = cnt_r[rows, best].sum() / max(_EPS, sum_r[rows, best].sum())
    ois_p = cnt_p[rows, best].sum() / max(_EPS, sum_p[rows, best].sum())
    # ODS: the counts pooled over images at every threshold.
    r = cnt_r.sum(0) / np.maximum(_EPS, sum_r.sum(0))
    p = cnt_p.sum(0) / np.maximum(_EPS, sum_p.sum(0))
    ods_r, ods_p, ods_f, ods_t = _best_rf(p, r, ts)
    # AP: precision interpolated at recall 0:0.01:1 (the toolbox divides the 101 samples by 100).
    r_u, first = np.unique(r, return_index=True)
    ap = 0.0
    if len(r_u) > 1:
        grid = np.linspace(0, 1, 101)
        inside = (grid >= r_u[0]) & (grid <= r_u[-1])
        ap = float(np.interp(grid[inside], r_u, p[first]).sum() / 100)
    return {
        "odsF": ods_f,
        "odsP": ods_p,
        "odsR": ods_r,
        "odsT": ods_t,
        "oisF": float(_f(ois_p, ois_r)),
        "oisP": float(ois_p),
        "oisR": float(ois_r),
        "AP": ap,
    }


class EdgeMeter:
    """Streaming BSDS edge evaluation (see the module docstring and :func:`edge_counts`).

    Args:
        max_dist: matching radius as a fraction of the image diagonal (0.0075 PASCAL, 0.011 NYUD).
        thresholds: number K of thresholds (99, the toolbox default) or the thresholds.
        thin: thin the binarised prediction first (the toolbox default).

    ``update(pred, target)``: pred (N, 1, H, W) or (N, H, W) edge probabilities in [0, 1];
    target the same shape, 1 = edge, 0 = not, ``ignore_index`` = ignored. Images without a
    valid target pixel are skipped. ``compute()`` -> :func:`edge_scores`.
    Non-finite predictions (NaN or +-inf) raise ValueError naming the meter.
    """

    def __init__(
        self,
        max_dist: float = MAX_DIST_PASCAL,
        thresholds=99,
        thin: bool = True,
        ignore_index: int = 255,
    ) -> None:
        self.max_dist = float(max_dist)
        self.thresholds = _thresholds(thresholds)
        self.thin = thin
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.counts: list[np.ndarray] = []

    def update(self, pred, target) -> None:
        pred = single_channel(to_numpy(pred, "pred"), "pred").astype(np.float64)
        target = single_channel(to_numpy(target, "target"), "target")
        same_shape(pred, target)
        check_finite(pred, "EdgeMeter")
        for p, t in zip(pred, target):
            if not (t != self.ignore_index).any():
                continue
            self.counts.append(
                edge_counts(p, t, self.thresholds, self.max_dist, self.thin, self.ignore_index)
            )

    def compute(self) -> dict:
        if not self.counts:
            raise RuntimeError("EdgeMeter.compute() before any image with a valid pixel")
        return edge_scores(np.stack(self.counts), self.thresholds)
