"""benchmarks/flop_floor.py counts what a step's matrix arithmetic is, Winograd's included."""

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flop_floor
from mtlfast._extension import has_extension


def test_direct_convolution_counts_forward_and_both_gradients():
    x = torch.randn(2, 8, 10, 12, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    total, per_op = flop_floor.count(lambda: F.conv2d(x, w, padding=1).sum().backward())
    forward = 2 * 2 * 16 * 10 * 12 * 8 * 9
    assert total == pytest.approx(3 * forward / 1e9)
    assert set(per_op) == {"aten.convolution", "aten.convolution_backward"}


@pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")
@pytest.mark.parametrize("tile,positions,tiles", [(4, 36, 5 * 5), (2, 16, 9 * 9)])
def test_winograd_convolution_counts_its_products(tile, positions, tiles):
    # 18x17: partial tiles count whole, as the op computes them (5 x 5 tiles of 4x4, 9 x 9 of 2x2)
    x = torch.randn(2, 4, 18, 17, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    op = torch.ops.mtlfast.winograd_conv3x3
    total, per_op = flop_floor.count(lambda: op(x, w, None, tile).sum().backward())
    products = 2 * positions * (2 * tiles) * 4 * 6
    assert per_op["mtlfast.winograd_conv3x3"] == pytest.approx(products / 1e9)
    assert per_op["mtlfast.winograd_conv3x3_backward"] == pytest.approx(2 * products / 1e9)
    assert total == pytest.approx(3 * products / 1e9)


@pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")
def test_the_library_counts_winograd_as_the_direct_convolution():
    # mtlfast.models.summary's counting (the benchmark alone counts the products)
    from mtlfast.ops.winograd_conv import _flop_formulas

    x = torch.randn(2, 4, 18, 17, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    op = torch.ops.mtlfast.winograd_conv3x3
    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
    with counter:
        op(x, w, None).sum().backward()
    direct = 2 * 2 * 18 * 17 * 4 * 6 * 9
    assert counter.get_total_flops() == 3 * direct
