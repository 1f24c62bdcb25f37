"""ASTMT's training step with the adversarial term: mtlfast's procedure against the release's.

The release's PASCAL network (SE-ResNet-26, task SE/BN, adapters, the fconv discriminator on the
decoder output) at ``--size`` x ``--size``, batch ``--batch``, its five tasks with random labels,
PASCAL loss weights, SGD momentum 0.9, w_d 0.1, one process on ``--threads`` threads:

* ``release``: the release script's batch loop (``experiments/dense_predict/pascal_resnet/
  main.py`` with ``compute_losses``), rebuilt over ``benchmarks/release_models.ReleaseNet``: per
  task a forward of the whole network (input gradients on, as the release sets them), the task
  loss, its gradient at the decoder output with ``create_graph``, per-pixel normalisation,
  gradient reversal, the discriminator's cross-entropy, ``(1 - w_d) L_t + w_d L_d``, backward,
  the unused parameters' gradients set to None after tracing the graph (``make_closure_fast``),
  an SGD step;
* mtlfast's :class:`mtlfast.train.procedures.ASTMTProcedure` on the same weights
  (``ASTMT(**release_options(state))``): ``task_passes`` (``updates="task"``, the default and
  the paper's: T separate passes and T steps), ``sequential`` (``updates="batch"``: the shared
  stem once, each task's pass forward and backward in turn, one step) and ``batched`` (the T
  passes stacked into one graph, one step).

``--malloc kept`` (the default) applies :func:`mtlfast.train.keep_freed_memory` first, as the
trainer does on the CPU (``train.keep_freed_memory``), for every side alike: without it each
tensor of 32 MiB or more is mapped and faulted in afresh on every step, which the batched side,
whose maps are T times larger, pays most (``--malloc system`` measures that).

``--strategy recompute`` (or ``naive``) runs mtlfast's sides inside the memory engine's strategy,
as the trainer does with ``train.strategy`` (recompute, its default: the blocks of the first
``ASTMT.recompute_stages`` encoder stages recomputed in backward); "none" (the default here)
runs them outside any, as a user's own loop calling the procedure does.

Time: ``--rounds`` alternating rounds of one step each after a warm-up step
(``bench_trainer._alternate``). Peak memory: ``mtlfast.profiling.memory("cpu")`` around one
step after a warm-up step (momentum buffers allocated), with the shared part's memory (the stem's
kept activations and its output) measured on its own.

    python -m benchmarks.bench_astmt_procedure --out benchmarks/results/cpu-epyc-2core/bench_astmt_procedure.json
    python -m benchmarks.bench_astmt_procedure --size 64 --rounds 1    # a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn import functional as F

import mtlfast
from benchmarks.bench_trainer import _alternate, _cpu_load
from benchmarks.release_models import RELEASE_TASKS, ReleaseNet
from mtlfast.engine._context import running
from mtlfast.losses import PASCAL_WEIGHTS, for_task
from mtlfast.models import ASTMT, load_release_checkpoint, release_options
from mtlfast.train import keep_freed_memory
from mtlfast.train.procedures import ASTMTProcedure

OURS_TO_RELEASE = {
    "semseg": "semseg",
    "parts": "human_parts",
    "saliency": "sal",
    "normals": "normals",
    "edge": "edge",
}
MIB = 2.0**20
W_D = 0.1


def make_batch(n: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    semseg = torch.randint(0, 21, (n, size, size), generator=g)
    semseg[:, :, : size // 16] = 255
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "semseg": semseg,
        "parts": torch.randint(0, 7, (n, size, size), generator=g),
        "saliency": (torch.rand(n, 1, size, size, generator=g) > 0.7).float(),
        "normals": F.normalize(torch.randn(n, 3, size, size, generator=g), dim=1),
        "edge": (torch.rand(n, 1, size, size, generator=g) > 0.95).float(),
    }


class _Reverse(torch.autograd.Function):  # fblib/layers/reverse_grad.py
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.alpha, None


def _used_parameters(loss):
    """fblib/util/optimizer_mtl/select_used_modules.traverse_graph."""
    seen, found, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(fn.variable)
        stack.extend(u for u, _ in getattr(fn, "next_functions", ()))
    return found


def _release_forward(net, x, task):
    y = net.maxpool(F.relu(net.bn1(net.conv1(x))))
    feats = []
    for i in range(1, 5):
        for block in getattr(net, f"layer{i}"):
            y = block(y, task)
        feats.append(y)
    out, features = net.decoder(feats[0], feats[-1], task)
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False), features


def release_step(net, optimizer, batch, loss_fns, alpha):
    inputs = batch["image"].clone().requires_grad_()  # the release: inputs.requires_grad_()
    for i, (ours, rel) in enumerate(OURS_TO_RELEASE.items()):
        out, features = _release_forward(net, inputs, rel)
        loss_t = PASCAL_WEIGHTS[ours] * loss_fns[ours](out, batch[ours])
        (g,) = torch.autograd.grad(loss_t, features, create_graph=True)
        g = g / (g.norm(p=2, dim=1, keepdim=True) + 1e-10)
        logits = net.discriminator.model(_Reverse.apply(g, alpha))
        labels = torch.full(
            (g.shape[0], *g.shape[2:]), list(RELEASE_TASKS).index(rel), dtype=torch.long
        )
        loss = (1 - W_D) * loss_t + W_D * F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad()
        used = _used_parameters(loss)
        loss.backward()
        for p in net.parameters():
            if p not in used:
                p.grad = None
        optimizer.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default="release,task_passes,sequential,batched")
    ap.add_argument("--strategy", choices=("none", "naive", "recompute"), default="none")
    ap.add_argument("--malloc", choices=("kept", "system"), default="kept")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_kept = keep_freed_memory() if args.malloc == "kept" else False
    load_before = _cpu_load()
    torch.manual_seed(0)
    release = ReleaseNet(RELEASE_TASKS, adapt=True, dscr=True).train()
    ours = ASTMT(**release_options(release.state_dict()))
    load_release_checkpoint(ours, release.state_dict())
    ours.train()
    batch = make_batch(args.batch, args.size)
    loss_fns = {t: for_task(t) for t in OURS_TO_RELEASE}

    def sgd(params):
        return torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=1e-4)

    release_opt = sgd(release.parameters())
    steps = {}
    sides = args.sides.split(",")
    if "release" in sides:
        steps["release"] = lambda: release_step(release, release_opt, batch, loss_fns, 0.5)
    modes = {
        "task_passes": {"updates": "task"},
        "sequential": {"updates": "batch"},
        "batched": {"updates": "batch", "execution": "batched"},
    }
    for name, options in modes.items():
        if name not in sides:
            continue
        opt = sgd(ours.parameters())
        proc = ASTMTProcedure(ours, opt, max_steps=10, discriminator_weight=W_D, **options)

        def step(proc=proc, opt=opt):
            with running(args.strategy) if args.strategy != "none" else nullcontext():
                proc.backward(batch, loss_fns, PASCAL_WEIGHTS)
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    times = _alternate(steps, args.rounds, 1)
    peaks = {}
    for name, fn in steps.items():
        fn()
        gc.collect()
        with mtlfast.profiling.memory("cpu") as m:
            fn()
        peaks[name] = m.peak_extra_bytes / MIB
    gc.collect()
    with mtlfast.profiling.memory("cpu") as m:
        kept = ours.shared_part(batch["image"])
    shared_mib = m.end_extra_bytes / MIB
    del kept
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": "see benchmarks/results/README.md",
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "tasks": len(OURS_TO_RELEASE),
        "strategy": args.strategy,
        "malloc": args.malloc,
        "keep_freed_memory_applied": malloc_kept,
        "recompute_stages": ours.recompute_stages,
        "step_s": times,
        "step_s_median": median,
        "peak_mib": peaks,
        "shared_part_mib": shared_mib,
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": _cpu_load(),
    }
    for base in ("release", "task_passes"):
        if base in median:
            result[f"speedup_over_{base}"] = {k: median[base] / v for k, v in median.items()}
            result[f"peak_over_{base}"] = {k: v / peaks[base] for k, v in peaks.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
