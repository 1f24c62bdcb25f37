"""The trainer's overhead and the demo's data rate, saved as JSON.

1. ``Trainer.train_step`` against a bare hand-written loop over the same engine step
   (``multi_branch_step`` + ``optimizer.step`` + ``zero_grad`` + ``scheduler.step``), same model
   weights, same batch, timed alternately in one process; the target is at most 1.03x.
2. The training loader's images/s with the config's workers against the images/s the training
   step consumes; the target is at least 2x (data loading is never the bottleneck).
3. With ``--precision``: the trainer's step in fp32 against bf16 autocast (same weights, same
   batch, alternating), for the README's advice on when bf16 pays on a CPU.

    python benchmarks/bench_trainer.py --config synthetic --out benchmarks/results/cpu-epyc-2core/bench_trainer.json
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

import torch

from mtlfast.engine import multi_branch_step
from mtlfast.train import Trainer, load_config
from mtlfast.train.data import batch_to, train_loader


def _bare_step(model, optimizer, scheduler, loss_fns, weights, batch, tasks, strategy):
    """What a user would write around the engine: no checks, no logging, no clipping."""
    targets = {t: batch[t] for t in tasks}
    labeled = {t: batch["labeled"][t] for t in tasks}
    trunk, heads = model.engine_branches()
    result = multi_branch_step(
        trunk,
        heads,
        batch["image"],
        model.expand(targets),
        model.expand(loss_fns),
        labeled=model.expand(labeled),
        weights=model.expand(weights),
        strategy=strategy,
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return result


def _cpu_load() -> float:
    """Fraction of the machine's CPU time used by other processes over the last second (approx.)."""

    def snap():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    t0, i0 = snap()
    own0 = time.process_time()
    time.sleep(1.0)
    t1, i1 = snap()
    own = time.process_time() - own0
    busy = (t1 - t0) - (i1 - i0)
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, busy / hz - own) / (os.cpu_count() or 1)


def _cpu_bf16_flags() -> list[str]:
    """The CPU's bf16-related instruction-set flags (avx512_bf16, amx_bf16): bf16 pays where they are."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return []
    return sorted(f for f in flags if "bf16" in f)


def _alternate(fns: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each of ``fns`` (name -> run ``steps`` steps), timed round after round
    in alternating order, so that a change in the machine's load hits every side alike."""
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t) / steps)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds of each side")
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--loader-batches", type=int, default=60)
    p.add_argument("--precision", action="store_true", help="also time fp32 against bf16 autocast")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    config = load_config(args.config, args.overrides + ["train.progress=false"])
    trainer = Trainer(config)
    model = copy.deepcopy(trainer.model)
    bare_trainer = Trainer(
        config, model=model
    )  # the same optimiser and schedule, built for `model`
    batch = batch_to(next(iter(train_loader(config, trainer.train_set))), trainer.device)
    tasks = list(config.tasks)

    def run_trainer():
        for _ in range(args.steps):
            trainer.train_step(batch)

    def run_bare():
        for _ in range(args.steps):
            _bare_step(
                model,
                bare_trainer.optimizer,
                bare_trainer.scheduler,
                bare_trainer.loss_fns,
                bare_trainer.weights,
                batch,
                tasks,
                config.train.strategy,
            )

    load_before = _cpu_load()
    times = _alternate({"trainer": run_trainer, "bare": run_bare}, args.rounds, args.steps)
    load_after = _cpu_load()
    ratios = [a / b for a, b in zip(times["trainer"], times["bare"])]
    step_s = statistics.median(times["trainer"])

    # the data side: the training loader alone, with the config's workers
    loader = iter(train_loader(config, trainer.train_set, start=1000))
    next(loader)  # workers started
    t = time.perf_counter()
    for _ in range(args.loader_batches):
        next(loader)
    loader_ips = args.loader_batches * config.data.batch_size / (time.perf_counter() - t)
    consumed_ips = config.data.batch_size / step_s

    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "config": args.config,
        "overrides": args.overrides,
        "threads": torch.get_num_threads(),
        "model": config.model.name,
        "batch_size": config.data.batch_size,
        "size": config.data.size,
        "strategy": config.train.strategy,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "trainer_step_s": times["trainer"],
        "bare_step_s": times["bare"],
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "target_ratio_at_most": 1.03,
        "loader_images_per_s": loader_ips,
        "loader_workers": config.data.num_workers,
        "step_consumes_images_per_s": consumed_ips,
        "loader_over_consumption": loader_ips / consumed_ips,
        "target_loader_over_consumption_at_least": 2.0,
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": load_after,
    }
    if args.precision:
        bf16 = Trainer(
            load_config(
                args.config, args.overrides + ["train.progress=false", "train.precision=bf16"]
            ),
            model=copy.deepcopy(trainer.model),
        )

        def run_bf16():
            for _ in range(args.steps):
                bf16.train_step(batch)

        p_times = _alternate({"fp32": run_trainer, "bf16": run_bf16}, args.rounds, args.steps)
        speedups = [a / b for a, b in zip(p_times["fp32"], p_times["bf16"])]
        result.update(
            {
                "fp32_step_s": p_times["fp32"],
                "bf16_step_s": p_times["bf16"],
                "bf16_speedup_median": statistics.median(speedups),
                "bf16_speedup_min": min(speedups),
                "bf16_speedup_max": max(speedups),
                "cpu_flags_bf16": _cpu_bf16_flags(),
            }
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
