"""Build script for mtlfast and its compiled extension ``mtlfast._C``.

The C++ CPU kernels are always built. The CUDA kernels (``kernels/*.cu`` launched from
``csrc/cuda``) are added when torch was built with CUDA and nvcc is found, or when
``FORCE_CUDA=1``; ``FORCE_CUDA=0`` turns them off. ``TORCH_CUDA_ARCH_LIST`` defaults to
``9.0+PTX`` (Hopper, plus PTX that newer GPUs can JIT).
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None and forced.strip() != "":
        return forced.strip() not in ("0", "false", "False", "no")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    # Order matters: the linker keeps the first copy of every inline function, so the
    # portable objects come before the per-ISA kernel objects (csrc/cpu/isa) and shared
    # helpers are never taken from a copy compiled for a wider instruction set.
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp") + _sources("csrc/cpu/isa/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DMTLFAST_VERSION=\"0.1.0\""]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        sources += _sources("csrc/cuda/*.cpp") + _sources("kernels/*.cu")
        return CUDAExtension(
            "mtlfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("MTLFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "mtlfast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
