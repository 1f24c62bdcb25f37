"""Build script for mtlfast and its compiled extension ``mtlfast._C``.

The C++ CPU kernels are always built. The CUDA kernels (``kernels/*.cu`` launched from
``csrc/cuda``) are added when torch was built with CUDA and nvcc is found, or when
``FORCE_CUDA=1``; ``FORCE_CUDA=0`` turns them off. ``TORCH_CUDA_ARCH_LIST`` defaults to
``9.0+PTX`` (Hopper, plus PTX that newer GPUs can JIT).

On x86-64 Linux the CPU kernels are built three times, like ATen's: the portable copy
(``csrc/cpu/<op>_default.cpp``, baseline flags) and an AVX2 and an AVX512 copy
(``csrc/cpu/isa/<op>_<isa>.cpp``, each compiled with its own ``-m`` flags). Each wide copy is
linked into one relocatable object whose symbols are all made local but its entry points, so
no inline function compiled with wide instructions (a ``std::vector`` method, a ``c10::Half``
conversion) can stand in for the portable objects' copy of it, whatever the link order. Where
that cannot be done (another OS or CPU, no ``objcopy``), only the portable copy is built.
"""

import copy
import glob
import os
import platform
import shutil
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# ATen's flags for its own AVX2 and AVX512 kernels, plus F16C (fp16 conversions), which every
# CPU that ATen dispatches to AVX2 has.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None and forced.strip() != "":
        return forced.strip() not in ("0", "false", "False", "no")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _binutils() -> tuple[str, str] | None:
    """(nm, objcopy) when the wide ISA copies can be built and sealed off here, else None."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None
    nm = os.environ.get("NM") or shutil.which("nm")
    objcopy = os.environ.get("OBJCOPY") or shutil.which("objcopy")
    return (nm, objcopy) if nm and objcopy else None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


class _BuildExtension(BuildExtension):
    """torch's BuildExtension, plus the AVX2 and AVX512 kernel copies, each with its own flags."""

    def build_extension(self, ext) -> None:
        if _binutils() is not None:
            ext.extra_objects = [
                *ext.extra_objects,
                *(self._isa_object(ext, isa) for isa in ISA_FLAGS),
            ]
        super().build_extension(ext)

    def _isa_object(self, ext, isa: str) -> str:
        """csrc/cpu/isa/*_<isa>.cpp as one object whose only global symbols are its entry points."""
        nm, objcopy = _binutils()
        out_dir = os.path.join(os.path.abspath(self.build_temp), f"isa_{isa}")
        args = copy.deepcopy(ext.extra_compile_args)
        args["cxx"] = [*args["cxx"], *ISA_FLAGS[isa]]
        # self.compiler is torch's wrapped compiler here: the same flags as every other source.
        objects = self.compiler.compile(
            _sources(f"csrc/cpu/isa/*_{isa}.cpp"),
            output_dir=out_dir,
            macros=ext.define_macros,
            include_dirs=ext.include_dirs,
            debug=self.debug,
            extra_postargs=args,
            depends=ext.depends,
        )
        merged = os.path.join(out_dir, f"kernels_{isa}.o")
        # A relocatable link merges the copies' shared inline functions and dissolves their COMDAT
        # groups, so that they can be made local below.
        self.spawn(
            [
                self.compiler.linker_so[0],
                "-r",
                "-nostdlib",
                "-Wl,--force-group-allocation",
                "-o",
                merged,
                *objects,
            ]
        )
        # The entry points (mtlfast::cpu[::<op>]::<ISA>::*kernels()) are the only strong global
        # functions; inline and template functions are weak and the kernels' own are in an
        # anonymous namespace.
        listing = subprocess.run(
            [nm, "-g", "--defined-only", "-P", merged], capture_output=True, text=True, check=True
        ).stdout
        entries = [line.split()[0] for line in listing.splitlines() if line.split()[1] == "T"]
        strays = [e for e in entries if not e.startswith("_ZN7mtlfast3cpu")]
        if not entries or strays:
            sys.exit(
                f"csrc/cpu/isa ({isa}): unexpected global functions {strays or entries}: "
                "only the kernels() entry points may be defined outside an anonymous namespace"
            )
        self.spawn([objcopy, *(f"--keep-global-symbol={e}" for e in entries), merged])
        return merged


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp", '-DMTLFAST_VERSION="0.1.0"']
    if _binutils() is None:
        cxx.append("-DMTLFAST_NO_ISA_COPIES")  # dispatch to the portable copy everywhere
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        sources += _sources("csrc/cuda/*.cpp") + _sources("kernels/*.cu")
        return CUDAExtension(
            "mtlfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("MTLFAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
            },
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
    cmdclass={"build_ext": _BuildExtension},
)
