"""Each model's training step and inference against the release's, time and peak memory, as JSON.

For MTI-Net and PAD-Net (HRNet-18), ASTMT (SE-ResNet-26 with adapters: the release's PASCAL
network) and UberNet, on PASCAL's five tasks (their output channels, random images and labels),
one process, ``--threads`` torch threads:

* mtlfast's step: one ``Trainer.train_step`` (the memory engine over ``model.engine_branches()``,
  the expanded PASCAL loss weights, deep supervision included; SGD momentum 0.9, constant rate),
  with ``train.strategy`` ``recompute`` (the default) and ``naive`` (plain autograd inside the
  engine); for ASTMT also with every encoder stage recomputed (``recompute_stages`` all five,
  its least memory; the default keeps layer4's activations), timed and measured as
  ``mtlfast_recompute_all_stages``;
* the release-style step: the same weights in the plain-PyTorch construction of
  ``benchmarks/release_models.py``, written the way the release writes it (per-task loops, one
  module per ordered task pair in the distillation), with the same losses, weights and
  optimiser. MTI-Net / PAD-Net: one forward over all tasks, the final and deep-supervision losses
  (the latter upsampled to the input, as the release's loss does), backward, an SGD step. ASTMT:
  the release script's batch loop, T single-task passes each with its own forward, backward and
  SGD update. UberNet has no public release: its "release" is plain autograd over mtlfast's own
  model (forward over all tasks and scales, weighted sum, backward, SGD), no engine. The
  release-style side runs under ``use_backend("reference")``: pure-PyTorch ops, aten's resize
  (for UberNet also the reference skip_fusion, which materialises each layer's resized map) and
  the releases' ``torch.norm`` over channels in the normals loss (``mtlfast.ops.channel_norm``);
* inference: an eval-mode forward under ``torch.no_grad`` (ASTMT: mtlfast's inference
  ``forward_all``, one task pass after the other, against the release's T single-task forwards).

mtlfast's trainer takes the ``train.memory_format`` of the model's shipped PASCAL config (the
trainer's default, ``auto``, for every model now): before anything is timed (and after the two
sides' eval outputs are compared on the same weights) its layout trial runs to its end on the
benchmark's batch (:func:`settle_layout`: eight training steps alternating NCHW and
channels-last), and its other trainers and its inference take the layout it chose; the JSON
records the choice (``memory_format_mtlfast``) and the trial's step times. The release-style
side stays NCHW, as the releases are.

Time: ``--rounds`` (3) rounds of one step per side, the sides alternating
(``bench_trainer._alternate``), after one untimed step each; ``--time-naive`` also times the naive
strategy (its memory is always measured). Peak memory: ``mtlfast.profiling.memory("cpu")`` around one step
(after a warm-up step, so the optimiser's momentum is already allocated), in runs other than the
timed ones (the profiler it replays slows the block). A torch.profiler run of mtlfast's step
records the top ops by self CPU time and each top-level module's forward time. Results are
written after each model, so a run cut short keeps the models it finished. The machine's other
load (``bench_trainer._cpu_load``) and its busiest other processes are recorded.

The sides share one process, hence one malloc: the first trainer built sets glibc to keep freed
memory (``train.keep_freed_memory``, the trainer's default on the CPU), and the release-style side
then gets that too, which spares it the page faults that its authors' process pays for every
tensor of 32 MiB or more (``benchmarks/malloc_step.py`` measures each side in its own process,
as shipped and as released).

UberNet runs its default VGG-16 (width 1, scales 1, 0.75, 0.5) unless ``--ubernet-backbone`` /
``--ubernet-width`` say otherwise.

    python -m benchmarks.bench_models --out benchmarks/results/cpu-epyc-2core/bench_models.json
    python -m benchmarks.bench_models --quick          # 64x64, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn import functional as F

import mtlfast
from benchmarks import malloc_env
from benchmarks.bench_trainer import _alternate, _cpu_load
from benchmarks.release_models import RELEASE_TASKS, ReleaseMTINet, ReleaseNet, ReleasePADNet
from mtlfast.backbones import HRNet
from mtlfast.models import ASTMT, MTINet, PADNet, load_release_checkpoint, release_options
from mtlfast.models import create as create_model
from mtlfast.models.release_mtinet import RELEASE_TASK_NAMES as MTI_RELEASE_NAMES
from mtlfast.models.release_mtinet import load_release_checkpoint as load_mtinet_release
from mtlfast.ops import use_backend
from mtlfast.train import Trainer, load_config
from mtlfast.train.config import TrainConfig

PASCAL_TASKS = ["semseg", "parts", "saliency", "normals", "edge"]
PASCAL_OUT = {"semseg": 21, "parts": 7, "saliency": 1, "normals": 3, "edge": 1}
MODELS = ("mtinet", "padnet", "astmt", "ubernet")
MIB = 2.0**20
TARGETS = {
    "step_time_ratio_at_most": 1 / 1.25,
    "train_peak_ratio_at_most": 0.8,
    "train_peak_recompute_ratio_at_most": 0.6,
    "inference_time_ratio_at_most": 1.0,
    "inference_peak_ratio_at_most": 1.0,
}


# ---- inputs --------------------------------------------------------------------------------------


def make_batch(n: int, size: int, seed: int = 0) -> dict:
    """A PASCAL-shaped batch: image, the five tasks' labels (with ignored pixels), all labelled."""
    g = torch.Generator().manual_seed(seed)
    h = w = size
    semseg = torch.randint(0, PASCAL_OUT["semseg"], (n, h, w), generator=g)
    parts = torch.randint(0, PASCAL_OUT["parts"], (n, h, w), generator=g)
    semseg[:, :, : w // 16] = 255
    parts[:, : h // 16] = 255
    normals = F.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    return {
        "image": torch.randn(n, 3, h, w, generator=g),
        "semseg": semseg,
        "parts": parts,
        "saliency": (torch.rand(n, 1, h, w, generator=g) > 0.7).float(),
        "normals": normals,
        "edge": (torch.rand(n, 1, h, w, generator=g) > 0.95).float(),
        "labeled": {t: torch.ones(n, dtype=torch.bool) for t in PASCAL_TASKS},
    }


# the model's shipped PASCAL config, whose train.memory_format the trainer uses (UberNet has none)
SHIPPED_CONFIG = {"mtinet": "mtinet_pascal", "padnet": "padnet_pascal", "astmt": "astmt_pascal"}


def shipped_memory_format(name: str) -> str:
    """``train.memory_format`` of ``name``'s shipped config (the trainer's default, "auto",
    without one)."""
    config = SHIPPED_CONFIG.get(name)
    return load_config(config).train.memory_format if config else TrainConfig.memory_format


def settle_layout(trainer: Trainer, batch: dict) -> str:
    """Runs ``trainer``'s ``train.memory_format: auto`` trial to its end on ``batch`` (eight
    training steps, untimed here; none for a fixed layout) and returns the layout its steps
    use from then on: timings taken after it are the run's steady state."""
    while trainer._layout_trial is not False:
        trainer.train_step(batch)
    return "channels_last" if trainer.memory_format == torch.channels_last else "contiguous"


def make_trainer(
    model,
    strategy: str,
    threads: int,
    lr: float,
    precision: str = "fp32",
    memory_format: str = "contiguous",
    conv_algorithm: str = "auto",
    keep_freed_memory: bool = True,
) -> Trainer:
    """The trainer on ``model`` as a config would build it: PASCAL loss weights, SGD momentum 0.9
    (and the trainer's defaults, ``train.conv_algorithm`` "auto" and ``train.keep_freed_memory``
    among them)."""
    config = load_config(
        "mtinet_pascal",
        [
            "train.progress=false",
            f"train.threads={threads}",
            f"train.strategy={strategy}",
            f"train.precision={precision}",
            f"train.memory_format={memory_format}",
            f"train.conv_algorithm={conv_algorithm}",
            f"train.keep_freed_memory={str(keep_freed_memory).lower()}",
            "optim.name=sgd",
            f"optim.lr={lr}",
            "optim.momentum=0.9",
            "optim.weight_decay=0.0001",
            "schedule.kind=constant",
            "loss.weights=pascal",
        ],
    )
    return Trainer(config, model=model, datasets=((), ()))


# ---- the release-style sides -----------------------------------------------------------------------


class ReleaseSide:
    """A release-style network with its step and inference, over mtlfast's task names."""

    def __init__(self, net, release_names, kind, loss_fns, weights, lr):
        self.net, self.names, self.kind = net, release_names, kind  # names: ours -> release
        self.loss_fns, self.weights = loss_fns, weights
        self.optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def _loss(self, t, prediction, target):
        size = target.shape[-2:]
        if prediction.shape[-2:] != size:  # the release's loss upsamples deep supervision
            prediction = F.interpolate(prediction, size, mode="bilinear")
        return self.weights[t] * self.loss_fns[t](prediction, target)

    def step(self, batch):
        # aten's own kernels where a module is shared with mtlfast (the HRNet backbone's resizes)
        with use_backend("reference"):
            self._step(batch)

    def _step(self, batch):
        net, x = self.net.train(), batch["image"]
        if self.kind == "astmt":  # the release's batch loop: one update per task
            for t, r in self.names.items():
                self.optimizer.zero_grad()
                loss = self._loss(t, net(x, r), batch[t])
                loss.backward()
                self.optimizer.step()
            return
        self.optimizer.zero_grad()
        out = net(x)
        total = 0.0
        for t, r in self.names.items():
            total = total + self._loss(t, out[r], batch[t])
            if self.kind == "mtinet":
                for s in range(4):
                    total = total + self._loss(
                        t, out["deep_supervision"][f"scale_{s}"][r], batch[t]
                    )
            elif self.kind == "padnet":
                total = total + self._loss(t, out[f"initial_{r}"], batch[t])
            else:  # plain autograd over mtlfast's model: every expanded key of the task
                for k in self.net.expand({t: None}):
                    if k != t:
                        total = total + self._loss(t, out[k], batch[t])
        total.backward()
        self.optimizer.step()

    def infer(self, batch):
        with torch.no_grad(), use_backend("reference"):
            net = self.net.eval()
            if self.kind == "astmt":
                out = {t: net(batch["image"], r) for t, r in self.names.items()}
            else:
                full = net(batch["image"])
                out = {t: full[r] for t, r in self.names.items()}
        self.net.train()
        return out


def build(name: str, args) -> tuple[torch.nn.Module, torch.nn.Module, str, dict, str]:
    """(mtlfast model, release-style network, kind, our -> release task names, note)."""
    torch.manual_seed(0)
    if name in ("mtinet", "padnet"):
        names = {t: MTI_RELEASE_NAMES.get(t, t) for t in PASCAL_TASKS}
        out = {names[t]: c for t, c in PASCAL_OUT.items()}
        backbone = HRNet()
        if name == "mtinet":
            release = ReleaseMTINet(list(names.values()), backbone, backbone.channels, out)
            ours = MTINet(PASCAL_TASKS, dataset="pascal")
        else:
            release = ReleasePADNet(list(names.values()), backbone, backbone.channels, 256, out)
            ours = PADNet(PASCAL_TASKS, dataset="pascal")
        ours = load_mtinet_release(ours, release.state_dict())
        note = (
            "release-style: the MTI-Net release's construction, its weights loaded into mtlfast's"
        )
        return ours, release, name, names, note
    if name == "astmt":
        release = ReleaseNet(RELEASE_TASKS, adapt=True, dscr=False)
        state = release.state_dict()
        ours = ASTMT(**release_options(state))
        load_release_checkpoint(ours, state)
        ours_to_release = {"parts": "human_parts", "saliency": "sal"}
        names = {t: ours_to_release.get(t, t) for t in PASCAL_TASKS}
        note = (
            "release-style: ASTMT release's SE-ResNet-26 (adapters, task BN/SE), per-task updates"
        )
        return ours, release, "astmt", names, note
    options = {"dataset": "pascal"}
    if args.ubernet_width != 1.0:
        options["width"] = args.ubernet_width
    ours = create_model("ubernet", PASCAL_TASKS, backbone=args.ubernet_backbone, **options)
    release = copy.deepcopy(ours)
    note = (
        "UberNet has no public release: the other side is plain autograd over the same mtlfast "
        f"model (backbone {args.ubernet_backbone}, width {args.ubernet_width}), no engine, "
        "reference (pure PyTorch) ops"
    )
    return ours, release, "ubernet", {t: t for t in PASCAL_TASKS}, note


# ---- measurement ---------------------------------------------------------------------------------


def _peak_mib(fn, warm_up: bool = False) -> float:
    if warm_up:  # one-time allocations (momentum buffers) stay out of the figure
        fn()
    gc.collect()
    with mtlfast.profiling.memory("cpu") as m:
        fn()
    gc.collect()
    return m.peak_extra_bytes / MIB


def _infer_ours(model, batch):
    with torch.no_grad():
        out = model.eval()(batch["image"])
    model.train()
    return out


def _profile(trainer: Trainer, batch, depth: int = 2, top: int = 15) -> dict:
    """One trainer step under torch.profiler: top ops by self CPU time, forward time per module."""
    handles, stack = [], []
    for mod_name, module in trainer.model.named_modules():
        if not mod_name or mod_name.count(".") >= depth:
            continue

        def pre(_m, _inputs, _name=mod_name):
            rf = torch.profiler.record_function(f"module::{_name}")
            rf.__enter__()
            stack.append(rf)

        def post(_m, _inputs, _output):
            stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            trainer.train_step(batch)
            wall = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    events = prof.key_averages()
    ops = [e for e in events if not e.key.startswith("module::")]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops) or 1.0
    modules = [e for e in events if e.key.startswith("module::")]
    modules.sort(key=lambda e: e.cpu_time_total, reverse=True)
    return {
        "profiled_step_s": wall,
        "top_ops_by_self_cpu": [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "self_cpu_share": e.self_cpu_time_total / total_self,
                "cpu_total_ms": e.cpu_time_total / 1e3,
                "calls": e.count,
            }
            for e in ops[:top]
        ],
        "forward_ms_per_module": [
            {
                "module": e.key[len("module::") :],
                "cpu_total_ms": e.cpu_time_total / 1e3,
                "calls": e.count,
            }
            for e in modules
        ],
        "note": (
            "module times are forward only (recomputed segments included), inclusive of "
            "submodules; backward time is in the autograd ops of the top-op table"
        ),
    }


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[t] - b[t]).abs().max()) for t in PASCAL_TASKS)


def _in_layout(batch: dict, trainer: Trainer) -> dict:
    """``batch`` with its images in the layout of ``trainer``'s model (as its evaluation feeds them)."""
    return {**batch, "image": batch["image"].contiguous(memory_format=trainer.memory_format)}


def measure(name: str, args, batch) -> dict:
    ours, release, kind, names, note = build(name, args)
    configured = shipped_memory_format(name)
    naive_model = copy.deepcopy(ours)
    trainer = make_trainer(ours, "recompute", args.threads, args.lr, args.precision, configured)
    side = ReleaseSide(release, names, kind, trainer.loss_fns, trainer.weights, args.lr)
    params = sum(p.numel() for p in ours.parameters())
    release_params = sum(p.numel() for p in release.parameters())
    # same network, same weights: before the layout trial's steps train mtlfast's copy
    diff = _max_diff(_infer_ours(ours, _in_layout(batch, trainer)), side.infer(batch))
    fmt = settle_layout(trainer, batch)  # "auto": the layout the trainer's trial chose
    naive = make_trainer(naive_model, "naive", args.threads, args.lr, args.precision, fmt)
    # mtlfast's inference gets its images as the trainer's evaluation feeds them (its training
    # step converts them itself); the release-style side always gets the plain batch
    ours_batch = _in_layout(batch, trainer)

    least = None  # ASTMT: every encoder stage recomputed (its default recomputes the stem, layer1)
    if kind == "astmt":
        lean = copy.deepcopy(ours)
        lean.recompute_stages = len(lean.backbone.stages())
        least = make_trainer(lean, "recompute", args.threads, args.lr, args.precision, fmt)

    load_before = _cpu_load()
    fns = {"mtlfast": lambda: trainer.train_step(batch), "release": lambda: side.step(batch)}
    if args.time_naive:
        fns["mtlfast_naive"] = lambda: naive.train_step(batch)
    if least is not None:
        fns["mtlfast_recompute_all_stages"] = lambda: least.train_step(batch)
    step_times = _alternate(fns, args.rounds, 1)  # one untimed step each first
    print(f"[{name}] steps timed: {statistics.median(step_times['mtlfast']):.1f} s", flush=True)
    infer_times = _alternate(
        {"mtlfast": lambda: _infer_ours(ours, ours_batch), "release": lambda: side.infer(batch)},
        args.rounds,
        1,
    )
    load_after = _cpu_load()

    peaks = {  # both timed sides have stepped already: their momentum is allocated
        "train_recompute": _peak_mib(lambda: trainer.train_step(batch)),
        "train_naive": _peak_mib(lambda: naive.train_step(batch), warm_up=not args.time_naive),
        **(
            {"train_recompute_all_stages": _peak_mib(lambda: least.train_step(batch))}
            if least is not None
            else {}
        ),
        "train_release": _peak_mib(lambda: side.step(batch)),
        "infer_mtlfast": _peak_mib(lambda: _infer_ours(ours, ours_batch)),
        "infer_release": _peak_mib(lambda: side.infer(batch)),
    }
    print(f"[{name}] memory measured", flush=True)
    profile = _profile(trainer, batch) if not args.no_profile else None

    def med(xs):
        return statistics.median(xs)

    step_ratio = [a / b for a, b in zip(step_times["mtlfast"], step_times["release"])]
    naive_ratio = [
        a / b for a, b in zip(step_times.get("mtlfast_naive", []), step_times["release"])
    ]
    least_ratio = [
        a / b
        for a, b in zip(step_times.get("mtlfast_recompute_all_stages", []), step_times["release"])
    ]
    infer_ratio = [a / b for a, b in zip(infer_times["mtlfast"], infer_times["release"])]
    least_peak = peaks.get("train_recompute_all_stages", peaks["train_recompute"])
    ratios = {
        "step_time": med(step_ratio),
        "step_time_naive": med(naive_ratio) if naive_ratio else None,
        "step_time_recompute_all_stages": med(least_ratio) if least_ratio else None,
        "step_time_rounds_min": min(step_ratio),
        "step_time_rounds_max": max(step_ratio),
        "release_speedup": 1 / med(step_ratio),
        "train_peak_recompute": peaks["train_recompute"] / peaks["train_release"],
        # the least memory the recompute strategy reaches (ASTMT: recompute_stages all stages)
        "train_peak_recompute_least": least_peak / peaks["train_release"],
        "train_peak_naive": peaks["train_naive"] / peaks["train_release"],
        "inference_time": med(infer_ratio),
        "inference_peak": peaks["infer_mtlfast"] / peaks["infer_release"],
    }
    return {
        "note": note,
        "parameters": params,
        "release_parameters": release_params,
        "memory_format_mtlfast": fmt,
        "memory_format_config": configured,
        "memory_format_trial_s": trainer.layout_times,
        "max_abs_diff_eval_outputs": diff,
        "step_s": {k: v for k, v in step_times.items()},
        "step_s_median": {k: med(v) for k, v in step_times.items()},
        "step_s_spread": {k: [min(v), max(v)] for k, v in step_times.items()},
        "inference_s": infer_times,
        "inference_s_median": {k: med(v) for k, v in infer_times.items()},
        "peak_mib": peaks,
        "ratios_mtlfast_over_release": ratios,
        "meets": {
            "step_time": ratios["step_time"] <= TARGETS["step_time_ratio_at_most"],
            "train_peak": ratios["train_peak_recompute"] <= TARGETS["train_peak_ratio_at_most"],
            "train_peak_recompute": ratios["train_peak_recompute_least"]
            <= TARGETS["train_peak_recompute_ratio_at_most"],
            "inference_time": ratios["inference_time"] <= TARGETS["inference_time_ratio_at_most"],
            "inference_peak": ratios["inference_peak"] <= TARGETS["inference_peak_ratio_at_most"],
        },
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": load_after,
        "profile_mtlfast_step": profile,
    }


def _git_commit() -> str | None:
    """The repository's HEAD, with "+dirty" when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _other_processes() -> list[str]:
    """The machine's busiest processes other than this one (``ps``), and the load average."""
    try:
        ps = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,comm,args", "--sort=-pcpu"],
            capture_output=True,
            check=False,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        ps = []
    mine = str(os.getpid())
    rows = [r[:160] for r in ps[1:] if r.split()[0] != mine and float(r.split()[1]) >= 1.0]
    with open("/proc/loadavg") as f:
        return [f"loadavg {f.read().strip()}"] + rows[:8]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of one step per side")
    p.add_argument("--time-naive", action="store_true", help="also time the naive strategy")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ubernet-backbone", default="vgg16")
    p.add_argument("--ubernet-width", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="64x64, 1 round: a smoke test")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="mtlfast's train.precision (the release-style side stays fp32); inference stays fp32",
    )
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 64, 1
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "precision_mtlfast": args.precision,
        "rounds": args.rounds,
        "lr": args.lr,
        "optimiser": "SGD momentum 0.9, weight decay 1e-4, constant rate, both sides",
        "losses": "mtlfast.losses.for_task, PASCAL weights (deep supervision alike), both sides",
        "targets": TARGETS,
        "ratio_meaning": "mtlfast / release-style: below 1 is faster or smaller for mtlfast",
        "mtlfast_commit": _git_commit(),
        "malloc_env": malloc_env.current(),
        "malloc": "glibc keeps freed memory in this process from the first trainer built on "
        "(train.keep_freed_memory), for both sides",
        "other_processes_at_start": _other_processes(),
        "models": {},
    }
    start = time.perf_counter()
    for name in args.models:
        result["models"][name] = measure(name, args, batch)
        if args.out:  # what is done so far survives a timeout
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        r = result["models"][name]["ratios_mtlfast_over_release"]
        print(
            f"[{name}] step {r['step_time']:.2f}x, "
            f"train peak recompute {r['train_peak_recompute']:.2f}x naive {r['train_peak_naive']:.2f}x, "
            f"inference {r['inference_time']:.2f}x time {r['inference_peak']:.2f}x memory",
            flush=True,
        )
    result["other_processes_at_end"] = _other_processes()
    result["wall_s"] = time.perf_counter() - start
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
