"""The trainer's step in NCHW against channels-last memory format (``train.memory_format``), as JSON.

For each model of ``benchmarks/bench_models.py`` (MTI-Net, PAD-Net, ASTMT, UberNet on PASCAL's
five tasks, its batch, loss weights and SGD), two trainers on copies of the same weights, one with
``train.memory_format: contiguous`` and one with ``channels_last`` (the model's 4-d weights and
every batch's images converted by the trainer), take one ``Trainer.train_step`` each per round,
alternating (``bench_trainer._alternate``), after one untimed step each whose losses are compared
(the two layouts must train the same network: relative difference of the total loss). A
torch.profiler step of each side counts ``aten::copy_`` calls and their self time: the layout
conversions left. The machine's load (``/proc/loadavg`` before and after each model, the other
processes' CPU share) is recorded with the times.

    python benchmarks/channels_last_step.py --out benchmarks/results/cpu-epyc-2core/channels_last_step.json
    python benchmarks/channels_last_step.py --models mtinet --rounds 5
    python benchmarks/channels_last_step.py --quick     # 64x64, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import mtlfast
from benchmarks import malloc_env
from benchmarks.bench_models import MODELS, _git_commit, build, make_batch, make_trainer
from benchmarks.bench_trainer import _alternate, _cpu_load
from mtlfast.train import Trainer

# PAD-Net's and UberNet's steps take 10-20 s here: fewer rounds
DEFAULT_ROUNDS = {"mtinet": 5, "astmt": 5, "padnet": 3, "ubernet": 3}
FORMATS = ("contiguous", "channels_last")


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def _copies(trainer: Trainer, batch: dict) -> dict:
    """``aten::copy_`` calls and their self CPU time in one profiled step, and the step's total."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    copy_ = next((e for e in events if e.key == "aten::copy_"), None)
    return {
        "copy_calls": copy_.count if copy_ else 0,
        "copy_self_ms": round(copy_.self_cpu_time_total / 1e3, 1) if copy_ else 0.0,
        "copy_self_share": round(copy_.self_cpu_time_total / total, 4) if copy_ and total else 0.0,
    }


def measure(name: str, args, batch: dict) -> dict:
    ours = build(name, args)[0]
    models = {"contiguous": ours, "channels_last": copy.deepcopy(ours)}
    trainers = {
        f: make_trainer(models[f], "recompute", args.threads, args.lr, memory_format=f)
        for f in FORMATS
    }
    first = {f: trainers[f].train_step(batch) for f in FORMATS}  # also the warm-up
    a, b = (float(first[f].total) for f in FORMATS)
    rounds = args.rounds or DEFAULT_ROUNDS[name]
    load_before, cpu_before = _loadavg(), _cpu_load()
    fns = {f: (lambda t=trainers[f]: t.train_step(batch)) for f in FORMATS}
    times = _alternate(fns, rounds, steps=1)
    load_after = _loadavg()
    per_round = [c / n for c, n in zip(times["channels_last"], times["contiguous"])]
    row = {
        "rounds": rounds,
        "step_s": {f: [round(t, 3) for t in times[f]] for f in FORMATS},
        "median_step_s": {f: round(statistics.median(times[f]), 3) for f in FORMATS},
        "ratio_channels_last_over_contiguous": round(
            statistics.median(times["channels_last"]) / statistics.median(times["contiguous"]), 3
        ),
        "per_round_ratio": [round(r, 3) for r in per_round],
        "per_round_ratio_range": [round(min(per_round), 3), round(max(per_round), 3)],
        "first_step_total_loss": {"contiguous": a, "channels_last": b},
        "first_step_loss_rel_diff": abs(a - b) / max(abs(a), 1e-30),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "other_cpu_share_before": round(cpu_before, 3),
    }
    if not args.no_profile:
        row["profiled_step"] = {f: _copies(trainers[f], batch) for f in FORMATS}
    del trainers, models, ours
    gc.collect()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rounds", type=int, help="alternating rounds (default: 5 MTI-Net/ASTMT, 3 else)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ubernet-backbone", default="vgg16")
    p.add_argument("--ubernet-width", type=float, default=1.0)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--quick", action="store_true", help="64x64, 1 round: a smoke test")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 64, 1
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    out = {
        "what": "Trainer.train_step, train.memory_format contiguous vs channels_last, alternating",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "mtlfast": mtlfast.__version__,
        "commit": _git_commit(),
        "threads": args.threads,
        "batch": args.batch,
        "size": args.size,
        "malloc_env": malloc_env.current(),
        "command": "python benchmarks/channels_last_step.py " + " ".join(sys.argv[1:]),
        "models": {},
    }
    for name in args.models:
        out["models"][name] = row = measure(name, args, batch)
        print(name, json.dumps(row), flush=True)
        if args.out is not None:  # after each model: a run cut short keeps what it finished
            args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
