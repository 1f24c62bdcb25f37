"""How fast a training step could be on this CPU: each model's arithmetic against the machine's peak.

For each model of ``bench_models`` (same networks, batch, losses and optimiser), counts the
floating-point operations of one training step of each side with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix products and their
backwards: what FLOP counters count; elementwise work, normalisation, resizes and the optimiser
are memory-bound and left out), and measures the best rate this machine's libraries reach on
large compute-bound work: oneDNN's 3x3 convolution forward at (4, 256, 64, 64) -> 256 and MKL's
2048 x 1024 x 1024 matrix product, ``--rounds`` times each, the highest rate kept. Writes per
model:

* ``gflop``: each side's step (mtlfast's after its layout trial and its Winograd measurements,
  so the counted step is the one the trainer runs from then on; a Winograd convolution counts its
  36 matrix products, the arithmetic it really does);
* ``floor_s``: mtlfast's arithmetic at the peak rate, the shortest its step could take if nothing
  but its matrix arithmetic took time and that ran at the best rate measured;
* ``step_s``: each side's median step over ``--rounds`` rounds, the sides alternating
  (``bench_trainer._alternate``, one untimed step each first), and ``share_of_peak``: each side's
  arithmetic per second of its whole step as a share of the peak rate;
* ``target_s``: the issue's target (``--target``, 0.8x of the release-style step), and
  ``floor_over_target``: the share of the peak that mtlfast's whole step would have to run at to
  meet it. Above about 0.85 the target is out of reach for this arithmetic on this CPU (matrix
  work never runs whole steps at the peak rate, and a step has its memory-bound part too); below
  it, compare it with ``share_of_peak``, what the step runs at now.

Counting runs under a dispatch mode, which routes mtlfast's ops down their ``torch.library`` path
(``mtlfast/ops/_dispatch.py``) and the distillation down its differentiable loop: their matrix
arithmetic is the same, only their elementwise work differs.

    python -m benchmarks.flop_floor --out benchmarks/results/<machine>/flop_floor.json
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
from torch.utils.flop_counter import FlopCounterMode

import mtlfast.ops  # noqa: F401  (registers torch.ops.mtlfast.winograd_conv3x3*)
from benchmarks import malloc_env
from benchmarks.bench_models import (
    MODELS,
    ReleaseSide,
    _git_commit,
    build,
    make_batch,
    make_trainer,
    settle_layout,
    shipped_memory_format,
)
from benchmarks.bench_trainer import _alternate, _cpu_load


def _winograd_products(x_shape, w_shape, tile: int = 4) -> int:
    """FLOPs of F(m x m, 3x3)'s (m + 2)^2 matrix products (m = ``tile``): (tiles x C_in) @
    (C_in x C_out) per position."""
    n, c, h, w = x_shape
    tiles = n * -(-h // tile) * -(-w // tile)
    return 2 * (tile + 2) ** 2 * tiles * c * w_shape[0]


def _winograd_forward(x_shape, w_shape, _bias, tile=4, out_shape=None, **kwargs) -> int:
    return _winograd_products(x_shape, w_shape, tile)


def _winograd_backward(_grad, x_shape, w_shape, _has_bias, tile=4, out_shape=None, **kwargs) -> int:
    return 2 * _winograd_products(x_shape, w_shape, tile)  # the input's and the weight's gradients


# What mtlfast's Winograd convolution really multiplies, in place of the direct convolution's
# FLOPs that mtlfast counts it as elsewhere (mtlfast.models.summary): the floor is about the
# arithmetic a step does. The transforms are memory-bound, like aten's elementwise ops, and left out.
WINOGRAD_PRODUCTS = {
    torch.ops.mtlfast.winograd_conv3x3: _winograd_forward,
    torch.ops.mtlfast.winograd_conv3x3_backward: _winograd_backward,
}


def _best_rate(fn, flop: float, rounds: int) -> float:
    """The highest GFLOP/s of ``rounds`` calls of ``fn`` (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def peak_rates(rounds: int) -> dict[str, float]:
    """GFLOP/s of oneDNN's convolution and MKL's matrix product on large compute-bound shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 64, 64, generator=g)
    w = torch.randn(256, 256, 3, 3, generator=g)
    a = torch.randn(2048, 1024, generator=g)
    b = torch.randn(1024, 1024, generator=g)
    with torch.no_grad():
        conv = _best_rate(
            lambda: F.conv2d(x, w, padding=1), 2 * 4 * 64 * 64 * 256 * 256 * 9, rounds
        )
        mm = _best_rate(lambda: a @ b, 2 * 2048 * 1024 * 1024, rounds)
    return {"conv3x3_onednn": conv, "matmul_mkl": mm}


def count(fn) -> tuple[float, dict[str, float]]:
    """GFLOP of one call of ``fn``, in all and per aten op."""
    counter = FlopCounterMode(display=False, custom_mapping=WINOGRAD_PRODUCTS)
    with counter:
        fn()
    per_op = {str(k): v / 1e9 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / 1e9, per_op


def measure(name: str, args, batch: dict, peak: float) -> dict:
    ours, release, kind, names, _note = build(name, args)
    trainer = make_trainer(
        ours, "recompute", args.threads, args.lr, "fp32", shipped_memory_format(name)
    )
    side = ReleaseSide(release, names, kind, trainer.loss_fns, trainer.weights, args.lr)
    layout = settle_layout(trainer, batch)
    trainer.train_step(batch)  # Winograd's measurements of every shape are behind us
    ours_gflop, ours_ops = count(lambda: trainer.train_step(batch))
    release_gflop, release_ops = count(lambda: side.step(batch))
    times = _alternate(
        {"mtlfast": lambda: trainer.train_step(batch), "release": lambda: side.step(batch)},
        args.rounds,
        1,
    )
    ours_s, release_s = (statistics.median(times[k]) for k in ("mtlfast", "release"))
    floor_s = ours_gflop / peak
    target_s = args.target * release_s
    return {
        "layout_mtlfast": layout,
        "gflop": {"mtlfast": ours_gflop, "release": release_gflop},
        "gflop_per_op": {"mtlfast": ours_ops, "release": release_ops},
        "step_s": {"mtlfast": ours_s, "release": release_s},
        "step_s_rounds": times,
        # each side's matrix arithmetic per second of its whole step, as a share of the peak
        "share_of_peak": {"mtlfast": floor_s / ours_s, "release": release_gflop / peak / release_s},
        "floor_s": floor_s,
        "target_s": target_s,
        "floor_over_target": floor_s / target_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target", type=float, default=0.8, help="the issue's step-time ratio")
    p.add_argument("--ubernet-backbone", default="vgg16")
    p.add_argument("--ubernet-width", type=float, default=1.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or not 0 < args.target <= 1:
        p.error("--threads and --rounds must be at least 1, --target in (0, 1]")
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    load_before = _cpu_load()
    rates = peak_rates(max(args.rounds, 5))
    peak = max(rates.values())
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"threads {args.threads}",
        "torch": torch.__version__,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "mtlfast_commit": _git_commit(),
        "malloc_env": malloc_env.current(),
        "size": args.size,
        "batch": args.batch,
        "peak_gflop_per_s": rates,
        "peak_used": peak,
        "models": {},
    }
    for name in args.models:
        r = result["models"][name] = measure(name, args, batch, peak)
        print(
            f"[{name}] mtlfast {r['gflop']['mtlfast']:.0f} GFLOP (release {r['gflop']['release']:.0f}): "
            f"floor {r['floor_s']:.2f} s at {peak:.0f} GFLOP/s, target {r['target_s']:.2f} s "
            f"(release {r['step_s']['release']:.2f} s): floor / target {r['floor_over_target']:.2f}, "
            f"mtlfast's step at {r['share_of_peak']['mtlfast']:.2f} of the peak",
            flush=True,
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["cpu_load"] = {"before": load_before, "after": _cpu_load()}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
