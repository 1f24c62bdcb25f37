"""mtlfast's training step with and without the dilated-convolution and loss changes, in one process.

The changes: :func:`mtlfast.ops.atrous_conv2d` (dilated taps that read only padding skipped),
``_MergedConv2d``'s backward over the dilation's phases (no oneDNN dilated weight-gradient
buffer) and the cross-entropy's one-map backward. "old" switches all three off for its step
(aten's dilated convolutions and ``F.cross_entropy``), "new" is the shipped code; the two steps
alternate on one trainer (``bench_models``' construction and batch, 256x256, batch 4), the
first untimed. The ratio is new / old per round.

    env $(python3 benchmarks/malloc_env.py) OMP_NUM_THREADS=2 \\
        .venv/bin/python -m benchmarks.ab_atrous_loss astmt --rounds 6 --out ab_astmt.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn import functional as F

from benchmarks import bench_models as bm
from mtlfast.losses import segmentation
from mtlfast.nn import adapters
from mtlfast.ops import atrous_conv


def _aten_ce(x, target, ignore_index):
    return F.cross_entropy(x, target, ignore_index=ignore_index, reduction="sum")


@contextlib.contextmanager
def _old():
    saved = (atrous_conv._cover, adapters._phased, segmentation._SoftmaxCrossEntropySum.apply)
    atrous_conv._cover = lambda *a: 1.0
    adapters._phased = lambda *a: False
    segmentation._SoftmaxCrossEntropySum.apply = _aten_ce
    try:
        yield
    finally:
        atrous_conv._cover, adapters._phased, segmentation._SoftmaxCrossEntropySum.apply = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=bm.MODELS)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    opts = argparse.Namespace(
        size=256, batch=4, threads=2, lr=1e-3, precision="fp32", quick=False,
        ubernet_backbone="vgg16", ubernet_width=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = bm.build(args.model, opts)[0]
    fmt = bm.shipped_memory_format(args.model)
    trainer = bm.make_trainer(model, "recompute", opts.threads, opts.lr, "fp32", fmt)
    batch = bm.make_batch(opts.batch, opts.size)
    fmt = bm.settle_layout(trainer, batch)  # "auto": both sides in the layout it chose

    def old():
        with _old():
            trainer.train_step(batch)

    fns = {"new": lambda: trainer.train_step(batch), "old": old}
    for fn in fns.values():
        fn()
    load_before = bm._cpu_load()
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        print(r, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
    ratio = [a / b for a, b in zip(times["new"], times["old"])]
    result = {
        "model": args.model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": opts.threads,
        "memory_format": fmt,
        "step_s": times,
        "step_s_median": {k: statistics.median(v) for k, v in times.items()},
        "ratio_new_over_old_median": statistics.median(ratio),
        "ratio_new_over_old_range": [min(ratio), max(ratio)],
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": bm._cpu_load(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "step_s"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
