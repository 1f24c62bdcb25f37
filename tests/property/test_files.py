"""Properties of everything that reads a file: the dataset readers (``mtlfast.data._io``) and the
checkpoint loaders. Any file, generated or corrupted, gives data of the kind asked for or an
error naming the file; a pickle that would run code is refused without running it."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from scipy.io import savemat

from mtlfast.backbones import ResNet, load_pretrained
from mtlfast.data import DataFileError
from mtlfast.data._io import read_mat, read_npy, read_png, read_rgb
from mtlfast.models import release_options
from mtlfast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

_DTYPES = ["float32", "float64", "float16", "int32", "uint8", "uint16", "bool", "complex64", "U2"]
_KINDS = [None, "f", "iu", "uif", "b"]


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(scale=draw(st.sampled_from([1.0, 300.0, 1e5])), size=shape)
    if dtype.kind == "U":
        return np.full(shape, "ab", dtype=dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(values, info.min, info.max).astype(dtype)
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def _corrupt(path, draw, modes=("none", "truncate", "flip", "empty")):
    """Truncate the file, flip some bytes, or leave it."""
    how = draw(st.sampled_from(modes))
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip" and data:
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "empty":
        data = bytearray()
    with open(path, "wb") as f:
        f.write(data)
    return how


def _check_read(read, path, kinds=None, max_value=None, refused="cOSUV"):
    """``read()`` gives an array of ``kinds`` (never a kind in ``refused``) within
    ``max_value``, or raises an error naming ``path``."""
    try:
        out = read()
    except (DataFileError, FileNotFoundError) as e:
        assert os.path.basename(path) in str(e), f"error names no file: {e}"
        return None
    assert isinstance(out, np.ndarray)
    if kinds is not None:
        assert out.dtype.kind in kinds
    assert out.dtype.kind not in refused, f"read {out.dtype}"
    if max_value is not None and out.size:
        assert out.max() <= max_value
    return out


@given(arrays(), st.sampled_from(_KINDS), st.data())
def test_read_npy_gives_the_kinds_asked_or_names_the_file(array, kinds, data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "depth.npy")
        np.save(path, array)
        how = _corrupt(path, data.draw)
        out = _check_read(lambda: read_npy(path, "depth array", kinds=kinds), path, kinds)
        if how == "none" and out is not None:
            assert np.array_equal(out, array)


@given(arrays(), st.sampled_from(_KINDS), st.sampled_from([None, 255]), st.data())
def test_read_mat_gives_the_kinds_asked_or_names_the_file(array, kinds, max_value, data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "seg.mat")
        try:
            savemat(path, {"v": array})
        except Exception:  # noqa: BLE001 - scipy cannot write every dtype (float16)
            return
        # No flipped bytes: scipy 1.17.1's loadmat dies with SIGSEGV on some (a 184-byte file
        # with a flipped array-flags byte did), beyond what a reader can catch. Truncation is safe.
        _corrupt(path, data.draw, modes=("none", "truncate", "empty"))
        key = data.draw(st.sampled_from(["v", "missing"]))
        # MATLAB structs and char arrays come back as object, record or str arrays: only complex
        # is refused by default
        read = lambda: read_mat(path, key, "label file", kinds, max_value)
        _check_read(read, path, kinds, max_value, refused="c")


@st.composite
def images(draw):
    mode, dtype = draw(
        st.sampled_from(
            [("L", "uint8"), ("I;16", "uint16"), ("RGB", "uint8"), ("P", "uint8"), ("1", "bool")]
        )
    )
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    high = {"uint8": 256, "uint16": 1000, "bool": 2}[dtype]
    values = rng.integers(0, high, shape).astype(dtype)
    image = (
        Image.fromarray(values) if mode not in ("P", "1") else Image.fromarray(values).convert(mode)
    )
    return image, draw(st.sampled_from(["png", "jpg"])) if mode in ("L", "RGB") else "png"


@given(images(), st.sampled_from([None, 255]), st.data())
def test_read_png_and_rgb_give_images_or_name_the_file(image, max_value, data):
    image, ext = image
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"label.{ext}")
        image.save(path)
        _corrupt(path, data.draw)
        _check_read(
            lambda: read_png(path, "label image", max_value=max_value), path, None, max_value
        )
        rgb = _check_read(lambda: read_rgb(path), path)
        if rgb is not None:
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


class _Sentinel:
    """Unpickling it would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@st.composite
def checkpoint_payloads(draw, marker):
    kind = draw(
        st.sampled_from(["valid", "list", "no_model", "format", "code", "numpy", "nested_code"])
    )
    model = {"w": torch.randn(2, 2), "n": torch.tensor(3)}
    if kind == "valid":
        return kind, {"model": model, "step": 3, "config": {"a": [1, 2.5, "x"]}}
    if kind == "list":
        return kind, [model]
    if kind == "no_model":
        return kind, {"step": 1}
    if kind == "format":
        return kind, {"model": model, "format": "other-1"}
    if kind == "numpy":
        return kind, {"model": model, "rng": np.random.get_state()}
    if kind == "code":
        return kind, _Sentinel(marker)
    return kind, {"model": model, "trainer": {"history": [_Sentinel(marker)]}}


def _write(path, payload):
    if isinstance(payload, dict) and "format" not in payload and "rng" not in payload:
        save_checkpoint(payload, path)
    else:
        torch.save(payload, path)


@given(st.data())
def test_load_checkpoint_gives_a_checkpoint_or_names_the_file(data):
    with tempfile.TemporaryDirectory() as d:
        marker = os.path.join(d, "code_ran")
        path = os.path.join(d, "step_3.pt")
        kind, payload = data.draw(checkpoint_payloads(marker))
        _write(path, payload)
        how = _corrupt(path, data.draw)
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            assert "step_3.pt" in str(e)
        else:
            assert kind == "valid" and isinstance(state, dict) and "model" in state
            if how == "none":
                assert torch.equal(state["model"]["w"], payload["model"]["w"])
        assert not os.path.exists(marker), "unpickling ran code"


@given(st.data())
def test_weight_loaders_refuse_what_is_not_a_state_dict(data):
    """load_pretrained and release_options raise ValueError or TypeError (documented), nothing
    else, on any file; a state dict that fits nothing loads nothing (with warnings)."""
    with tempfile.TemporaryDirectory() as d:
        marker = os.path.join(d, "code_ran")
        path = os.path.join(d, "weights.pth")
        _, payload = data.draw(checkpoint_payloads(marker))
        if isinstance(payload, dict) and "model" in payload and data.draw(st.booleans()):
            payload = payload["model"]  # a bare state dict
        torch.save(payload, path)
        _corrupt(path, data.draw)
        model = ResNet(depth=18, width=0.125)
        for load in (lambda: load_pretrained(model, path), lambda: release_options(path)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    load()
            except (ValueError, TypeError):
                pass
        assert not os.path.exists(marker), "unpickling ran code"
