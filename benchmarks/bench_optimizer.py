"""The optimiser's step on a model's parameters: torch's loop (its CPU default, the releases'),
``foreach`` and ``fused`` (the trainer's default, ``optim.fused``), alternating in one process.

Each implementation gets the same parameters (copies) and the same random gradients, steps
twice untimed (its state allocated), then ``--rounds`` times in turns; the JSON holds every
time, the medians and the fused / loop ratio of medians.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_optimizer --models astmt mtinet --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from mtlfast import models
from mtlfast.train.config import OptimConfig
from mtlfast.train.optim import build_optimizer

TASKS = ["semseg", "parts", "saliency", "normals", "edge"]
KINDS = {
    "sgd": OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4),
    "adam": OptimConfig(name="adam", lr=1e-4, weight_decay=1e-4),
}
IMPLS = ("loop", "foreach", "fused")


def _optimizer(model: torch.nn.Module, kind: str, impl: str) -> torch.optim.Optimizer:
    if impl == "fused":  # the trainer's own construction
        return build_optimizer(model, KINDS[kind])
    base = build_optimizer(model, OptimConfig(**{**KINDS[kind].__dict__, "fused": False}))
    if impl == "foreach":
        for group in base.param_groups:
            group["foreach"] = True
    return base


def run(name: str, kind: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model = models.create(name, TASKS, dataset="pascal")
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()]
    steps = {}
    for impl in IMPLS:
        m = copy.deepcopy(model)
        for p, gr in zip(m.parameters(), grads):
            p.grad = gr.clone()
        opt = _optimizer(m, kind, impl)
        opt.step()
        opt.step()
        steps[impl] = opt.step
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            t0 = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "optimizer": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(list(model.parameters())),
        "times_s": times,
        "median_s": medians,
        "fused_over_loop": medians["fused"] / medians["loop"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["astmt", "mtinet"])
    p.add_argument("--optimizers", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", help="write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    results = []
    for name in args.models:
        for kind in args.optimizers:
            r = run(name, kind, args.rounds)
            med = r["median_s"]
            print(
                f"{name:8s} {kind:5s} {r['parameters'] / 1e6:5.1f}M params: loop {1e3 * med['loop']:6.1f} ms, "
                f"foreach {1e3 * med['foreach']:6.1f} ms, fused {1e3 * med['fused']:6.1f} ms "
                f"({r['fused_over_loop']:.2f}x)",
                flush=True,
            )
            results.append(r)
    if args.out:
        out = {
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
            "torch": torch.__version__,
            "rounds": args.rounds,
            "results": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
