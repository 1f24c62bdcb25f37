"""Issue 16: every model names its images argument on a wrong input, and takes an empty batch."""

import pytest
import torch

from .test_protocol import CASES, IDS, build


@pytest.fixture(scope="module", params=range(len(CASES)), ids=IDS)
def model(request):
    torch.manual_seed(0)
    return build(*CASES[request.param]).eval()


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 1, 16, 16), (3, 16, 16), (1, 2, 3, 16, 16)])
def test_wrong_shape_names_the_images_and_channels(model, shape):
    with pytest.raises(ValueError, match=r"(x|image) must have shape \(N, 3, H, W\).*images"):
        model(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_raise_type_error(model, dtype):
    with pytest.raises(
        TypeError, match=r"(x|image) must be a floating-point tensor.*(uint8|int64|bool)"
    ):
        model(torch.zeros(2, 3, 16, 16, dtype=dtype))


def test_not_a_tensor_raises_type_error(model):
    with pytest.raises(TypeError, match=r"(x|image) must be a tensor of images"):
        model([[0.0]])


@torch.no_grad()
def test_empty_batch_gives_empty_predictions(model):
    """MTI-Net's feature propagation split its T*N rows into one chunk at N = 0 (IndexError)."""
    out = model(torch.randn(0, 3, 16, 16))
    assert set(model.tasks) <= set(out)
    for task in model.tasks:
        assert out[task].shape == (0, model.out_channels[task], 16, 16)
