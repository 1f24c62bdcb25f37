"""NYUD on tiny files in each of the three layouts."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from mtlfast.data import NYUD, DataFileError

H, W = 6, 8


def _targets(seed):
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, 41, (H, W)).astype(np.uint8)
    depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
    depth[0, 0] = 0.0
    # Smooth like real normals (JPEG would smear a random field beyond recognition).
    v, u = np.mgrid[0:H, 0:W] / 10.0
    n = np.stack([u - 0.3 + seed * 0.1, v - 0.2, -np.ones_like(u)], axis=-1).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[1, 1] = 0
    edge = (rng.random((H, W)) > 0.7).astype(np.float32)
    return seg, depth, n, edge


def _write(root, layout, names=("0001", "0002")):
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "gt_sets/train.txt").write_text("\n".join(names) + "\n")
    truth = {}
    for k, name in enumerate(names):
        seg, depth, n, edge = _targets(k)
        image = np.full((H, W, 3), 40 * k, dtype=np.uint8)
        n8 = np.round((n + 1) * 127.5).astype(np.uint8)
        e8 = (edge * 255).astype(np.uint8)
        if layout == "mtinet":
            Image.fromarray(image).save(root / f"images/{name}.jpg")
            Image.fromarray(seg).save(root / f"segmentation/{name}.png")
            np.save(root / f"depth/{name}.npy", depth)
            np.save(root / f"normals/{name}.npy", n)
            np.save(root / f"edge/{name}.npy", edge)
        elif layout == "atrc":
            Image.fromarray(image).save(root / f"images/{name}.png")
            Image.fromarray(seg).save(root / f"segmentation/{name}.png")
            np.save(root / f"depth/{name}.npy", depth[..., None])
            Image.fromarray(n8).save(root / f"normals/{name}.png")
            Image.fromarray(e8).save(root / f"edge/{name}.png")
        else:
            Image.fromarray(image).save(root / f"images/{name}.jpg")
            savemat(root / f"segmentation/{name}.mat", {"segmentation": seg})
            savemat(root / f"depth/{name}.mat", {"depth": depth})
            Image.fromarray(n8).save(root / f"normals/{name}.jpg", quality=100)
            Image.fromarray(e8).save(root / f"edge/{name}.png")
        truth[name] = (seg, depth, n, edge)
    return truth


@pytest.mark.parametrize("layout", ["mtinet", "atrc", "astmt"])
def test_detects_layout_and_decodes(tmp_path, layout):
    truth = _write(tmp_path, layout)
    ds = NYUD(tmp_path, "train")
    assert ds.layout == layout and len(ds) == 2
    s = ds[1]
    seg, depth, n, edge = truth["0002"]
    assert s["name"] == "0002" and s["image"].shape == (3, H, W)
    assert s["semseg"].dtype == torch.int64
    expected_seg = np.where(seg == 0, 255, seg.astype(np.int64) - 1)
    assert np.array_equal(s["semseg"].numpy(), expected_seg)
    assert s["depth"].shape == (1, H, W) and np.allclose(s["depth"][0].numpy(), depth)
    assert s["depth"][0, 0, 0] == 0
    assert s["edge"].shape == (1, H, W) and np.array_equal(s["edge"][0].numpy(), edge)
    got = s["normals"].permute(1, 2, 0).numpy()
    norm = np.linalg.norm(got, axis=-1)
    assert np.allclose(norm[norm > 0], 1, atol=1e-5)
    cos = (got * n).sum(-1)
    if layout == "astmt":
        # JPEG smears the invalid pixel into its neighbours: compare away from it.
        assert cos[3:, 3:].min() > 0.98
    else:
        # Lossless for .npy; PNG up to 8-bit quantisation.
        assert norm[1, 1] == 0 and (norm > 0).sum() == H * W - 1
        cos[1, 1] = 1
        assert cos.min() > (0.9999 if layout == "mtinet" else 0.999)
    assert s["labeled"] == {t: True for t in ("semseg", "normals", "edge", "depth")}


def test_task_subset_needs_only_its_files(tmp_path):
    _write(tmp_path, "atrc")
    for p in (tmp_path / "normals").iterdir():
        p.unlink()
    ds = NYUD(tmp_path, "train", tasks=("semseg", "depth"))
    assert ds.layout == "atrc" and set(ds[0]) == {"image", "semseg", "depth", "labeled", "name"}


def test_errors_name_files(tmp_path):
    _write(tmp_path, "mtinet")
    (tmp_path / "depth/0001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"depth/0001\.npy"):
        NYUD(tmp_path, "train")
    ds = NYUD(tmp_path, "train", tasks=("semseg", "normals"))
    (tmp_path / "normals/0002.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"normals/0002\.npy"):
        ds[1]
    (tmp_path / "segmentation/0001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFileError, match=r"segmentation/0001\.png"):
        ds[0]
    np.save(tmp_path / "normals/0002.npy", np.zeros((H, W + 1, 3)))
    with pytest.raises(DataFileError, match=r"normals/0002\.npy"):
        ds[1]
    with pytest.raises(ValueError, match="layout"):
        NYUD(tmp_path, "train", layout="nyu")


@pytest.mark.parametrize("dtype", (np.complex64, bool, np.int32, np.uint16))
@pytest.mark.parametrize("layout", ["mtinet", "astmt"])
def test_depth_of_a_non_float_kind_raises_naming_the_file(tmp_path, layout, dtype):
    """Issue 16: complex, bool and int depth files were cast to float32 silently."""
    _write(tmp_path, layout)
    ds = NYUD(tmp_path, "train", tasks=("depth",))
    depth = np.ones((H, W), dtype=dtype)
    if layout == "mtinet":
        np.save(tmp_path / "depth/0001.npy", depth)
        where = r"depth/0001\.npy"
    else:
        savemat(tmp_path / "depth/0001.mat", {"depth": depth})
        where = r"depth/0001\.mat"
    with pytest.raises(DataFileError, match=where):
        ds[0]
    assert ds[1]["depth"].dtype == torch.float32


@pytest.mark.parametrize("layout", ["mtinet", "astmt"])
def test_class_ids_above_255_raise_naming_the_file(tmp_path, layout):
    """Issue 16: a uint16 semseg PNG value above 255 was read as a class."""
    _write(tmp_path, layout)
    ds = NYUD(tmp_path, "train", tasks=("semseg",))
    seg = np.full((H, W), 3, dtype=np.uint16)
    seg[0, 0] = 300
    if layout == "mtinet":
        Image.fromarray(seg).save(tmp_path / "segmentation/0001.png")
        where = r"segmentation/0001\.png.*300"
    else:
        savemat(tmp_path / "segmentation/0001.mat", {"segmentation": seg})
        where = r"segmentation/0001\.mat.*300"
    with pytest.raises(DataFileError, match=where):
        ds[0]
    seg[0, 0] = 40  # a 16-bit file whose values fit is read
    if layout == "mtinet":
        Image.fromarray(seg).save(tmp_path / "segmentation/0001.png")
    else:
        savemat(tmp_path / "segmentation/0001.mat", {"segmentation": seg})
    assert ds[0]["semseg"].max() == 39
