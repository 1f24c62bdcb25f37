"""Properties of the meters: any prediction either updates the meter or raises a ValueError /
TypeError naming pred or target and leaves the meter as it was; compute() gives finite numbers,
or the documented RuntimeError before any valid pixel."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtlfast.metrics import DepthMeter, EdgeMeter, NormalsMeter, SaliencyMeter, SegmentationMeter

from .strategies import SPECIALS, names_argument


def _meters():
    return {
        "segmentation": (lambda: SegmentationMeter(5), 5),
        "depth": (DepthMeter, 1),
        "normals": (NormalsMeter, 3),
        "saliency": (lambda: SaliencyMeter(thresholds=(0.25, 0.5, 0.75)), 1),
        "edge": (lambda: EdgeMeter(thresholds=3), 1),
    }


def _valid_pair(kind, n, h, w, g):
    """A well-formed (pred, target) for meter ``kind``."""
    if kind == "segmentation":
        target = torch.randint(0, 5, (n, h, w), generator=g)
        target[torch.rand(n, h, w, generator=g) < 0.2] = 255
        return torch.randn(n, 5, h, w, generator=g), target
    if kind == "depth":
        target = torch.rand(n, 1, h, w, generator=g) * 5
        target[torch.rand(n, 1, h, w, generator=g) < 0.2] = 0
        return torch.rand(n, 1, h, w, generator=g) * 5 + 0.01, target
    if kind == "normals":
        target = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
        return torch.randn(n, 3, h, w, generator=g), target
    target = (torch.rand(n, 1, h, w, generator=g) > 0.6).long()
    target[torch.rand(n, 1, h, w, generator=g) < 0.1] = 255
    return torch.rand(n, 1, h, w, generator=g), target


@st.composite
def updates(draw, kind):
    """(pred, target): well-formed, or one of them broken in shape, dtype, kind or values."""
    n, h, w = draw(st.integers(0, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pred, target = _valid_pair(kind, n, h, w, g)
    breakage = draw(
        st.sampled_from(
            ["none", "special", "shape", "channels", "dtype", "numpy", "list", "ids", "rank"]
        )
    )
    which = draw(st.sampled_from(["pred", "target"]))
    t = pred if which == "pred" else target
    if breakage == "special" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    elif breakage == "shape":
        t = t[..., : max(t.shape[-1] - 1, 0)]
    elif breakage == "channels" and t.dim() == 4:
        t = t.repeat(1, 2, 1, 1)
    elif breakage == "dtype":
        t = t.to(
            draw(
                st.sampled_from(
                    [torch.float16, torch.float64, torch.int32, torch.bool, torch.uint8]
                )
            )
        )
    elif breakage == "numpy":
        t = t.numpy()
    elif breakage == "list":
        t = t.tolist()
    elif breakage == "ids" and not t.is_floating_point():
        t = t + draw(st.sampled_from([-300, -1, 7, 1000]))
    elif breakage == "rank":
        t = t[None]
    return (t, target) if which == "pred" else (pred, t)


def _snapshot(meter):
    try:
        return meter.compute()
    except RuntimeError:
        return None


def _finite_numbers(result) -> bool:
    values = []
    for v in result.values():
        values.extend(np.asarray(v, dtype=np.float64).ravel().tolist())
    return all(math.isfinite(v) for v in values)


def _check(kind, first, second):
    make, _ = _meters()[kind]
    meter = make()
    for pred, target in (first, second):
        before = _snapshot(meter)
        try:
            meter.update(pred, target)
        except (ValueError, TypeError) as e:
            assert names_argument(str(e), ("pred", "target", "prediction")), f"{kind}: {e}"
            after = _snapshot(meter)
            assert (before is None) == (after is None) and (
                before is None or _same(before, after)
            ), f"{kind}: a refused update changed the meter"
    result = _snapshot(meter)
    if result is not None:
        assert _finite_numbers(result), f"{kind}: compute() gave {result}"


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True) for k in a
    )


@given(st.data())
def test_segmentation_meter(data):
    _check("segmentation", data.draw(updates("segmentation")), data.draw(updates("segmentation")))


@given(st.data())
def test_depth_meter(data):
    _check("depth", data.draw(updates("depth")), data.draw(updates("depth")))


@given(st.data())
def test_normals_meter(data):
    _check("normals", data.draw(updates("normals")), data.draw(updates("normals")))


@given(st.data())
def test_saliency_meter(data):
    _check("saliency", data.draw(updates("saliency")), data.draw(updates("saliency")))


@given(st.data())
def test_edge_meter(data):
    _check("edge", data.draw(updates("edge")), data.draw(updates("edge")))
