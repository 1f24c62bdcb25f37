"""Data parallelism on the CPU: 2 ranks x 1 thread against 1 rank x 2 threads, saved as JSON.

Both sides train the same config on the same global batch (``--batch`` images: all of it on
one rank, half on each of two, ``data.batch_size`` being per rank) from the same weights. Per
side: the step time (``Trainer.train_step``, batches loaded beforehand; on two ranks the slower
rank's), images/s (global batch / step time), and on two ranks where the step's time goes:

* ``exposed_allreduce_s``: what :meth:`GradientSync.finish` waited for the gradient all-reduces
  after the backward (the communication the overlap did not hide);
* ``other_collectives_s``: the agreement all-reduce before the step and the losses' all-reduce
  and the buffers' broadcast after it;
* ``standalone_allreduce_s``: one blocking all-reduce of the same bytes timed alone after the
  steps: what the gradients' all-reduce costs when nothing overlaps it.

Sides run one after the other, ``--rounds`` times in alternation, each in fresh processes; the
machine's load average (/proc/loadavg) is recorded before and after each run, as other work on
a shared machine slows either side.

    python benchmarks/bench_distributed.py --config synthetic \
        --out benchmarks/results/cpu-epyc-2core/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ worker


def _worker(args) -> None:
    """One rank of one side: trains ``--warmup + --steps`` steps and writes its timings."""
    import torch
    import torch.distributed as dist

    from mtlfast.train import Trainer, distributed, load_config
    from mtlfast.train.data import train_loader

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        distributed.init_distributed(timeout_s=600)
    rank = dist.get_rank() if ranks > 1 else 0
    overrides = [
        *args.set,
        f"data.batch_size={args.batch // ranks}",
        f"train.threads={args.threads}",
        "train.progress=false",
        "train.strategy=" + args.strategy,
    ]
    config = load_config(args.config, overrides)
    trainer = Trainer(config)
    loader = iter(train_loader(config, trainer.train_set, rank=rank, world_size=ranks))
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    steps, timings = [], []
    for i, batch in enumerate(batches):
        if ranks > 1:
            dist.barrier()
        tick = time.perf_counter()
        trainer.train_step(batch)
        spent = time.perf_counter() - tick
        if i >= args.warmup:
            steps.append(spent)
            if trainer.parallel is not None:
                timings.append(dict(trainer.parallel.timings))
    out = {"step_s": steps, "timings": timings}
    if trainer.parallel is not None:
        sync = trainer.parallel.grads
        buffer = torch.zeros(sync.bytes_per_step // 4)
        alone = []
        for _ in range(3):
            dist.barrier()
            tick = time.perf_counter()
            dist.all_reduce(buffer)
            alone.append(time.perf_counter() - tick)
        out["standalone_allreduce_s"] = alone
        out["allreduce_bytes"] = sync.bytes_per_step
        out["buckets"] = len(sync.buckets)
        every = [None] * ranks
        dist.all_gather_object(every, out)
        distributed.shutdown()
        if rank != 0:
            return
        out = {"ranks": every}
    else:
        out = {"ranks": [out]}
    out["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    out["threads"] = torch.get_num_threads()
    Path(args.part).write_text(json.dumps(out))


def _side(args, ranks: int, threads: int, part: Path) -> dict:
    """Runs one side in fresh processes; its timings and the load around it."""
    port = _free_port()
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--part",
        str(part),
        "--threads",
        str(threads),
        *[x for s in args.set for x in ("--set", s)],
        "--config",
        args.config,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--strategy",
        args.strategy,
    ]
    before = _loadavg()
    procs = []
    for r in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if ranks > 1:
            env.update(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(ranks),
                LOCAL_WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(subprocess.Popen(command, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    result = json.loads(part.read_text())
    result["loadavg_before"], result["loadavg_after"] = before, _loadavg()
    return result


def _summary(run: dict, batch: int) -> dict:
    """Per step: the slowest rank's time, images/s and the collectives' times (medians)."""
    ranks = run["ranks"]
    steps = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
    step = statistics.median(steps)
    out = {"step_s": step, "step_s_all": steps, "images_per_s": batch / step}
    if len(ranks) > 1:
        waits = [t["grads"]["wait_s"] for r in ranks for t in r["timings"]]
        other = [t["agree_s"] + t["after_s"] for r in ranks for t in r["timings"]]
        early = [t["grads"]["early"] for r in ranks for t in r["timings"]]
        alone = statistics.median(x for r in ranks for x in r["standalone_allreduce_s"])
        out.update(
            exposed_allreduce_s=statistics.median(waits),
            exposed_allreduce_share=statistics.median(waits) / step,
            other_collectives_s=statistics.median(other),
            standalone_allreduce_s=alone,
            standalone_allreduce_share=alone / step,
            allreduce_bytes=ranks[0]["allreduce_bytes"],
            buckets=ranks[0]["buckets"],
            buckets_sent_during_backward=statistics.median(early),
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="synthetic")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=8, help="global batch (default 8, the demo's)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--strategy", default="recompute")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    import torch

    runs = {"1x2": [], "2x1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, ranks, threads in (("1x2", 1, 2), ("2x1", 2, 1)):
                run = _side(args, ranks, threads, Path(tmp) / f"{name}-{r}.json")
                runs[name].append(run)
                print(name, json.dumps(_summary(run, args.batch)), flush=True)
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "config": args.config,
        "overrides": args.set,
        "strategy": args.strategy,
        "global_batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "parameters": runs["2x1"][0]["parameters"],
        "note": "a machine shared with other work: see each run's loadavg_before/after",
        "sides": {
            "1x2": "1 rank x 2 threads, batch 8",
            "2x1": "2 ranks (gloo) x 1 thread, batch 4 each",
        },
        "runs": {
            name: [
                {
                    **_summary(run, args.batch),
                    "loadavg_before": run["loadavg_before"],
                    "loadavg_after": run["loadavg_after"],
                }
                for run in rs
            ]
            for name, rs in runs.items()
        },
    }
    for name in runs:
        result[f"{name}_step_s_median"] = statistics.median(
            r["step_s"] for r in result["runs"][name]
        )
    result["speedup_2x1_over_1x2"] = result["1x2_step_s_median"] / result["2x1_step_s_median"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
