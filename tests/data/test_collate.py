"""collate: stacking, labeled flags, targets missing from some samples."""

import pytest
import torch

from mtlfast.data import SyntheticScenes, collate


def test_missing_targets_are_ignore_filled_and_unlabelled():
    a = SyntheticScenes(2, size=(6, 5), tasks=("semseg", "depth"))[0]
    b = SyntheticScenes(2, size=(6, 5), tasks=("semseg", "normals", "edge"))[1]
    b["name"] = "b"
    batch = collate([a, b])
    assert batch["semseg"].shape == (2, 6, 5) and batch["depth"].shape == (2, 1, 6, 5)
    assert batch["normals"].shape == (2, 3, 6, 5) and batch["edge"].shape == (2, 1, 6, 5)
    assert (batch["depth"][1] == 0).all() and (batch["normals"][0] == 0).all()
    assert (batch["edge"][0] == 255).all()
    assert isinstance(batch["labeled"], dict)
    assert batch["labeled"]["semseg"].tolist() == [True, True]
    assert batch["labeled"]["depth"].tolist() == [True, False]
    assert batch["labeled"]["normals"].tolist() == [False, True]
    assert batch["name"] == [None, "b"]


def test_rejects_mixed_sizes_and_empty_batches():
    a = SyntheticScenes(1, size=8)[0]
    b = SyntheticScenes(1, size=(8, 9))[0]
    with pytest.raises(ValueError, match="different sizes"):
        collate([a, b])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_no_objects_and_odd_sizes():
    ds = SyntheticScenes(2, size=(7, 5), objects=(0, 0), shapes=("cylinder", "sphere"))
    s = ds[1]
    assert s["image"].shape == (3, 7, 5) and (s["semseg"] <= 1).all() and (s["parts"] == 0).all()
    batch = collate([ds[0], s])
    assert batch["labeled"]["parts"].dtype == torch.bool and batch["parts"].shape == (2, 7, 5)
