"""SegmentationMeter: pooled confusion matrix, ignore, absent classes."""

import numpy as np
import pytest
import torch

from mtlfast.metrics import SegmentationMeter


def test_hand_computed_with_absent_class():
    gt = torch.tensor([[[0, 0], [1, 255]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    m = SegmentationMeter(3)
    m.update(pred, gt)
    out = m.compute()
    # class 0: tp 1, fn 1 -> 1/2; class 1: tp 1, fp 1 -> 1/2; class 2 never present -> 0.
    assert out["IoU"] == pytest.approx([0.5, 0.5, 0.0])
    assert out["mIoU"] == pytest.approx(1 / 3)
    assert out["pixel_acc"] == pytest.approx(2 / 3)


def test_logits_streaming_and_reset():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 7)
    gt = torch.randint(0, 5, (4, 1, 6, 7))
    gt[0, 0, :2] = 255
    one = SegmentationMeter(5)
    one.update(logits, gt)
    two = SegmentationMeter(5)
    two.update(logits[:1], gt[:1])
    two.update(logits[1:].numpy(), gt[1:].numpy())
    assert one.compute() == two.compute()
    labels = logits.argmax(1)
    valid = gt[:, 0] != 255
    for c in range(5):
        tp = ((labels == c) & (gt[:, 0] == c) & valid).sum().item()
        union = (((labels == c) | (gt[:, 0] == c)) & valid).sum().item()
        assert one.compute()["IoU"][c] == pytest.approx(tp / union)
    two.reset()
    assert two.confusion.sum() == 0


def test_perfect_and_out_of_range_prediction():
    gt = np.array([[[0, 1], [1, 255]]])
    m = SegmentationMeter(2)
    m.update(np.where(gt == 255, 7, gt), gt)  # anything under the ignore label is free
    assert m.compute()["mIoU"] == 1.0
    m = SegmentationMeter(2)
    m.update(np.array([[[0, 9], [1, 1]]]), gt)  # 9: a miss of class 1, no false positive
    assert m.compute()["IoU"] == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError):
        m.update(np.array([[[0, 0], [0, 0]]]), np.array([[[0, 3], [0, 0]]]))


# ---- issue 16 ----------------------------------------------------------------------------


def test_compute_before_update_raises_like_every_meter():
    with pytest.raises(RuntimeError, match=r"SegmentationMeter.compute\(\) before any valid pixel"):
        SegmentationMeter(3).compute()
    m = SegmentationMeter(3)
    m.update(torch.tensor([[[1]]]), torch.tensor([[[255]]]))  # ignored pixels only
    with pytest.raises(RuntimeError, match="before any valid pixel"):
        m.compute()


@pytest.mark.parametrize("channels", (5, 22))
def test_scores_with_other_channel_count_than_num_classes(channels):
    m = SegmentationMeter(21)
    with pytest.raises(
        ValueError, match=r"pred scores must be \(N, C, H, W\) with C = num_classes = 21"
    ):
        m.update(torch.randn(1, channels, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("bad_id", (3, -1, 2**40))
def test_out_of_range_predicted_ids_are_misses_not_index_errors(bad_id):
    m = SegmentationMeter(3)
    m.update(torch.tensor([[[bad_id, 1]]]), torch.tensor([[[1, 1]]]))
    out = m.compute()
    assert out["IoU"][1] == pytest.approx(0.5) and out["pixel_acc"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad_id", (3, -1, 254, 2**40))
def test_out_of_range_target_ids_raise_naming_target(bad_id):
    """Issue 16: out-of-range class ids reached torch's IndexError; the meter is left unchanged."""
    m = SegmentationMeter(3)
    with pytest.raises(ValueError, match=r"target holds ids outside \[0, 3\)"):
        m.update(torch.tensor([[[1, 1]]]), torch.tensor([[[bad_id, 1]]]))
    assert not m.confusion.any()
