"""ASTMT's recompute step by what each task pass keeps, against the release-style step, as JSON.

``bench_models``' ASTMT (the release's network with adapters, its weights, 256x256, batch 4,
PASCAL loss weights, SGD) and its release-style side (the release's per-task updates), one
trainer per ``--variants`` entry on copies of the same weights, ``strategy="recompute"``, one
step each per round, alternating (``bench_trainer._alternate``), after one untimed step each;
then each one's peak as ``bench_models._peak_mib``. A variant is ``recompute_stages`` (how many
encoder stages are recomputed block by block in backward) with ``r`` when the other stages
rebuild their batch-norm outputs in backward (``ASTMT.rebuild_norms``): ``2r`` is the default,
``3`` the default before those were rebuilt.

    env $(python3 benchmarks/malloc_env.py) OMP_NUM_THREADS=2 \\
        .venv/bin/python -m benchmarks.astmt_kept_stages --variants 3 2r 3r --rounds 8
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import bench_models as bm
from benchmarks.bench_trainer import _alternate


def _variant(text: str) -> tuple[int, bool]:
    match = re.fullmatch(r"(\d)(r?)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"a variant is a digit, then r or not; got {text!r}")
    return int(match[1]), bool(match[2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["3", "2r"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for v in args.variants:
        _variant(v)
    torch.set_num_threads(args.threads)
    opts = argparse.Namespace(size=256, batch=4, threads=args.threads, lr=1e-3)
    model, release, kind, names, _ = bm.build("astmt", opts)
    batch = bm.make_batch(opts.batch, opts.size)
    trainers = {}
    for v in args.variants:
        m = copy.deepcopy(model)
        m.recompute_stages, m.rebuild_norms = _variant(v)
        trainers[v] = bm.make_trainer(m, "recompute", args.threads, opts.lr)
    first = trainers[args.variants[0]]
    side = bm.ReleaseSide(release, names, kind, first.loss_fns, first.weights, opts.lr)
    fns = {v: (lambda t=t: t.train_step(batch)) for v, t in trainers.items()}
    fns["release"] = lambda: side.step(batch)
    load_before = bm._cpu_load()
    times = _alternate(fns, args.rounds, 1)
    peaks = {k: bm._peak_mib(fn) for k, fn in fns.items()}

    def ratios(k: str, base: str) -> dict:
        r = [a / b for a, b in zip(times[k], times[base])]
        return {"median": statistics.median(r), "rounds_min": min(r), "rounds_max": max(r)}

    result = {
        "model": "astmt",
        "default_recompute_stages": model.recompute_stages,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "commit": bm._git_commit(),
        "step_s": times,
        "step_s_median": {k: statistics.median(v) for k, v in times.items()},
        "step_over_release": {k: ratios(k, "release") for k in args.variants},
        f"step_over_{args.variants[0]}": {k: ratios(k, args.variants[0]) for k in args.variants},
        "peak_mib": peaks,
        "peak_over_release": {k: peaks[k] / peaks["release"] for k in args.variants},
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": bm._cpu_load(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
