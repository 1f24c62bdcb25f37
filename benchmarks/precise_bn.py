"""Eval-mode metrics of a short run with and without precise-BN (batch-norm statistics
re-estimated on training batches), the figure behind ``eval.bn_recalibration``'s default.

    python benchmarks/precise_bn.py --config synthetic --set train.max_steps=150 --out precise_bn.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtlfast.train import Trainer, load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="synthetic")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--batches", type=int, default=20, help="training batches for precise-BN")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    # no evaluation (and so no recalibration) during the run: the running statistics are training's
    config = load_config(
        args.config,
        args.overrides
        + [
            "train.eval_every=0",
            "eval.bn_recalibration=0",
            "eval.before_training=false",
            "train.progress=false",
        ],
    )
    trainer = Trainer(config)
    results = trainer.fit()
    without = results["final"]["tasks"]
    config.eval.bn_recalibration = args.batches
    with_bn = trainer.evaluate()["tasks"]
    out = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": results["steps"],
        "batches": args.batches,
        "running_statistics": without,
        "precise_bn": with_bn,
    }
    for task in without:
        scalars = {
            k: (round(v, 4), round(with_bn[task][k], 4))
            for k, v in without[task].items()
            if isinstance(v, float)
        }
        print(f"{task}: (running, precise-BN) {scalars}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
