"""PascalContext on tiny files written in the release's formats."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader

from mtlfast.data import DataFileError, PascalContext, collate
from mtlfast.data import transforms as T

H, W = 12, 16


def _anno(objects):
    """A PASCAL-Part ``anno`` struct: objects = [(class_ind, mask, [(part_name, mask), ...])]."""
    obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, len(objects)), dtype=obj_dtype)
    for j, (cls, mask, parts) in enumerate(objects):
        if parts:
            arr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for i, (name, pmask) in enumerate(parts):
                arr[0, i] = (name, pmask.astype(np.uint8))
        else:
            arr = np.zeros((0, 0))
        label = "person" if cls == 15 else "other"
        objs[0, j] = (label, np.array([[cls]], dtype=np.uint8), mask.astype(np.uint8), arr)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("img", objs)
    return anno


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for d in (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/pascal-context",
        "semseg/VOC12",
        "human_parts",
        "normals_distill",
        "sal_distill",
        "pascal-context/trainval",
        "json",
    ):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "ImageSets/Context/train.txt").write_text("a\nb\n")
    (tmp_path / "json/nyu_classes.json").write_text(json.dumps(["wall", "floor", "unknown", "sky"]))
    context = {"wall": 7, "floor": 9, "tvmonitor": 11, "unknown": 3}
    (tmp_path / "json/context_classes.json").write_text(json.dumps(context))
    label_map = np.zeros((H, W), dtype=np.uint16)
    label_map[:, 8:] = 7
    label_map[8:, :] = 9
    label_map[:4, :4] = 11
    label_map[4:8, :4] = 5  # not NYU-compatible: normals invalid there
    for name in ("a", "b"):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"JPEGImages/{name}.jpg")
        seg = np.zeros((H, W), dtype=np.uint8)
        seg[2:6, 3:9] = 15
        seg[0, :] = 255
        Image.fromarray(seg).save(tmp_path / f"semseg/pascal-context/{name}.png")
        normals = np.zeros((H, W, 3), dtype=np.uint8)
        normals[...] = (128, 128, 255)
        Image.fromarray(normals).save(tmp_path / f"normals_distill/{name}.png")
        sal = np.zeros((H, W), dtype=np.uint8)
        sal[:, :5] = 200
        sal[:, 5] = 120  # below 0.5 after /255
        Image.fromarray(sal).save(tmp_path / f"sal_distill/{name}.png")
        savemat(tmp_path / f"pascal-context/trainval/{name}.mat", {"LabelMap": label_map})
    # "a" has a person with parts and a cat; "b" has only a cat.
    body = np.zeros((H, W), bool)
    body[2:10, 3:9] = True
    hair, torso, lhand = (np.zeros((H, W), bool) for _ in range(3))
    hair[2:4, 4:8] = True
    torso[4:8, 4:8] = True
    lhand[6:8, 3:4] = True
    cat = np.zeros((H, W), bool)
    cat[10:, 10:] = True
    savemat(
        tmp_path / "human_parts/a.mat",
        {
            "anno": _anno(
                [
                    (8, cat, []),
                    (15, body, [("hair", hair), ("torso", torso), ("lhand", lhand)]),
                ]
            )
        },
    )
    savemat(tmp_path / "human_parts/b.mat", {"anno": _anno([(8, cat, [])])})
    return tmp_path


def test_reads_every_task_with_documented_mappings(root):
    ds = PascalContext(root, "train")
    assert len(ds) == 2
    s = ds[0]
    assert s["name"] == "a" and s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    assert s["semseg"].dtype == torch.int64 and s["semseg"][3, 4] == 15 and s["semseg"][0, 0] == 255
    assert s["labeled"] == {t: True for t in ("semseg", "parts", "saliency", "normals", "edge")}
    parts = s["parts"]
    assert parts.dtype == torch.int64
    assert (parts[2:4, 4:8] == 1).all() and (parts[4:6, 4:8] == 2).all()
    assert (parts[6:8, 3] == 4).all()
    assert parts[0, 0] == 0 and set(parts.unique().tolist()) == {0, 1, 2, 4}
    assert s["saliency"].shape == (1, H, W)
    assert (s["saliency"][0, :, :5] == 1).all() and (s["saliency"][0, :, 5:] == 0).all()
    n = s["normals"]
    assert n.shape == (3, H, W)
    valid = n.norm(dim=0) > 0
    # Valid on wall (7), floor (9) and tvmonitor (11), not on class 5 or 0.
    assert valid[:, 8:].all() and valid[8:].all() and valid[:4, :4].all()
    assert not valid[4:8, :4].any() and not valid[4:8, 4:8].any()
    assert torch.allclose(n[:, valid].norm(dim=0), torch.ones(int(valid.sum())), atol=1e-5)
    assert torch.allclose(n[:, 0, 10], torch.tensor([0.0, 0.0, 1.0]), atol=0.01)
    e = s["edge"][0]
    assert set(e.unique().tolist()) == {0.0, 1.0}
    assert e[:, 7:9].sum() >= 4 and e[7:9, :].sum() >= 6  # along the label map's boundaries
    assert e[:3, 10:].sum() == 0  # inside a region


def test_image_without_people_has_ignored_parts(root):
    s = PascalContext(root, "train", tasks=("parts", "semseg"))[1]
    assert not s["labeled"]["parts"] and s["labeled"]["semseg"]
    assert (s["parts"] == 255).all()
    assert set(s) == {"image", "parts", "semseg", "labeled", "name"}


def test_voc12_labels_win_and_normals_classes_override(root):
    seg = np.full((H, W), 3, dtype=np.uint8)
    Image.fromarray(seg).save(root / "semseg/VOC12/a.png")
    (root / "json/nyu_classes.json").unlink()
    ds = PascalContext(root, "train", tasks=("semseg", "normals"), normals_classes=[5])
    s = ds[0]
    assert (s["semseg"] == 3).all()
    assert (s["normals"].norm(dim=0) > 0).sum() == 16
    with pytest.raises(FileNotFoundError, match="nyu_classes.json"):
        PascalContext(root, "train", tasks=("normals",))


def test_missing_and_corrupt_files_are_named(root):
    (root / "sal_distill/b.png").unlink()
    ds = PascalContext(root, "train")
    with pytest.raises(FileNotFoundError, match=r"sal_distill/b\.png"):
        ds[1]
    (root / "human_parts/a.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataFileError, match=r"human_parts/a\.mat"):
        ds[0]
    (root / "JPEGImages/a.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataFileError, match=r"JPEGImages/a\.jpg"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=r"Context/val\.txt"):
        PascalContext(root, "val")


def test_errors_name_the_file_through_a_worker(root):
    (root / "normals_distill/b.png").write_bytes(b"garbage")
    ds = PascalContext(root, "train")
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(DataFileError, match=r"normals_distill/b\.png"):
        list(loader)


def test_batches_after_cropping(root):
    tf = T.Compose([T.RandomCrop(8, generator=torch.Generator().manual_seed(0)), T.Normalize()])
    batch = collate([s for s in PascalContext(root, "train", transform=tf)])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["parts"].shape == (2, 8, 8)
    assert batch["labeled"]["parts"].tolist() == [True, False]
    assert batch["name"] == ["a", "b"]


@pytest.mark.parametrize(
    "folder, task", [("semseg/pascal-context", "semseg"), ("sal_distill", "saliency")]
)
def test_16_bit_png_above_255_raises_naming_the_file(root, folder, task):
    """Issue 16: a uint16 label PNG value above 255 was read as a class (or a saliency value)."""
    image = np.zeros((H, W), dtype=np.uint16)
    image[1, 1] = 1000
    Image.fromarray(image).save(root / f"{folder}/a.png")
    ds = PascalContext(root, "train", tasks=(task,))
    with pytest.raises(DataFileError, match=rf"{folder}/a\.png.*1000"):
        ds[0]
    assert ds[1][task].shape[-2:] == (H, W)
