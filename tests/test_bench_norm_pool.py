"""benchmarks/bench_norm_pool.py: its measurement runs and agrees with aten on small layers."""

import pytest

from benchmarks.bench_norm_pool import measure
from mtlfast._extension import has_extension

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")


@pytest.mark.parametrize(
    "kind,shape,option",
    [
        ("batch_norm", (2, 5, 6, 6), False),
        ("batch_norm", (2, 5, 6, 6), True),
        ("max_pool2d", (2, 3, 9, 9), (3, 2, 1)),
    ],
)
def test_measure_reports_both_sides(kind, shape, option):
    row = measure(kind, shape, option, rounds=1)
    assert row["max_abs_difference"] < 1e-5
    for what in ("forward", "forward_backward"):
        assert set(row[what]["median_ms"]) == {"mtlfast", "aten"}
        assert row[what]["ratio_mtlfast_over_aten"] > 0
