"""Ahead-of-time compilation of the Triton kernels for sm_90 (Hopper), on a machine without a GPU.

The CPU tests run the Triton backend under TRITON_INTERPRET=1, which accepts programs that the
compiler rejects. Here the library's own launchers (mtlfast/ops/triton) run on meta tensors with
a stand-in driver that reports an sm_90 device; each launch stops where Triton would compile and
records the exact specialization it would build: kernel, signature (which ints are i32 or i64, or
constant 1), constexprs, num_warps. Each distinct one is then compiled with ``triton.compile``
for ``GPUTarget("cuda", 90, 32)`` through ptxas, and its resources read from the cubin with
cuobjdump: registers (Triton's ``n_regs``) and local memory (``n_spills``, in 4-byte words, as
Triton's launcher reports it).

Two sweeps of the launchers' inputs:
  ci    every kernel x dtype x flag combination at the op tests' shapes, plus the skip_fusion
        benchmark shapes and attention_distill at sizes whose per-source offsets pass 2**31
  full  ci plus a wider grid of sizes and layouts (``make triton-aot``)

    python -m tests.ops.test_triton_aot --sweep full --jobs 2 --out benchmarks/results/triton_aot.json

The compiler runs in a subprocess: the test session imports triton with TRITON_INTERPRET=1, and
interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import product
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("attention_distill", "skip_fusion", "task_se")
ARCH = 90
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# A scalar pointer offset computed in 32 bits: `%q = tt.addptr %p, %o : !tt.ptr<f32>, i32`.
_SCALAR_I32_ADDPTR = re.compile(
    r"^\s*%\S+ = tt\.addptr %[\w.#-]+, (%[\w.#-]+) : !tt\.ptr<[^>]*>, i32\b.*$", re.MULTILINE
)
_CONSTANT = re.compile(r"^\s*(%[\w.#-]+) = arith\.constant ", re.MULTILINE)


def scalar_i32_offsets(ttir: str) -> list[str]:
    """The TTIR ops that offset a pointer by a 32-bit value other than a constant."""
    constants = set(_CONSTANT.findall(ttir))
    return [m[0].strip() for m in _SCALAR_I32_ADDPTR.finditer(ttir) if m[1] not in constants]


Launch = tuple[str, Callable[[], None]]
BENCH = "[bench]"  # in the label of launches at benchmark shapes: the ci sweep compiles them all


# ---- the launches: the library's launchers on meta tensors ------------------------------------


def _empty(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _outer_strided(*shape: int, dtype) -> torch.Tensor:
    """Every other entry of dim 0, dims 0 and 1 stored swapped: outer strides the op passes on."""
    return _empty(shape[1], 2 * shape[0], *shape[2:], dtype=dtype).transpose(0, 1)[::2]


def _attention_distill(sweep: str) -> Iterator[Launch]:
    from mtlfast.ops.triton import attention_distill as tk

    def launches(n, t, chw, dtype, layout):
        make = _empty if layout == "contiguous" else _outer_strided
        f = make(n, t, *chw, dtype=dtype)
        m, v = (make(n, t, t - 1, *chw, dtype=dtype) for _ in range(2))
        label = f"attention_distill n={n} t={t} chw={chw} {dtype} {layout}"
        yield label + " fwd", lambda: tk.forward(f, m, v, _empty(n, t, *chw, dtype=dtype))
        yield label + " bwd", lambda: tk.backward(f, m, v, torch.empty_like(m), torch.empty_like(v))

    cases = [(2, t, chw) for t in (2, 3, 5) for chw in ((1, 1, 1), (1, 7, 5), (144, 7, 5))]
    cases += [(3, 5, (18, 16, 17))]
    dtypes, layouts = FLOATS, ("contiguous", "outer_strided")
    if sweep == "full":
        cases += [(n, t, (c, 1, 1)) for n, t, c in product((1, 4), (2, 7), (100, 129, 700, 1031))]
        cases += [(2, 5, (64, 320, 320)), (1, 1 + 1, (1, 1, 1))]
        dtypes = (*FLOATS, torch.float64)
    for (n, t, chw), dtype, layout in product(cases, dtypes, layouts):
        yield from launches(n, t, chw, dtype, layout)
    # Sizes whose per-source offsets pass 2**31 with strides that fit in an i32 (so the JIT passes
    # them as i32): MTI-Net's layout at T = 5 and C*H*W = 716M, whose (S-1) * m_ss = 2.1G.
    for dtype in FLOATS:
        yield from launches(1, 5, (716, 1000, 1000), dtype, "contiguous")


def _skip_fusion(sweep: str) -> Iterator[Launch]:
    from mtlfast.ops.triton import skip_fusion as tk

    in_sizes = ((7, 5), (4, 3), (1, 1), (16, 16), (33, 31), (2, 9))

    def launches(n, c, layers, size, dtype, bias, tag=""):
        scores = [_empty(n, c, *hw, dtype=dtype) for hw in layers]
        weight, b = _empty(len(layers), c, dtype=dtype), _empty(c, dtype=dtype) if bias else None
        out = _empty(n, c, *size, dtype=dtype)
        label = f"skip_fusion{tag} n={n} c={c} layers={layers} size={size} {dtype} bias={bias}"
        grads = [torch.empty_like(s) for s in scores]
        gb = torch.empty_like(b) if bias else None
        yield label + " fwd", lambda: tk.forward(scores, weight, b, out)
        yield label + " bwd", lambda: tk.backward(out, scores, weight, grads, weight.clone(), gb)

    cases = [
        (2, 3, tuple(in_sizes[i % 6] for i in range(k)), size, True)
        for k in (1, 2, 6)
        for size in ((7, 5), (32, 32), (13, 9), (1, 1))
    ]
    cases += [(2, c, in_sizes[:3], (17, 19), bias) for c, bias in ((1, False), (21, True))]
    dtypes = FLOATS
    if sweep == "full":
        cases += [(n, c, ((h, h),), (o, o), True) for n, c, h, o in product(
            (1, 8), (1, 19), (3, 47), (24, 64, 255, 512)
        )]  # fmt: skip
        dtypes = (*FLOATS, torch.float64)
    for (n, c, layers, size, bias), dtype in product(cases, dtypes):
        yield from launches(n, c, layers, size, dtype, bias)
    # benchmarks/bench_skip_fusion.py: N=4, C=21 (PASCAL) or 40 (NYUD), fused to (128, 128).
    vgg = ((128, 128), (64, 64), (32, 32), (16, 16), (16, 16), (16, 16))
    pyramid = ((128, 128), (96, 96), (64, 64))
    for c, layers, dtype in product(
        (21, 40), (vgg, pyramid, *(((64, 64),) * k for k in (1, 2, 4, 6))), FLOATS
    ):
        yield from launches(4, c, layers, (128, 128), dtype, True, BENCH)


def _task_se(sweep: str) -> Iterator[Launch]:
    from mtlfast.ops.triton import task_se as tk

    def launches(n, chw, dtype, channels_last, residual, relu, grad_residual):
        c, h, w = chw
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def act():
            return _empty(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)

        x, res, go = act(), act() if residual else None, act()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gate = _empty(n, c, dtype=acc)
        gres = act() if residual and grad_residual else None
        label = f"task_se n={n} chw={chw} {dtype} channels_last={channels_last} "
        label += f"residual={residual} relu={relu} grad_residual={grad_residual}"
        yield label + " pool", lambda: tk.pool(x, torch.empty_like(gate))
        yield label + " scale", lambda: tk.scale(x, gate, res, relu, act())
        yield (
            label + " backward_gate",
            lambda: tk.backward_gate(go, x, gate, res, relu, torch.empty_like(gate), gres),
        )
        yield (
            label + " backward_input",
            lambda: tk.backward_input(go, x, gate, res, relu, torch.empty_like(gate), act()),
        )

    shapes = [(4, chw) for chw in ((1, 1, 1), (3, 7, 5), (5, 1, 1), (64, 9, 11))]
    shapes += [(2, chw) for chw in ((256, 14, 14), (2048, 7, 7))]
    dtypes = FLOATS
    if sweep == "full":
        shapes += [(n, chw) for n, chw in product((1, 32), ((16, 128, 128), (512, 28, 28)))]
        dtypes = (*FLOATS, torch.float64)
    flags = [(r, relu, r and g) for r, relu, g in product((False, True), repeat=3) if r or not g]
    for (n, chw), dtype, cl, (res, relu, gres) in product(shapes, dtypes, (False, True), flags):
        yield from launches(n, chw, dtype, cl, res, relu, gres)


SWEEPS = {"attention_distill": _attention_distill, "skip_fusion": _skip_fusion, "task_se": _task_se}


# ---- capture and compile ----------------------------------------------------------------------


@dataclass
class Spec:
    """One specialization the JIT would compile, and the launches that reach it."""

    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    launches: list[str] = field(default_factory=list)

    @property
    def kernel(self) -> str:
        return f"{self.fn.module.rsplit('.', 1)[-1]}.{self.fn.__name__}"

    def describe(self) -> dict:
        names = self.fn.arg_names
        return {
            "kernel": self.kernel,
            "signature": {k: v for k, v in self.signature.items() if v != "constexpr"},
            "constexprs": {names[k[0]]: str(v) for k, v in self.constexprs.items()},
            "num_warps": self.options["num_warps"],
            "num_stages": self.options["num_stages"],
            "launch": self.launches[0],
            "launches": len(self.launches),
        }


class _StandInDriver:
    """What the JIT asks of a driver before it compiles: one sm_90 device, stream 0."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", ARCH, 32)


def capture(launches: Iterator[Launch]) -> list[Spec]:
    """Run the launches against the stand-in driver; the distinct specializations they reach."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    specs: dict[tuple, Spec] = {}
    label = ""

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        spec = specs.setdefault(
            (id(self), key), Spec(self, signature, constexprs, attrs, options.__dict__)
        )
        spec.launches.append(label)
        # nothing to launch: run() returns before it would

    driver.set_active(_StandInDriver())  # for good: the sweep runs in a process of its own
    original, JITFunction._do_compile = JITFunction._do_compile, record
    try:
        for label, launch in launches:
            launch()
    finally:
        JITFunction._do_compile = original
    return list(specs.values())


def _resources(cubin: bytes) -> dict:
    """Registers and local memory of the kernel in cubin, as cuobjdump -res-usage reports them."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {
        "n_regs": int(usage["REG"]),
        "n_spills": int(usage["LOCAL"]) // 4,  # as Triton's launcher: local bytes / 4
        "stack_bytes": int(usage["STACK"]),
        "shared_bytes": int(usage["SHARED"]),
    }


def representatives(specs: list[Spec]) -> list[Spec]:
    """One specialization per kernel x pointer dtypes x flags x int widths: the largest tile.

    Leaves out what only changes tile sizes or turns an int argument equal to 1 into a constant.
    """
    groups: dict[tuple, list[Spec]] = {}
    for spec in specs:
        flags = tuple(
            (k, v)
            for k, v in spec.constexprs.items()
            if isinstance(v, bool) or not isinstance(v, int)
        )
        # An int argument specialised to the constant 1 counts as the i32 it otherwise is.
        types = tuple(
            "i32" if v == "constexpr" else v
            for p, v in zip(spec.fn.params, spec.signature.values())
            if not p.is_constexpr
        )
        groups.setdefault((spec.kernel, types, flags), []).append(spec)

    def weight(spec: Spec) -> tuple[int, int, int]:
        """Largest tile first, then the fewest arguments specialised to 1 (loops left general)."""
        declared = [spec.constexprs.get((p.num,)) for p in spec.fn.params if p.is_constexpr]
        sizes = [v for v in declared if isinstance(v, int) and not isinstance(v, bool)]
        return (
            spec.options["num_warps"],
            max(sizes, default=0),
            len(declared) - len(spec.constexprs),
        )

    chosen = {id(max(group, key=weight)) for group in groups.values()}
    return [s for s in specs if id(s) in chosen or any(BENCH in label for label in s.launches)]


_SPECS: list[Spec] = []  # what the compile workers (forked) compile, by index


def _compile(index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _SPECS[index]
    result = spec.describe()
    start = time.perf_counter()
    try:
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=spec.options)
    except Exception as exc:  # noqa: BLE001 (a compile error is the finding: report it, go on)
        result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        return result
    result["seconds"] = round(time.perf_counter() - start, 2)
    result.update(_resources(kernel.asm["cubin"]))
    wide = scalar_i32_offsets(kernel.asm["ttir"])
    result["i32_scalar_offsets"] = len(wide)
    if wide:
        result["i32_scalar_offset_ops"] = [line.strip()[:200] for line in wide[:4]]
    return result


def run(sweep: str, jobs: int = 1, only: tuple[str, ...] = MODULES) -> dict:
    """Capture and compile every specialization of the sweep; the report as a JSON-able dict."""
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is first imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today, without its warning
    import triton

    start = time.perf_counter()
    specs = [s for module in only for s in capture(SWEEPS[module](sweep))]
    _SPECS[:] = representatives(specs) if sweep == "ci" else specs
    captured = time.perf_counter() - start
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_compile, range(len(_SPECS))))
    else:
        results = [_compile(i) for i in range(len(_SPECS))]
    summary: dict[str, dict] = {}
    for r in results:
        s = summary.setdefault(r["kernel"], {"specializations": 0, "errors": 0, "spilling": 0})
        s["specializations"] += 1
        s["errors"] += "error" in r
        s["spilling"] += r.get("n_spills", 0) > 0
        s["max_regs"] = max(s.get("max_regs", 0), r.get("n_regs", 0))
    return {
        "triton": triton.__version__,
        "target": f"cuda sm_{ARCH}",
        "sweep": sweep,
        "captured": len(specs),
        "compiled": len(_SPECS),
        "capture_seconds": round(captured, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "summary": summary,
        "specializations": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", choices=("ci", "full"), default="full")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--only", nargs="*", choices=MODULES, default=MODULES)
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    args = parser.parse_args(argv)
    report = run(args.sweep, args.jobs, tuple(args.only))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "specializations"}, indent=1))


# ---- the tests: the ci sweep, compiled in a subprocess --------------------------------------

_TOOLS = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    from triton import knobs

    try:
        tools = [Path(knobs.nvidia.ptxas.path), Path(knobs.nvidia.cuobjdump.path)]
    except Exception as exc:  # noqa: BLE001 (a Triton without its NVIDIA tools)
        pytest.skip(f"Triton's NVIDIA tools are unavailable: {exc}")
    if not all(t.exists() for t in tools):
        pytest.skip("Triton's ptxas or cuobjdump is missing")
    out = tmp_path_factory.mktemp("aot") / "triton_aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tests.ops.test_triton_aot", "--sweep", "ci", "--out", str(out)]
    result = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(out.read_text())


pytestmark = pytest.mark.skipif(not _TOOLS, reason="triton is not installed")


def test_every_specialization_compiles(report):
    errors = [
        f"{r['kernel']} ({r['launch']}): {r['error']}"
        for r in report["specializations"]
        if "error" in r
    ]
    assert not errors, "\n\n".join(errors[:5])
    jitted = set()
    for module in MODULES:
        source = (ROOT / "mtlfast" / "ops" / "triton" / f"{module}.py").read_text()
        jitted |= {f"{module}.{name}" for name in re.findall(r"def (\w+_kernel)\(", source)}
    assert set(report["summary"]) == jitted, "a kernel that no launch reaches, or a new one"


def test_no_specialization_spills(report):
    spilling = [r for r in report["specializations"] if r["n_spills"]]
    assert not spilling, [
        (r["kernel"], r["n_regs"], r["n_spills"], r["launch"]) for r in spilling[:5]
    ]


def test_skip_fusion_backward_fits_128_registers(report):
    # 128 registers let two 8-warp blocks (four 4-warp ones) share an SM.
    bwd = [r for r in report["specializations"] if r["kernel"] == "skip_fusion._bwd_kernel"]
    heavy = [(r["n_regs"], r["launch"]) for r in bwd if r["n_regs"] > 128]
    assert bwd and not heavy, heavy[:5]


def test_attention_distill_sizes_past_int32_are_compiled(report):
    big = [r for r in report["specializations"] if "chw=(716, 1000, 1000)" in r["launch"]]
    # The point of these sizes: the per-source strides fit in an i32, their products do not.
    assert {r["kernel"] for r in big} == {
        "attention_distill._fwd_kernel",
        "attention_distill._bwd_kernel",
    }
    assert all(r["signature"]["m_ss"] == "i32" for r in big)


def test_no_pointer_offset_is_computed_in_32_bits(report):
    # Tensor offsets within a block or a plane stay i32 (bounded by the launchers); a scalar one
    # is an index times a stride (s * m_ss, k * C), which must be 64-bit.
    wide = [
        (r["kernel"], r["i32_scalar_offset_ops"])
        for r in report["specializations"]
        if r["i32_scalar_offsets"]
    ]
    assert not wide, f"pointer offsets computed in 32 bits: {wide[:3]}"


@pytest.mark.parametrize("ttir, wide", [
    ("%14 = tt.addptr %m_base, %13 : !tt.ptr<f16>, i32 loc(#loc60)", True),
    ("%12 = tt.addptr %scales, %11 : !tt.ptr<f32>, i32 loc(#loc118)", True),
    ("%14 = tt.addptr %m_base, %13 : !tt.ptr<f16>, i64 loc(#loc60)", False),
    ("%h_k = arith.constant 2 : i32 loc(#l1)\n%h = tt.addptr %table, %h_k : !tt.ptr<i64>, i32", False),
    ("%8 = tt.addptr %7, %lanes : tensor<512x!tt.ptr<f16>>, tensor<512xi32> loc(#loc9)", False),
])  # fmt: skip
def test_the_ir_check_finds_32_bit_scalar_offsets(ttir, wide):
    assert bool(scalar_i32_offsets(ttir)) == wide


@pytest.mark.parametrize("which", ["size", "scores[1]"])
def test_skip_fusion_planes_past_int32_raise_naming_the_argument(which):
    # The kernels index within a plane in 32 bits, as the CUDA ones: the launcher refuses more.
    from mtlfast.ops.triton import skip_fusion as tk

    big, small = (46341, 46341), (8, 8)
    scores = [_empty(1, 1, *small), _empty(1, 1, *(big if which != "size" else small))]
    out = _empty(1, 1, *(big if which == "size" else small))
    with pytest.raises(ValueError, match=re.escape(which)):
        tk.forward(scores, _empty(2, 1), None, out)
    with pytest.raises(ValueError, match=re.escape(which)):
        tk.backward(
            out, scores, _empty(2, 1), [torch.empty_like(s) for s in scores], _empty(2, 1), None
        )


if __name__ == "__main__":
    main()
