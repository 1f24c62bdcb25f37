"""winograd_conv3x3 against F.conv2d (oneDNN) on the 3x3 layers of the models, as JSON.

Forward and backward (input and weight gradients), and forward alone under no_grad, of one
convolution per shape: the Winograd op (``mtlfast.ops.winograd_conv._winograd``, whatever the
size thresholds say) and ``F.conv2d``, alternating in one process, ``--rounds`` times each;
median and range per side, and the ratio of medians. The shapes are the models' at 256x256,
batch 4: PAD-Net's distillation (256 channels at 64x64), VGG-16's blocks (UberNet), the
DeepLab decoder's (ASTMT), and narrower ones below the threshold (:data:`MIN_CHANNELS`).

    python benchmarks/bench_winograd_conv.py --out benchmarks/results/<machine>/bench_winograd_conv.json
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
from torch.nn import functional as F

import mtlfast
from benchmarks import malloc_env
from benchmarks.bench_models import _git_commit
from mtlfast.ops.winograd_conv import MIN_CHANNELS, _winograd

# (N, C_in, H, W), C_out
SHAPES = [
    ((4, 256, 64, 64), 256),  # PAD-Net distillation, ASTMT decoder
    ((4, 512, 64, 64), 512),  # PAD-Net distillation, mask and message kernels in one
    ((4, 128, 128, 128), 128),  # VGG-16 conv2_2
    ((4, 256, 64, 64), 128),
    ((4, 512, 32, 32), 512),  # VGG-16 conv4
    ((4, 512, 16, 16), 512),  # VGG-16 conv5
    ((4, 256, 16, 16), 256),
    ((4, 128, 32, 32), 128),
    ((4, 64, 64, 64), 64),  # below MIN_CHANNELS
    ((4, 144, 8, 8), 144),  # HRNet-18's fourth branch: below the smallest map
]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape, k, rounds):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = (torch.randn(k, shape[1], 3, 3) / (3 * shape[1] ** 0.5)).requires_grad_()
    grad = torch.randn(shape[0], k, *shape[2:])
    convs = {"direct": lambda: F.conv2d(x, w, padding=1), "winograd": lambda: _winograd(x, w, None)}

    def train(conv):
        torch.autograd.grad(conv(), (x, w), grad)

    def infer(conv):
        with torch.no_grad():
            conv()

    with torch.no_grad():
        ref = convs["direct"]()
        err = ((convs["winograd"]() - ref).abs().max() / ref.abs().max()).item()
    row = {"shape": list(shape), "c_out": k, "max_error_rel_to_max_output": err}
    for what, run in (("forward_backward", train), ("forward", infer)):
        times = {a: [] for a in convs}
        for conv in convs.values():  # warm-up
            run(conv)
        for _ in range(rounds):
            for a, conv in convs.items():
                times[a].append(_time(lambda conv=conv, run=run: run(conv)))
        med = {a: statistics.median(t) for a, t in times.items()}
        row[what] = {
            "median_ms": {a: round(m * 1e3, 2) for a, m in med.items()},
            "range_ms": {
                a: [round(min(t) * 1e3, 2), round(max(t) * 1e3, 2)] for a, t in times.items()
            },
            "ratio_winograd_over_direct": round(med["winograd"] / med["direct"], 3),
        }
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {
        "what": "winograd_conv3x3 vs F.conv2d, one 3x3 convolution, alternating",
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "mtlfast": mtlfast.__version__,
        "commit": _git_commit(),
        "threads": args.threads,
        "min_channels": MIN_CHANNELS,
        "malloc_env": malloc_env.current(),
        "command": "python benchmarks/bench_winograd_conv.py " + " ".join(sys.argv[1:]),
        "shapes": [],
    }
    for shape, k in SHAPES:
        row = measure(shape, k, args.rounds)
        out["shapes"].append(row)
        fb, fw = row["forward_backward"], row["forward"]
        print(
            f"{tuple(shape)} -> {k}: forward+backward {fb['median_ms']['winograd']} ms against "
            f"{fb['median_ms']['direct']} ms ({fb['ratio_winograd_over_direct']}x), forward "
            f"{fw['ratio_winograd_over_direct']}x, error {row['max_error_rel_to_max_output']:.1e}",
            flush=True,
        )
        if args.out is not None:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
