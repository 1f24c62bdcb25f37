"""delta_m: MTI-Net Eq. 2."""

import pytest

from mtlfast.metrics import delta_m


def test_hand_computed():
    results = {"semseg": {"mIoU": 0.5}, "depth": {"rmse": 0.5}}
    results.update(normals={"mean": 20.0}, edge={"odsF": 0.7})
    base = {"semseg": {"mIoU": 0.4}, "depth": {"rmse": 0.6}}
    base.update(normals={"mean": 16.0}, edge={"odsF": 0.7})
    want = (0.25 + 1 / 6 - 0.25 + 0) / 4
    assert delta_m(results, base) == pytest.approx(want)


def test_metric_choice_and_override():
    results = {"saliency": {"mIoU": 0.6, "maxF": 0.9}, "loss": 2.0}
    base = {"saliency": {"mIoU": 0.5, "maxF": 0.8}, "loss": 1.0}
    assert delta_m(results, base) == pytest.approx((0.2 - 1.0) / 2)
    assert delta_m(results, base, metrics={"saliency": "maxF"}) == pytest.approx((0.125 - 1.0) / 2)
    assert delta_m(results, base, lower_is_better={"loss": False}) == pytest.approx((0.2 + 1.0) / 2)
    with pytest.raises(ValueError, match="direction"):
        delta_m({"x": 1.0}, {"x": 2.0})
    assert delta_m({"x": 1.0}, {"x": 2.0}, lower_is_better={"x": True}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no baseline"):
        delta_m({"edge": 0.5}, {})
