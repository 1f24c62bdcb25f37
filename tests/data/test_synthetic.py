"""SyntheticScenes: determinism, layout, geometric consistency, partial labels, batching."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from mtlfast.data import TASKS, SyntheticScenes, collate, label_boundaries


@pytest.fixture(scope="module")
def ds():
    return SyntheticScenes(num_samples=8, size=(48, 64), seed=7)


def test_deterministic_from_seed_and_index(ds):
    a = ds[3]
    ds[0]  # order of access must not matter
    b = SyntheticScenes(num_samples=8, size=(48, 64), seed=7)[3]
    for k in ("image", *TASKS):
        assert torch.equal(a[k], b[k]), k
    c = SyntheticScenes(num_samples=8, size=(48, 64), seed=8)[3]
    assert not torch.equal(a["image"], c["image"])
    assert not torch.equal(a["image"], ds[4]["image"])


def test_layout_and_value_ranges(ds):
    s = ds[1]
    h, w = 48, 64
    expected = {
        "image": ((3, h, w), torch.float32),
        "semseg": ((h, w), torch.int64),
        "parts": ((h, w), torch.int64),
        "saliency": ((1, h, w), torch.float32),
        "edge": ((1, h, w), torch.float32),
        "normals": ((3, h, w), torch.float32),
        "depth": ((1, h, w), torch.float32),
    }
    for k, (shape, dtype) in expected.items():
        assert s[k].shape == shape and s[k].dtype == dtype, k
    assert s["labeled"] == {t: True for t in TASKS}
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert 0 <= s["semseg"].min() and s["semseg"].max() < ds.num_classes
    assert 0 <= s["parts"].min() and s["parts"].max() < ds.num_parts
    assert set(s["saliency"].unique().tolist()) <= {0.0, 1.0}
    assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(s["normals"].norm(dim=0), torch.ones(h, w), atol=1e-5)
    assert (s["depth"] > 0).all() and torch.isfinite(s["depth"]).all()


def test_targets_agree_with_each_other():
    ds = SyntheticScenes(num_samples=6, size=40, seed=1, objects=(3, 5))
    for i in range(len(ds)):
        s = ds[i]
        on_object = s["semseg"] >= 2
        assert torch.equal(s["saliency"][0] > 0, on_object)
        assert torch.equal(s["parts"] > 0, on_object)
        # A part belongs to its object's shape: parts 1+2k and 2+2k go with class 2+k.
        shape_of_part = (s["parts"] - 1) // 2 + 2
        assert torch.equal(shape_of_part[on_object], s["semseg"][on_object])
        # Normals face the camera.
        rays = torch.from_numpy(ds.rays()).permute(2, 0, 1).float()
        assert ((s["normals"] * rays).sum(0) < 0).all()


def test_normals_match_back_projected_depth():
    ds = SyntheticScenes(num_samples=4, size=96, seed=3, noise=0.0)
    rays = ds.rays()
    checked = 0
    for i in range(len(ds)):
        scene = ds.render(i)
        points = scene["depth"][0, :, :, None].astype(np.float64) * rays
        du = points[1:-1, 2:] - points[1:-1, :-2]
        dv = points[2:, 1:-1] - points[:-2, 1:-1]
        n_fd = -np.cross(du, dv)
        n_fd /= np.linalg.norm(n_fd, axis=-1, keepdims=True)
        n = scene["normals"].transpose(1, 2, 0)
        # Smooth interiors: the 3x3 neighbourhood is one surface whose normal barely turns.
        smooth = np.ones(n_fd.shape[:2], dtype=bool)
        centre = n[1:-1, 1:-1]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                sl = (slice(1 + dy, n.shape[0] - 1 + dy), slice(1 + dx, n.shape[1] - 1 + dx))
                smooth &= scene["instance"][sl] == scene["instance"][1:-1, 1:-1]
                smooth &= np.einsum("hwc,hwc->hw", n[sl], centre) > np.cos(np.radians(8))
        cos = np.einsum("hwc,hwc->hw", n_fd, centre)[smooth]
        assert smooth.mean() > 0.8
        assert np.quantile(cos, 0.99) > 0.999 and cos.min() > 0.98, (i, cos.min())
        checked += smooth.sum()
    assert checked > 20000


def test_edges_mark_class_and_occlusion_boundaries():
    ds = SyntheticScenes(num_samples=4, size=64, seed=5, objects=(3, 5))
    for i in range(len(ds)):
        scene = ds.render(i)
        edge = scene["edge"][0] > 0
        semseg = scene["semseg"]
        # Every pair of neighbours with different classes has an edge pixel on its upper/left side.
        assert edge[:, :-1][semseg[:, :-1] != semseg[:, 1:]].all()
        assert edge[:-1, :][semseg[:-1, :] != semseg[1:, :]].all()
        # ...and every edge pixel is on a class boundary or an object's outline.
        region = np.where(scene["instance"] >= 5, scene["instance"], semseg)
        assert np.array_equal(edge, label_boundaries(region))
        assert edge.mean() < 0.15


def test_random_partial_labels_fill_ignore():
    ds = SyntheticScenes(num_samples=12, size=24, seed=2, labels="random", label_prob=0.4)
    counts = dict.fromkeys(TASKS, 0)
    for i in range(len(ds)):
        s = ds[i]
        assert any(s["labeled"].values())
        assert s["labeled"] == ds.labeled(i)
        for t, flag in s["labeled"].items():
            counts[t] += flag
            if flag:
                continue
            if t in ("semseg", "parts", "saliency", "edge"):
                assert (s[t] == 255).all(), t
            else:
                assert (s[t] == 0).all(), t
    assert 0 < sum(counts.values()) < 12 * len(TASKS)


def test_source_datasets_label_their_tasks_only():
    sources = [("semseg", "parts"), ("normals", "depth"), ("saliency", "edge")]
    ds = SyntheticScenes(num_samples=6, size=16, labels=sources)
    for i in range(6):
        labeled = ds[i]["labeled"]
        assert {t for t, f in labeled.items() if f} == set(sources[i % 3])
    with pytest.raises(ValueError, match="not in tasks"):
        SyntheticScenes(4, size=16, tasks=("semseg",), labels=[("depth",)])


def test_task_subset_and_shapes_option():
    ds = SyntheticScenes(num_samples=2, size=16, tasks=("depth", "semseg"), shapes=("box",))
    s = ds[0]
    assert set(s) == {"image", "depth", "semseg", "labeled"}
    assert ds.class_names == ("floor", "wall", "box") and ds.num_parts == 3
    with pytest.raises(ValueError, match="unknown task"):
        SyntheticScenes(2, tasks=("segm",))


def test_dataloader_batches_partial_labels():
    ds = SyntheticScenes(num_samples=6, size=(20, 24), labels=[("semseg",), ("depth", "normals")])
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 20, 24)
    assert batch["semseg"].shape == (4, 20, 24) and batch["depth"].shape == (4, 1, 20, 24)
    assert batch["labeled"]["semseg"].dtype == torch.bool
    assert batch["labeled"]["semseg"].tolist() == [True, False, True, False]
    assert batch["labeled"]["depth"].tolist() == [False, True, False, True]
    plain = default_collate([ds[i] for i in range(4)])
    for k in ("image", *TASKS):
        assert torch.equal(plain[k], batch[k])
    assert torch.equal(plain["labeled"]["normals"], batch["labeled"]["normals"])


def test_dataloader_with_a_worker():
    ds = SyntheticScenes(num_samples=4, size=16)
    batches = list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate))
    assert len(batches) == 2
    assert torch.equal(batches[1]["depth"][0], ds[2]["depth"])
