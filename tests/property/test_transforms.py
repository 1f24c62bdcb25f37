"""Properties of the joint transforms: nonsense parameters raise naming the parameter; accepted
ones keep every target consistent with its image (shapes, ids, invalid markers, unit normals)."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtlfast.data import transforms as T

from .strategies import names_argument

IGNORE = 255

#: parameter values from sensible to absurd
_NUMBERS = st.one_of(
    st.integers(-5, 12),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, 0.0, -0.0, 1e-9, 1e9, True, False]),
)
_VALUES = st.one_of(
    _NUMBERS,
    st.lists(_NUMBERS, max_size=4),
    st.lists(_NUMBERS, max_size=4).map(tuple),
    st.sampled_from([None, "3", b"x", {}, object()]),
)

#: transform class, its argument's name, a strategy for sensible values
_CONSTRUCTORS = {
    "Resize": (T.Resize, "size"),
    "RandomCrop": (T.RandomCrop, "size"),
    "RandomScale": (T.RandomScale, "scales"),
    "RandomRotation": (T.RandomRotation, "degrees"),
    "RandomHorizontalFlip": (T.RandomHorizontalFlip, "p"),
    "Normalize(std)": (lambda v: T.Normalize(std=v), "std"),
    "Normalize(mean)": (lambda v: T.Normalize(mean=v), "mean"),
}


@st.composite
def samples(draw):
    """A sample dict in the layout of mtlfast.data, tiny, every target present."""
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    semseg = torch.randint(0, 21, (h, w), generator=g)
    semseg[torch.rand(h, w, generator=g) < 0.2] = IGNORE
    normals = torch.nn.functional.normalize(torch.randn(3, h, w, generator=g), dim=0)
    normals[:, torch.rand(h, w, generator=g) < 0.2] = 0.0
    depth = torch.rand(1, h, w, generator=g) * 10
    depth[torch.rand(1, h, w, generator=g) < 0.2] = 0.0
    return {
        "image": torch.rand(3, h, w, generator=g),
        "semseg": semseg,
        "edge": (torch.rand(1, h, w, generator=g) > 0.7).float(),
        "normals": normals,
        "depth": depth,
        "labeled": {"semseg": True},
        "name": "x",
    }


def _check_consistent(before: dict, after: dict) -> None:
    h, w = after["image"].shape[-2:]
    assert after["image"].shape == (3, h, w) and h >= 1 and w >= 1
    assert after["semseg"].shape == (h, w) and after["semseg"].dtype == torch.int64
    for k, c in (("edge", 1), ("normals", 3), ("depth", 1)):
        assert after[k].shape == (c, h, w), k
    # ids stay ids and ignore stays ignore: nothing is interpolated
    allowed = set(before["semseg"].unique().tolist()) | {IGNORE}
    assert set(after["semseg"].unique().tolist()) <= allowed
    assert set(after["edge"].unique().tolist()) <= {0.0, 1.0, float(IGNORE)}
    # depth values are copied or invalid (0); normals are unit vectors or invalid (0)
    allowed_depth = set(before["depth"].unique().tolist()) | {0.0}
    assert set(after["depth"].unique().tolist()) <= allowed_depth
    norm = after["normals"].norm(dim=0)
    assert bool(((norm - 1).abs() < 1e-4).logical_or(norm == 0).all())
    assert torch.isfinite(after["image"]).all()
    assert after["labeled"] == before["labeled"] and after["name"] == before["name"]


@given(st.sampled_from(sorted(_CONSTRUCTORS)), _VALUES, samples())
def test_nonsense_parameters_raise_naming_them(which, value, sample):
    make, arg = _CONSTRUCTORS[which]
    try:
        transform = make(value)
    except (ValueError, TypeError) as e:
        assert names_argument(str(e), (arg,)), f"{which}({value!r}): {e}"
        return
    if which in ("Resize", "RandomCrop") and max(transform.size) > 16:
        return  # valid, just large
    if which == "RandomScale" and max(transform.scales) > 8:
        return
    out = transform(sample)
    if which.startswith("Normalize"):
        assert torch.isfinite(out["image"]).all()
        return
    _check_consistent(sample, out)


@given(
    samples(),
    st.lists(
        st.one_of(
            st.integers(1, 9).map(T.RandomCrop),
            st.tuples(st.integers(1, 9), st.integers(1, 9)).map(T.Resize),
            st.tuples(st.floats(0.1, 2.0), st.floats(0.0, 2.0)).map(
                lambda s: T.RandomScale((s[0], s[0] + s[1]))
            ),
            st.floats(0.0, 1.0).map(T.RandomHorizontalFlip),
            st.floats(0.0, 360.0).map(T.RandomRotation),
        ),
        max_size=4,
    ),
    st.integers(0, 2**16),
)
def test_compositions_keep_targets_consistent(sample, transforms, seed):
    torch.manual_seed(seed)
    _check_consistent(sample, T.Compose(transforms)(sample))


@given(st.floats(-720, 720, allow_nan=False), samples())
def test_rotation_keeps_normals_unit_and_inside_pixels_valid(degrees, sample):
    out = T.rotate(sample, degrees)
    _check_consistent(sample, out)
    if math.isclose(degrees % 360, 0, abs_tol=1e-9):
        assert torch.equal(out["semseg"], sample["semseg"])


@given(samples())
def test_to_tensor_then_flip_twice_is_identity(sample):
    arrays = {k: v.numpy() for k, v in sample.items() if isinstance(v, torch.Tensor)}
    arrays["image"] = (np.transpose(arrays["image"], (1, 2, 0)) * 255).astype(np.uint8)
    arrays["normals"] = np.transpose(arrays["normals"], (1, 2, 0))
    arrays["semseg"] = arrays["semseg"].astype(np.uint8)
    arrays["depth"] = arrays["depth"][0]
    arrays["edge"] = arrays["edge"][0]
    tensors = T.ToTensor()(arrays)
    assert torch.equal(T.hflip(T.hflip(tensors))["semseg"], tensors["semseg"])
    assert torch.equal(tensors["semseg"], sample["semseg"])
