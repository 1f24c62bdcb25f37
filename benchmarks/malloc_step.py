"""Each model's training step in a process of its own, with glibc's malloc as mtlfast's trainer
sets it and as a plain process has it, as JSON.

A CPU training step allocates and frees the same large tensors every step; glibc maps each block
of 32 MiB or more afresh and unmaps it on free (and hands the top of its heap back past a
threshold), so the kernel faults in and zeroes their pages again every step.
``train.keep_freed_memory`` (the trainer's default on the CPU, :mod:`mtlfast.train.malloc`) keeps
that memory for reuse. ``bench_models`` and ``side_by_side_release`` run every side in one
process, whose malloc the first trainer sets, so there the release-style side is spared the faults
too; this measures each side as it would run on its own:

* ``mtlfast``: ``Trainer.train_step`` (``bench_models.make_trainer``), ``kept``: as shipped,
  ``system``: with ``train.keep_freed_memory=false``;
* ``release``: ``bench_models.ReleaseSide`` over the release-style network, ``system``: glibc
  left alone, as the authors' scripts run, ``kept``: after :func:`mtlfast.train.keep_freed_memory`;
* ``authors`` (MTI-Net, PAD-Net, ASTMT; needs ``--release-root`` as ``side_by_side_release``):
  the authors' own network, losses and loop (``side_by_side_release``'s "authors' own loop"),
  built from a user's checkout of their repository, malloc as for ``release``.

Every (side, malloc) pair runs in a fresh process (``--steps`` steps: the first ``--warmup``
untimed, the median of the rest), ``--rounds`` times, the order rotating from round to round; the
processes get this one's environment without glibc's ``MALLOC_*`` variables (which would pin
what is measured here) unless ``--keep-malloc-env``. Recorded per process: the step times, the
minor page faults per timed step (``getrusage``) and the peak resident size. Figures: the median
over processes of the per-process medians, and the ratios ``mtlfast kept / release system`` (as
shipped against as released), ``mtlfast kept / mtlfast system`` and ``release kept / release
system``.

    python -m benchmarks.malloc_step --out benchmarks/results/cpu-epyc-2core/malloc_step.json
    python -m benchmarks.malloc_step --models padnet --rounds 1 --steps 3 --warmup 1 --size 64
    python -m benchmarks.malloc_step --models mtinet padnet astmt --sides mtlfast authors \
        --release-root /tmp/releases/mtl --release-root /tmp/releases/astmt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDES = ("mtlfast", "release", "authors")
AUTHORS_MODELS = ("mtinet", "padnet", "astmt")
MALLOCS = ("kept", "system")


def _child(args) -> dict:
    """One side, one malloc setting, in this process: the steps' times, faults and peak RSS."""
    import torch

    from benchmarks import bench_models as bm
    from mtlfast.train import keep_freed_memory

    torch.set_num_threads(args.threads)

    class Options:
        ubernet_backbone, ubernet_width = "vgg16", 1.0

    ours, release, kind, names, _ = bm.build(args.model, Options)
    batch = bm.make_batch(args.batch, args.size)
    fmt = bm.shipped_memory_format(args.model)
    kept = args.malloc == "kept"
    if args.side == "mtlfast":
        trainer = bm.make_trainer(
            ours, "recompute", args.threads, 1e-3, memory_format=fmt, keep_freed_memory=kept
        )
        bm.settle_layout(trainer, batch)  # "auto": the trial's steps before the measured ones
        step = lambda: trainer.train_step(batch)
        applied = trainer.kept_freed_memory
    elif args.side == "authors":
        from benchmarks import side_by_side_release as sbs

        roots = sbs.find_roots(args.release_root)
        del ours
        _, _, _, own, _, _ = sbs.build(args.model, roots, batch, 1e-3)
        applied = keep_freed_memory() if kept else False
        step = lambda: own.step(batch)
    else:  # the trainer only lends its loss functions and weights
        trainer = bm.make_trainer(
            ours, "recompute", args.threads, 1e-3, memory_format=fmt, keep_freed_memory=False
        )
        side = bm.ReleaseSide(release, names, kind, trainer.loss_fns, trainer.weights, 1e-3)
        del trainer, ours
        applied = keep_freed_memory() if kept else False
        step = lambda: side.step(batch)
    times, faults = [], []
    for i in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "step_s": times,
        "median_step_s": statistics.median(times),
        "minor_faults_per_step": faults,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "keep_freed_memory_applied": applied,
    }


def _run(args, model: str, side: str, malloc: str, env: dict) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.malloc_step",
        "--child",
        model,
        side,
        malloc,
        *("--threads", str(args.threads), "--size", str(args.size), "--batch", str(args.batch)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *(a for root in args.release_root for a in ("--release-root", str(root))),
    ]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from benchmarks.bench_models import MODELS, _git_commit, _other_processes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--sides", nargs="+", choices=SIDES, default=["mtlfast", "release"])
    p.add_argument("--rounds", type=int, default=2, help="processes per side and malloc setting")
    p.add_argument("--steps", type=int, default=5, help="steps per process, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--keep-malloc-env", action="store_true", help="pass MALLOC_* variables on")
    p.add_argument(
        "--release-root",
        type=Path,
        action="append",
        default=[],
        help="for --sides authors: a checkout of an authors' repository, once for each",
    )
    p.add_argument("--child", nargs=3, metavar=("MODEL", "SIDE", "MALLOC"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if "authors" in args.sides and not args.child:
        if not args.release_root:
            p.error("--sides authors needs --release-root (see side_by_side_release)")
        if set(args.models) - set(AUTHORS_MODELS):
            p.error(f"--sides authors: the authors' code exists for {AUTHORS_MODELS} only")
    if args.child:
        args.model, args.side, args.malloc = args.child
        print(json.dumps(_child(args)), flush=True)
        return 0

    env = dict(os.environ)
    if not args.keep_malloc_env:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    pairs = [(s, m) for s in args.sides for m in MALLOCS]
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "command": " ".join(["malloc_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "mtlfast_commit": _git_commit(),
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "steps_per_process": args.steps,
        "warmup_steps": args.warmup,
        "malloc_variables_passed_on": {k: v for k, v in env.items() if k.startswith("MALLOC_")},
        "ratio_meaning": "below 1: the first is faster",
        "other_processes_at_start": _other_processes(),
        "models": {},
    }
    for model in args.models:
        runs: dict[str, list[dict]] = {f"{s}_{m}": [] for s, m in pairs}
        for r in range(args.rounds):
            for i in range(len(pairs)):
                side, malloc = pairs[(i + r) % len(pairs)]
                run = _run(args, model, side, malloc, env)
                runs[f"{side}_{malloc}"].append(run)
                print(
                    f"[{model}] {side} {malloc}: {run['median_step_s']:.2f} s, "
                    f"{statistics.median(run['minor_faults_per_step']):.0f} faults/step",
                    flush=True,
                )
        med = {k: statistics.median(x["median_step_s"] for x in v) for k, v in runs.items()}
        result["models"][model] = {
            "runs": runs,
            "median_step_s": med,
            "peak_rss_mib": {k: max(x["peak_rss_mib"] for x in v) for k, v in runs.items()},
            "ratios": {
                f"{a}_over_{b}": med[a] / med[b]
                for a, b in (
                    ("mtlfast_kept", "release_system"),
                    ("mtlfast_kept", "mtlfast_system"),
                    ("release_kept", "release_system"),
                    ("mtlfast_kept", "release_kept"),
                    ("mtlfast_kept", "authors_system"),
                    ("authors_kept", "authors_system"),
                    ("mtlfast_kept", "authors_kept"),
                )
                if a in med and b in med
            },
        }
        print(f"[{model}] ratios {result['models'][model]['ratios']}", flush=True)
        if args.out:  # what is done so far survives a timeout
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    result["other_processes_at_end"] = _other_processes()
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
