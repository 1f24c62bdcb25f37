"""Issue 16: the readers of mtlfast.data._io refuse files that are not data, naming the file."""

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from mtlfast.data import DataFileError
from mtlfast.data._io import read_mat, read_npy, read_png


@pytest.mark.parametrize("dtype", (np.complex64, np.complex128, "U3"))
def test_npy_of_no_data_kind_raises_naming_the_file(tmp_path, dtype):
    path = str(tmp_path / "depth.npy")
    np.save(path, np.ones((2, 2), dtype=dtype))
    with pytest.raises(DataFileError, match=r"depth array .*depth\.npy holds"):
        read_npy(path, "depth array")


@pytest.mark.parametrize("dtype", (bool, np.int32, np.uint16))
def test_npy_kinds_refuse_bool_and_int_depth(tmp_path, dtype):
    path = str(tmp_path / "depth.npy")
    np.save(path, np.ones((2, 2), dtype=dtype))
    assert read_npy(path, "depth array").dtype == dtype  # generic readers keep what is stored
    with pytest.raises(DataFileError, match=r"depth\.npy holds .* values; expected float"):
        read_npy(path, "depth array", kinds="f")
    np.save(path, np.ones((2, 2), dtype=np.float32))
    assert read_npy(path, "depth array", kinds="f").dtype == np.float32


def test_mat_complex_raises_naming_the_file(tmp_path):
    path = str(tmp_path / "depth.mat")
    savemat(path, {"depth": np.ones((2, 2), dtype=np.complex128)})
    with pytest.raises(DataFileError, match=r"depth\.mat holds complex128"):
        read_mat(path, "depth", "depth file")
    savemat(path, {"depth": np.ones((2, 2), dtype=np.int32)})
    with pytest.raises(DataFileError, match=r"depth\.mat holds int32 values; expected float"):
        read_mat(path, "depth", "depth file", kinds="f")


def test_mat_structs_still_read(tmp_path):
    path = str(tmp_path / "anno.mat")
    savemat(path, {"anno": {"objects": np.ones((1, 2))}})
    assert read_mat(path, "anno").dtype.kind in "OV"


def test_16_bit_png_above_max_value_raises_naming_the_file(tmp_path):
    path = str(tmp_path / "seg.png")
    Image.fromarray(np.array([[1, 300]], dtype=np.uint16)).save(path)
    assert read_png(path).max() == 300
    with pytest.raises(DataFileError, match=r"seg\.png holds the value 300 .* above 255"):
        read_png(path, "semseg image", max_value=255)
    Image.fromarray(np.array([[1, 255]], dtype=np.uint16)).save(path)
    assert read_png(path, max_value=255).max() == 255
