"""UberNet Eq. 8 vs Eq. 9: the size of a task's updates when few samples are labelled for it.

UberNet (VGG-16 at width 0.25, one scale) on the synthetic scenes, 64x64, batches of 14, from
the same initialisation, plain SGD (no momentum, no weight decay, constant rate, so that an
update is ``lr`` times the gradient it applies). The task ``depth`` is labelled either on every
sample or on 1 sample in 7 (seven sources, ``depth`` in one: ``data.labels`` of the config);
``semseg`` always on every sample. Three ways to step:

* ``eq8``: the paper's synchronous SGD, Eq. 6-8: each task's loss summed over its labelled
  samples and divided by the batch size B (``w_t * K_t / B``), one step per batch;
* ``standard``: mtlfast's default step, each task's loss averaged over its labelled samples;
* ``async``: :class:`mtlfast.train.AsyncSGD` (Table 3) through
  :class:`mtlfast.train.procedures.UberNetAsyncProcedure`, B_p 10 for tasks, 30 for the trunk.

For each, the mean L2 norm of the updates of the depth head's parameters (one vector: all of
them) over the steps that moved it, and how many there were, over ``--steps`` steps.

    python -m benchmarks.ubernet_async_updates --out benchmarks/results/cpu-epyc-2core/ubernet_async_updates.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mtlfast.engine import multi_branch_step
from mtlfast.train import Trainer, load_config
from mtlfast.train.data import batch_to, train_loader

RARE = [["semseg", "depth"]] + [["semseg"]] * 6  # depth on 1 sample in 7
FULL = [["semseg", "depth"]]


def run(mode: str, labels, steps: int, lr: float) -> dict:
    config = load_config(
        "ubernet_synthetic",
        [
            "tasks=[semseg, depth]",
            "loss.weights={semseg: 1.0, depth: 1.0}",
            "model.options={width: 0.25, scales: [1.0]}",
            "data.size=64",
            "data.batch_size=14",
            f"data.labels={json.dumps(labels)}",
            "optim.name=sgd",
            f"optim.lr={lr}",
            "optim.momentum=0.0",
            "optim.weight_decay=0.0",
            "schedule.kind=constant",
            "schedule.warmup_steps=0",
            f"procedure.name={'ubernet_async' if mode == 'async' else 'standard'}",
            "procedure.options={}"
            if mode != "async"
            else "procedure.options={shared_batch: 30, task_batch: 10}",
            "train.threads=1",
            "train.progress=false",
        ],
    )
    trainer = Trainer(config)
    head = list(trainer.model.heads["depth"].parameters())
    batches = iter(train_loader(config, trainer.train_set))
    norms, labelled = [], 0
    for _ in range(steps):
        batch = next(batches)
        before = torch.cat([p.detach().flatten() for p in head])
        labelled += int(batch["labeled"]["depth"].sum())
        if mode == "eq8":  # Eq. 6-8: (1/B) sum_i delta_{t,i} grad, one step per batch
            batch = batch_to(batch, trainer.device)
            (trunk, heads), targets, loss_fns, flags, weights = trainer._engine_inputs(batch)
            n = batch["image"].shape[0]
            count = {t: int(batch["labeled"][t].sum()) for t in ("semseg", "depth")}
            scaled = {k: w * count[k.split("/")[0]] / n for k, w in weights.items()}
            trainer.model.train()
            multi_branch_step(
                trunk, heads, batch["image"], targets, loss_fns, labeled=flags, weights=scaled
            )
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        else:
            trainer.train_step(batch)
        after = torch.cat([p.detach().flatten() for p in head])
        delta = float((after - before).norm())
        if delta > 0:
            norms.append(delta)
    return {
        "updates": len(norms),
        "samples_labelled_for_depth": labelled,
        "mean_update_norm": statistics.fmean(norms) if norms else 0.0,
        "median_update_norm": statistics.median(norms) if norms else 0.0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = {"steps": args.steps, "batch": 14, "lr": args.lr, "runs": {}}
    for mode in ("eq8", "standard", "async"):
        for name, labels in (("full", FULL), ("one_in_7", RARE)):
            result["runs"][f"{mode}/{name}"] = run(mode, labels, args.steps, args.lr)
            print(mode, name, result["runs"][f"{mode}/{name}"], flush=True)
        r = result["runs"]
        result[f"{mode}_rare_over_full"] = (
            r[f"{mode}/one_in_7"]["mean_update_norm"] / r[f"{mode}/full"]["mean_update_norm"]
        )
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
