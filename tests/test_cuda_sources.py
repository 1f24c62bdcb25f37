"""Compile-checks of the CUDA code, so it never rots on machines without a GPU.

Every kernels/*.cu is compiled with ``nvcc -c -arch=sm_90`` whenever nvcc is on the PATH, and the
ATen launchers in csrc/cuda are syntax-checked against torch's CUDA headers, which the CPU wheel
ships too.
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp

ROOT = Path(__file__).resolve().parent.parent
CU_FILES = sorted((ROOT / "kernels").glob("*.cu"))
LAUNCHERS = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
NVCC = shutil.which("nvcc")


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{output}"
    return output


def test_there_are_cuda_sources():
    assert CU_FILES and LAUNCHERS


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    output = _run(
        [
            NVCC,
            "-c",
            "-arch=sm_90",
            "-std=c++17",
            "-O3",
            f"-I{ROOT / 'kernels'}",
            "-Werror",
            "all-warnings",
            str(source),
            "-o",
            str(tmp_path / "k.o"),
        ]
    )
    assert "warning" not in output.lower(), output


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), cpp.CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers not found")
@pytest.mark.parametrize("source", LAUNCHERS, ids=lambda p: p.name)
def test_launchers_compile_against_torch_headers(source):
    cxx = os.environ.get("CXX", "c++")
    # torch's headers are -isystem: their own warnings are not ours to fix.
    includes = [f"-isystem{p}" for p in cpp.include_paths()] + [
        f"-I{_cuda_include()}",
        f"-I{ROOT / 'csrc'}",
        f"-I{ROOT / 'kernels'}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    # The CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h; this define skips that include.
    flags = [
        "-std=c++17",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DMTLFAST_WITH_CUDA=1",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
    ]
    _run([cxx, *flags, *includes, str(source)])
