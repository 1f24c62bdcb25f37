"""Bilinear resizing on the CPU: aten's kernel against mtlfast's two matrix products, as JSON.

For each case (N, C, H, W) -> (h, w): forward time and forward+backward time of
``F.interpolate(mode="bilinear", align_corners=False)`` and of ``mtlfast.ops.resize_bilinear``'s
products (forced, whatever the side limit says), the two alternating round after round in one
process; median and spread of ``--rounds`` rounds. The cases are the resizes of MTI-Net, PAD-Net
and HRNet at 256x256 batch 4 and longer sides around the limits ``_MAX_IN`` and ``_MAX_OUT``.

    python benchmarks/resize_crossover.py --out benchmarks/results/cpu-epyc-2core/resize_crossover.json
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

from mtlfast.ops import resize as _resize

CASES = [  # (N, C, H, W, h, w)
    (4, 21, 8, 8, 256, 256),  # MTI-Net deep supervision at 1/32, upsampled to the image
    (4, 21, 64, 64, 256, 256),  # final semseg prediction at 1/4
    (4, 7, 64, 64, 256, 256),
    (4, 1, 64, 64, 256, 256),
    (4, 18, 32, 32, 64, 64),  # HRNet fuse: branch 2 -> 1
    (4, 144, 8, 8, 64, 64),  # HRNet fuse / MTI-Net aggregation: branch 4 -> 1
    (4, 256, 16, 16, 64, 64),
    (4, 64, 64, 64, 128, 128),
    (4, 21, 128, 128, 256, 256),
    (4, 21, 256, 256, 512, 512),  # past the limits
    (4, 64, 256, 256, 128, 128),  # a downsampling
]


def _products(x, size):
    return _resize._ResizeBilinear.apply(x, size)


def _aten(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _time(fn, x, size, grad) -> tuple[float, float]:
    x.grad = None
    t0 = time.perf_counter()
    y = fn(x, size)
    t1 = time.perf_counter()
    y.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for n, c, h_in, w_in, h, w in CASES:
        x = torch.randn(n, c, h_in, w_in, requires_grad=True)
        grad = torch.randn(n, c, h, w)
        size = (h, w)
        with torch.no_grad():
            err = float((_products(x, size) - _aten(x, size)).abs().max())
        fns = {"aten": _aten, "products": _products}
        times = {k: {"forward": [], "forward_backward": []} for k in fns}
        for k, fn in fns.items():
            _time(fn, x, size, grad)  # warm-up
        for r in range(args.rounds):
            for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                f, fb = _time(fns[k], x, size, grad)
                times[k]["forward"].append(f)
                times[k]["forward_backward"].append(fb)
        row = {"case": [n, c, h_in, w_in, h, w], "max_abs_diff": err}
        for k in fns:
            for phase, ts in times[k].items():
                row[f"{k}_{phase}_ms"] = round(1e3 * statistics.median(ts), 3)
                row[f"{k}_{phase}_ms_spread"] = round(1e3 * (max(ts) - min(ts)), 3)
        row["speedup_forward_backward"] = round(
            row["aten_forward_backward_ms"] / row["products_forward_backward_ms"], 2
        )
        row["speedup_forward"] = round(row["aten_forward_ms"] / row["products_forward_ms"], 2)
        print(
            row["case"],
            f"fwd x{row['speedup_forward']:.2f}",
            f"fwd+bwd x{row['speedup_forward_backward']:.2f}",
        )
        results.append(row)
    out = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "rounds": args.rounds,
        "max_in": _resize._MAX_IN,
        "max_out": _resize._MAX_OUT,
        "cases": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
