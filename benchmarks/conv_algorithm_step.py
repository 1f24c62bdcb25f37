"""The trainer's step with ``train.conv_algorithm`` "direct", "winograd" and "auto" (the default), as JSON.

For each model of ``benchmarks/bench_models.py`` (MTI-Net, PAD-Net, ASTMT, UberNet on PASCAL's
five tasks, 256x256, batch 4, SGD), three trainers on copies of the same weights: one with every
convolution ``F.conv2d``'s, one whose 3x3 convolutions of at least 128 channels (and
distillation) run by Winograd's F(4x4, 3x3) (:func:`mtlfast.nn.use_winograd`), one that lets each
of those shapes take Winograd only where a measurement on this CPU found it faster
(:func:`mtlfast.ops.set_winograd_autotune`, switched around each of its steps: the setting is
process-wide). They take one ``Trainer.train_step`` each per round, alternating
(``bench_trainer._alternate``), after one untimed step each (auto's measures its shapes) whose
total losses are compared (the rounding of the transforms). Also the number of layers switched,
the shapes auto measured and chose, and the machine's load around each model.

    python benchmarks/conv_algorithm_step.py --out benchmarks/results/<machine>/conv_algorithm_step.json
    python benchmarks/conv_algorithm_step.py --models padnet --rounds 3
    python benchmarks/conv_algorithm_step.py --quick     # 64x64, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
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
from benchmarks.bench_models import MODELS, _git_commit, build, make_batch, make_trainer
from benchmarks.bench_trainer import _alternate, _cpu_load
from benchmarks.channels_last_step import DEFAULT_ROUNDS, _loadavg
from mtlfast.nn import WinogradConv2d
from mtlfast.ops import set_winograd_autotune, winograd_autotune_choices

ALGORITHMS = ("direct", "winograd", "auto")


def measure(name: str, args, batch: dict) -> dict:
    ours = build(name, args)[0]
    models = {a: ours if a == "direct" else copy.deepcopy(ours) for a in ALGORITHMS}
    trainers = {
        a: make_trainer(models[a], "recompute", args.threads, args.lr, conv_algorithm=a)
        for a in ALGORITHMS
    }

    def step(a: str):
        # the autotune switch is process-wide: each side's step runs under its own setting
        set_winograd_autotune(a == "auto")
        return trainers[a].train_step(batch)

    switched = sum(type(m) is WinogradConv2d for m in trainers["winograd"].model.modules())
    start = time.perf_counter()
    first = {a: step(a) for a in ALGORITHMS}  # also the warm-up (and auto's measurements)
    warm_up_s = time.perf_counter() - start
    losses = {a: float(first[a].total) for a in ALGORITHMS}
    rounds = args.rounds or DEFAULT_ROUNDS[name]
    load_before, cpu_before = _loadavg(), _cpu_load()
    times = _alternate({a: (lambda a=a: step(a)) for a in ALGORITHMS}, rounds, steps=1)
    choices = winograd_autotune_choices()
    row = {
        "rounds": rounds,
        "winograd_conv2d_layers": switched,
        "auto_shapes_measured": len(choices),
        "auto_shapes_winograd": sum(map(bool, choices.values())),
        "auto_choices": {str(k[:5]): v for k, v in choices.items()},
        "warm_up_steps_s": round(warm_up_s, 2),
        "step_s": {a: [round(t, 3) for t in times[a]] for a in ALGORITHMS},
        "median_step_s": {a: round(statistics.median(times[a]), 3) for a in ALGORITHMS},
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "other_cpu_share_before": round(cpu_before, 3),
    }
    for a in ("winograd", "auto"):
        per_round = [x / y for x, y in zip(times[a], times["direct"])]
        row[f"ratio_{a}_over_direct"] = round(
            statistics.median(times[a]) / statistics.median(times["direct"]), 3
        )
        row[f"per_round_ratio_{a}"] = [round(r, 3) for r in per_round]
        row[f"first_step_loss_rel_diff_{a}"] = abs(losses[a] - losses["direct"]) / max(
            abs(losses["direct"]), 1e-30
        )
    per_round = [x / y for x, y in zip(times["auto"], times["winograd"])]
    row["per_round_ratio_auto_over_winograd"] = [round(r, 3) for r in per_round]
    row["first_step_total_loss"] = losses
    trainers.clear(), models.clear()
    del ours
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
    p.add_argument("--quick", action="store_true", help="64x64, 1 round: a smoke test")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 64, 1
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    out = {
        "what": "Trainer.train_step, train.conv_algorithm direct vs winograd vs auto, alternating",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "mtlfast": mtlfast.__version__,
        "commit": _git_commit(),
        "threads": args.threads,
        "batch": args.batch,
        "size": args.size,
        "malloc_env": malloc_env.current(),
        "command": "python benchmarks/conv_algorithm_step.py " + " ".join(sys.argv[1:]),
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
