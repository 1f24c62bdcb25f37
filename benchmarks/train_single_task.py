"""Trains the single-task baselines of a config (one network per task, the config's
``model.baseline_like`` family, everything else as the config says) and saves their final
metrics as the delta_m reference the config's ``eval.baselines`` can point at.

    python benchmarks/train_single_task.py synthetic --out mtlfast/configs/synthetic_single_task.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtlfast.train import Trainer, load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--tasks", nargs="*", help="default: the config's tasks")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    base = load_config(args.config, args.overrides)
    family = base.model.baseline_like or base.model.name
    results, runs = {}, {}
    start = time.time()
    for task in args.tasks or base.tasks:
        weight = (
            (base.loss.weights or {}).get(task, 1.0)
            if isinstance(base.loss.weights, dict)
            else None
        )
        config = load_config(
            args.config,
            args.overrides
            + [
                f"loss.weights={{{task}: {weight}}}"
                if weight is not None
                else f"loss.weights={base.loss.weights or 'null'}",
                f"tasks=[{task}]",
                "model.name=single_task",
                "model.backbone=null",
                f"model.options={{like: {family}}}",
                "eval.baselines=null",
                "eval.select=auto",
                "eval.before_training=false",
                "train.plots=false",
                "train.tensorboard=false",
            ],
        )
        with tempfile.TemporaryDirectory() as run_dir:
            t = time.time()
            out = Trainer(config, run_dir).fit()
        results[task] = out["final"]["tasks"][task]
        runs[task] = {
            "wall_time_s": time.time() - t,
            "steps": out["steps"],
            "images_per_s": out["images_per_s"],
        }
        print(
            f"{task}: {json.dumps({k: v for k, v in results[task].items() if isinstance(v, float)})}",
            flush=True,
        )
    document = {
        "tasks": results,
        "family": family,
        "command": "python benchmarks/train_single_task.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config,
        "overrides": args.overrides,
        "runs": runs,
        "wall_time_s": time.time() - start,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
