"""mtlfast's batch_norm (training mode) and max_pool2d against aten's, on the models' layers, as JSON.

Forward alone and forward with backward of one layer per shape, mtlfast's op and aten's
(``F.batch_norm`` / ``F.max_pool2d``, run under ``use_backend("reference")``) alternating in one
process, ``--rounds`` times each; median and range per side and the ratio of medians. The shapes
are the models' at 256x256, batch 4: ResNet's and the DeepLab decoder's NCHW batch norms
(ASTMT, PAD-Net's heads), HRNet-18's channels-last ones (MTI-Net: 18 to 270 channels), the ResNet
stem's and VGG-16's max pools (ASTMT, UberNet).

    python benchmarks/bench_norm_pool.py --out benchmarks/results/<machine>/bench_norm_pool.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import mtlfast
from benchmarks import malloc_env
from benchmarks.bench_models import _git_commit
from mtlfast.ops import batch_norm, max_pool2d, use_backend

# ("batch_norm", (N, C, H, W), channels_last) or ("max_pool2d", (N, C, H, W), (kernel, stride, padding))
CASES = [
    ("batch_norm", (4, 256, 64, 64), False),  # ResNet layer1 (ASTMT), PAD-Net heads
    ("batch_norm", (4, 64, 64, 64), False),
    ("batch_norm", (4, 2048, 16, 16), False),  # ResNet layer4
    ("batch_norm", (4, 64, 128, 128), False),  # ResNet stem
    ("batch_norm", (4, 18, 64, 64), True),  # HRNet-18, channels-last (MTI-Net)
    ("batch_norm", (4, 36, 32, 32), True),
    ("batch_norm", (4, 144, 8, 8), True),
    ("batch_norm", (4, 270, 64, 64), True),  # MTI-Net's heads on the concatenated branches
    ("max_pool2d", (4, 64, 128, 128), (3, 2, 1)),  # ResNet stem
    ("max_pool2d", (4, 64, 256, 256), (3, 2, 1)),  # VGG-16 pool1
    ("max_pool2d", (4, 128, 128, 128), (3, 2, 1)),  # VGG-16 pool2
    ("max_pool2d", (4, 512, 32, 32), (3, 1, 1)),  # VGG-16 pool4 (DeepLab: stride 1)
]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ops(kind, shape, option):
    torch.manual_seed(0)
    fmt = torch.channels_last if kind == "batch_norm" and option else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    if kind == "batch_norm":
        c = shape[1]
        w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        stats = (torch.zeros(c), torch.ones(c))

        def op():
            return batch_norm(x, *stats, w, b, True, 0.1, 1e-5)

        inputs = (x, w, b)
    else:
        k, s, p = option

        def op():
            return max_pool2d(x, k, s, p)

        inputs = (x,)
    return op, inputs


def measure(kind, shape, option, rounds):
    op, inputs = _ops(kind, shape, option)
    grad = torch.randn_like(op())

    def aten():
        with use_backend("reference"):
            return op()

    sides = {"mtlfast": op, "aten": aten}

    def train(f):
        torch.autograd.grad(f(), inputs, grad)

    def infer(f):
        f()  # training-mode statistics, no graph kept beyond the call

    row = {"op": kind, "shape": list(shape)}
    row["channels_last" if kind == "batch_norm" else "kernel_stride_padding"] = option
    with torch.no_grad():
        ref, got = aten(), op()
    row["max_abs_difference"] = (got - ref).abs().max().item()
    for what, run in (("forward_backward", train), ("forward", infer)):
        times = {a: [] for a in sides}
        for f in sides.values():  # warm-up
            run(f)
        for _ in range(rounds):
            for a, f in sides.items():
                times[a].append(_time(lambda f=f, run=run: run(f)))
        med = {a: statistics.median(t) for a, t in times.items()}
        row[what] = {
            "median_ms": {a: round(m * 1e3, 3) for a, m in med.items()},
            "range_ms": {
                a: [round(min(t) * 1e3, 3), round(max(t) * 1e3, 3)] for a, t in times.items()
            },
            "ratio_mtlfast_over_aten": round(med["mtlfast"] / med["aten"], 3),
        }
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {
        "what": "batch_norm (training) and max_pool2d vs aten, one layer, alternating",
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "mtlfast": mtlfast.__version__,
        "commit": _git_commit(),
        "threads": args.threads,
        "malloc_env": malloc_env.current(),
        "command": "python benchmarks/bench_norm_pool.py " + " ".join(sys.argv[1:]),
        "cases": [],
    }
    for kind, shape, option in CASES:
        row = measure(kind, shape, option, args.rounds)
        out["cases"].append(row)
        fb, fw = row["forward_backward"], row["forward"]
        print(
            f"{kind} {tuple(shape)} {option}: forward+backward {fb['median_ms']['mtlfast']} ms "
            f"against {fb['median_ms']['aten']} ms ({fb['ratio_mtlfast_over_aten']}x), forward "
            f"{fw['median_ms']['mtlfast']} against {fw['median_ms']['aten']} ms "
            f"({fw['ratio_mtlfast_over_aten']}x), difference {row['max_abs_difference']:.1e}",
            flush=True,
        )
        if args.out is not None:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
