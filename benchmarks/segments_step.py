"""A model's recompute step against the number of trunk segments (``train.segments``), as JSON.

For one model of ``benchmarks/bench_models.py`` (its construction, batch, PASCAL loss weights,
SGD), one trainer per ``--segments`` value on copies of the same weights,
``strategy="recompute"``, one step each per round, alternating, after one untimed step each; then
each one's peak as ``bench_models._peak_mib``. ``default`` leaves ``train.segments`` unset: the
model's ``engine_segments`` (2 for MTI-Net and UberNet) where it has one, else the engine's
``round(sqrt(L))``; give that number (3 for both) to compare with it. The engine keeps the last
segment's graph and recomputes the others: fewer segments keep more and recompute less.

    env $(python3 benchmarks/malloc_env.py) OMP_NUM_THREADS=2 \\
        .venv/bin/python -m benchmarks.segments_step ubernet --segments default 3 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import bench_models as bm
from benchmarks.bench_trainer import _alternate
from mtlfast.train import Trainer, load_config


def _trainer(model, segments: str, threads: int, lr: float, fmt: str) -> Trainer:
    """bench_models' trainer (``make_trainer``) with ``train.segments`` set."""
    config = load_config(
        "mtinet_pascal",
        [
            "train.progress=false",
            f"train.threads={threads}",
            "train.strategy=recompute",
            f"train.memory_format={fmt}",
            "optim.name=sgd",
            f"optim.lr={lr}",
            "optim.momentum=0.9",
            "optim.weight_decay=0.0001",
            "schedule.kind=constant",
            "loss.weights=pascal",
        ]
        + ([] if segments == "default" else [f"train.segments={int(segments)}"]),
    )
    return Trainer(config, model=model, datasets=((), ()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=bm.MODELS)
    p.add_argument("--segments", nargs="+", default=["default", "2"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    opts = argparse.Namespace(
        size=256, batch=4, threads=2, lr=1e-3, precision="fp32", quick=False,
        ubernet_backbone="vgg16", ubernet_width=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = bm.build(args.model, opts)[0]
    fmt = bm.shipped_memory_format(args.model)
    batch = bm.make_batch(opts.batch, opts.size)
    first, *rest = args.segments
    trainers = {first: _trainer(copy.deepcopy(model), first, opts.threads, opts.lr, fmt)}
    fmt = bm.settle_layout(trainers[first], batch)  # "auto": every side in the chosen layout
    trainers.update(
        {s: _trainer(copy.deepcopy(model), s, opts.threads, opts.lr, fmt) for s in rest}
    )
    fns = {s: (lambda t=t: t.train_step(batch)) for s, t in trainers.items()}
    load_before = bm._cpu_load()
    times = _alternate(fns, args.rounds, 1)
    result = {
        "model": args.model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "memory_format": fmt,
        "step_s": times,
        "step_s_median": {k: statistics.median(v) for k, v in times.items()},
        "peak_mib": {k: bm._peak_mib(fn) for k, fn in fns.items()},
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": bm._cpu_load(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
