"""The trainer's step with the Winograd products by oneDNN (one matrix product per tile position,
the default) against one ``torch.bmm`` (MKL's sgemm, the fallback), as JSON.

For each model of ``benchmarks/bench_models.py`` one trainer (``train.conv_algorithm: winograd``:
the fixed rule, so that both sides take Winograd at the same layers) steps alternately with
``mtlfast.ops.winograd_conv._onednn_linear`` as it is and forced off, after one untimed step of
each; round order alternates (``bench_trainer._alternate``).

    python benchmarks/winograd_products_step.py --models padnet ubernet --rounds 3 \\
        --out benchmarks/results/<machine>/winograd_products_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import mtlfast
import mtlfast.ops.winograd_conv as wc
from benchmarks import malloc_env
from benchmarks.bench_models import (
    MODELS,
    _git_commit,
    build,
    make_batch,
    make_trainer,
    settle_layout,
    shipped_memory_format,
)
from benchmarks.bench_trainer import _alternate

SIDES = {"onednn": wc._onednn_linear, "bmm": lambda: False}


def measure(name: str, args, batch: dict) -> dict:
    model = build(name, args)[0]
    fmt = shipped_memory_format(name)
    trainer = make_trainer(model, "recompute", args.threads, args.lr, "fp32", fmt, "winograd")
    fmt = settle_layout(trainer, batch)  # "auto": both sides in the layout it chose

    def step(side: str):
        wc._onednn_linear = SIDES[side]
        try:
            trainer.train_step(batch)
        finally:
            wc._onednn_linear = SIDES["onednn"]

    times = _alternate({s: (lambda s=s: step(s)) for s in SIDES}, args.rounds, steps=1)
    per_round = [a / b for a, b in zip(times["onednn"], times["bmm"])]
    return {
        "step_s": {s: [round(t, 3) for t in times[s]] for s in SIDES},
        "median_step_s": {s: round(statistics.median(times[s]), 3) for s in SIDES},
        "ratio_onednn_over_bmm": round(
            statistics.median(times["onednn"]) / statistics.median(times["bmm"]), 3
        ),
        "per_round_ratio": [round(r, 3) for r in per_round],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=["padnet", "ubernet"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ubernet-backbone", default="vgg16")
    p.add_argument("--ubernet-width", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="64x64, 1 round: a smoke test")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 64, 1
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    out = {
        "what": "Trainer.train_step, Winograd products by oneDNN vs torch.bmm, alternating",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "mtlfast": mtlfast.__version__,
        "commit": _git_commit(),
        "threads": args.threads,
        "batch": args.batch,
        "size": args.size,
        "malloc_env": malloc_env.current(),
        "command": "python benchmarks/winograd_products_step.py " + " ".join(sys.argv[1:]),
        "models": {},
    }
    for name in args.models:
        out["models"][name] = row = measure(name, args, batch)
        print(name, json.dumps(row), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
