"""PAD-Net's trainer step under ``strategy="recompute"``: the distillation recomputing its pairs'
maps in backward (the default, ``MultiModalDistillation(recompute=None)``) against keeping them
(``recompute=False``, set on the layer for that step), alternating on one trainer
(``bench_models``' construction and batch, 256x256, batch 4, 2 threads), the first step of each
untimed; then each side's peak as ``bench_models._peak_mib``.

    env $(python3 benchmarks/malloc_env.py) OMP_NUM_THREADS=2 \\
        .venv/bin/python -m benchmarks.padnet_distillation_maps --rounds 3 --out maps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import bench_models as bm
from mtlfast.nn import MultiModalDistillation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    opts = argparse.Namespace(size=256, batch=4, threads=2, lr=1e-3, precision="fp32", quick=False)
    torch.manual_seed(0)
    model = bm.build("padnet", opts)[0]
    trainer = bm.make_trainer(model, "recompute", opts.threads, opts.lr, "fp32")
    batch = bm.make_batch(opts.batch, opts.size)
    layer = next(m for m in model.modules() if isinstance(m, MultiModalDistillation))

    def step(recompute):
        layer.recompute = recompute
        try:
            trainer.train_step(batch)
        finally:
            layer.recompute = None

    fns = {"recompute_maps": lambda: step(None), "keep_maps": lambda: step(False)}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        print(r, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
    ratio = [a / b for a, b in zip(times["keep_maps"], times["recompute_maps"])]
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "step_s": times,
        "step_s_median": {k: statistics.median(v) for k, v in times.items()},
        "keep_over_recompute_median": statistics.median(ratio),
        "keep_over_recompute_range": [min(ratio), max(ratio)],
        "peak_mib": {k: bm._peak_mib(fn) for k, fn in fns.items()},
        "other_cpu_load_after": bm._cpu_load(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
