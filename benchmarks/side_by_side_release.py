"""The authors' own MTI-Net, PAD-Net and ASTMT code run side by side with the release-style
constructions of ``benchmarks/release_models.py`` and with mtlfast, on one CPU, as JSON.

``bench_models.py`` measures mtlfast against plain-PyTorch rebuilds of the releases. This checks
those rebuilds against the releases themselves: it imports the authors' modules at run time from
a user's checkout (``--release-root``, once per repository; none of their code is in mtlfast),
builds their networks on CPU without pretrained weights, and

1. equivalence: gives the authors' network random batch-norm affine parameters, running
   statistics calibrated on the batch (one train-mode pass, cumulative average) and random
   weights where the release initialises to zero (ASTMT's adapters), loads its state dict into
   the release-style construction (``load_state_dict``, strict) and into mtlfast's model (the
   converters ``mtlfast.models.release_mtinet.load_release_checkpoint`` and, for ASTMT,
   ``ASTMT(**release_options(state))`` + ``load_release_checkpoint``), and compares the eval-mode
   outputs of all five tasks (max abs difference);
2. time, in one process, in alternating rounds (``bench_trainer._alternate``, one untimed step
   each first), from the same weights:

   * ``mtlfast``: ``Trainer.train_step`` (``bench_models.make_trainer``: the memory engine,
     strategy ``recompute``, the PASCAL loss weights, SGD momentum 0.9, weight decay 1e-4);
   * ``release_style``: ``bench_models.ReleaseSide`` over the release-style construction (its
     step: one forward, mtlfast's loss functions and weights on the final and deep-supervision
     outputs, backward, SGD; ASTMT: T single-task forward/backward/SGD updates);
   * ``authors``: the same ``ReleaseSide`` step over the authors' network: only the
     construction differs from ``release_style``;
   * ``authors_own_loop``: the authors' network with their own losses and loop: MTI-Net /
     PAD-Net ``losses/loss_functions.py`` + ``MTINetLoss`` / ``PADNetLoss``
     (``losses/loss_schemes.py``) with the configs' weights, ``zero_grad``, backward,
     ``step`` as in ``train/train_utils.py:train_vanilla`` (no metric meters); ASTMT
     ``fblib/layers/loss.py`` criteria, ``compute_losses`` and, per task, ``optimizer.step``
     with ``make_closure`` (``fblib/util/optimizer_mtl/select_used_modules.py``) over the
     parameter groups of ``get_lr_params``, input ``requires_grad_()``, as
     ``experiments/dense_predict/pascal_resnet/main.py``. The optimiser is SGD momentum 0.9,
     weight decay 1e-4 everywhere (the MTI-Net configs use Adam; ASTMT's uses this SGD);

   then the eval-mode forward under ``no_grad`` of ``mtlfast``, ``release_style`` and
   ``authors`` (ASTMT: mtlfast's ``forward_all`` against T single-task forwards);
3. peak memory of each step and inference (``bench_models._peak_mib``: torch's CPU allocations,
   after a warm-up step), in runs other than the timed ones.

All sides share one process and so one malloc, which the first trainer built sets to keep freed
memory (``train.keep_freed_memory``): the authors' sides are spared the page faults that their
own scripts' processes pay (``benchmarks/malloc_step.py`` measures that apart).

Configuration as ``bench_models``: PASCAL's five tasks (semseg 21, human_parts 7, sal 1,
normals 3, edge 1), HRNet-18 for MTI-Net and PAD-Net (PAD-Net's 256-channel fused HRNet), and
ASTMT's PASCAL network: SE-ResNet-26, output stride 16, decoder width 64, per-task SE in encoder
and decoder, adapters, per-task batch norm (the script's defaults), without the gradient
discriminator (``dscr_type=None``; the script's default ``fconv`` adds a double-backward per
task; bench_models' release-style ASTMT has none either).

Shims, only where the module is missing: ``numpy.int`` (the alias of ``int`` numpy 1.24
removed; ``seg_hrnet.py`` calls it), ``termcolor`` (imported by ``seg_hrnet.py``),
``torchvision.models.utils`` (imported by ``models/resnet.py`` for a download helper, never
called) and ``fblib.util.mypath`` (imported by ``se_resnet.py``; a user creates it). The
authors' code is otherwise imported unchanged; nothing calls ``.cuda()``.

    git clone https://github.com/SimonVandenhende/Multi-Task-Learning-PyTorch /tmp/releases/mtl
    git clone https://github.com/facebookresearch/astmt /tmp/releases/astmt
    OMP_NUM_THREADS=2 python -m benchmarks.side_by_side_release \\
        --release-root /tmp/releases/mtl --release-root /tmp/releases/astmt
    python -m benchmarks.side_by_side_release --release-root ... --quick --out /tmp/x.json  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks import malloc_env
from benchmarks.bench_models import (
    PASCAL_OUT,
    PASCAL_TASKS,
    ReleaseSide,
    _git_commit,
    _in_layout,
    _infer_ours,
    _other_processes,
    _peak_mib,
    make_batch,
    make_trainer,
    settle_layout,
    shipped_memory_format,
)
from benchmarks.bench_trainer import _alternate, _cpu_load
from benchmarks.release_models import RELEASE_TASKS, ReleaseMTINet, ReleaseNet, ReleasePADNet
from mtlfast.backbones import HRNet
from mtlfast.models import ASTMT, MTINet, PADNet, load_release_checkpoint, release_options
from mtlfast.models.release_mtinet import load_release_checkpoint as load_mtinet_release

MODELS = ("mtinet", "padnet", "astmt")
DEFAULT_OUT = Path("benchmarks/results/cpu-epyc-2core/side_by_side_release.json")
#: mtlfast task -> the releases' name (both releases spell them alike)
RELEASE_NAME = {"parts": "human_parts", "saliency": "sal"}
HRNET18_CHANNELS = [18, 36, 72, 144]
ASTMT_ORDER = list(RELEASE_TASKS)  # the ASTMT script's task order: edge, semseg, ...


# ---- the authors' code, from the user's checkout --------------------------------------------------


class _Attr(dict):
    """The attribute access of the releases' EasyDict configs (``p.TASKS.NAMES``, ``p['x']``)."""

    __getattr__ = dict.__getitem__


def _ensure_module(name: str, **attrs) -> None:
    """Registers a stand-in module ``name`` (and its parents) unless the real one imports."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            sys.modules[sub] = types.ModuleType(sub)
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[sub])
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def _no_download(*_args, **_kwargs):
    raise RuntimeError("side_by_side_release: no pretrained weights are downloaded")


class _NoPaths:
    """``fblib.util.mypath.Path``: every directory a user would fill in, here unset."""

    @staticmethod
    def db_root_dir(database=""):
        return "/nonexistent"

    save_root_dir = exp_dir = models_dir = seism_root_dir = staticmethod(lambda: "/nonexistent")


def find_roots(roots: list[Path]) -> dict[str, Path]:
    """``{"mtl": ..., "astmt": ...}`` from the checkouts given, by their files."""
    found = {}
    for root in roots:
        root = root.resolve()
        if (root / "models" / "mti_net.py").is_file():
            found["mtl"] = root
        elif (root / "fblib" / "networks" / "deeplab_multi_task").is_dir():
            found["astmt"] = root
        else:
            raise SystemExit(f"--release-root {root}: neither the MTI-Net nor the ASTMT release")
    return found


def _import_from(root: Path, *names: str) -> list[types.ModuleType]:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import numpy

    if "int" not in vars(numpy):  # np.int, removed in numpy 1.24: seg_hrnet.py calls it
        numpy.int = int
    _ensure_module("termcolor", colored=lambda text, *a, **k: text)
    _ensure_module("torchvision.models.utils", load_state_dict_from_url=_no_download)
    if names[0].startswith("fblib"):
        _ensure_module("fblib.util.mypath", Path=_NoPaths)
    with contextlib.redirect_stdout(io.StringIO()):  # their constructors print a lot
        return [importlib.import_module(n) for n in names]


def _mtl_config(root: Path, model: str) -> _Attr:
    """The parts of the MTI-Net release's ``utils/config.py`` output its models and losses read,
    for ``configs/pascal/hrnet18/<model>.yml`` (five tasks, its loss weights)."""
    import yaml

    names = [RELEASE_NAME.get(t, t) for t in PASCAL_TASKS]  # config.py's order
    out = {RELEASE_NAME.get(t, t): c for t, c in PASCAL_OUT.items()}
    tasks = _Attr(NAMES=names, NUM_OUTPUT=out)
    yml = root / "configs" / "pascal" / "hrnet18" / f"{model}.yml"
    with open(yml) as f:
        cfg = yaml.safe_load(f)
    return _Attr(
        TASKS=tasks,
        AUXILARY_TASKS=tasks,
        ALL_TASKS=tasks,
        loss_weights=cfg["loss_kwargs"]["loss_weights"],
        edge_w=cfg["task_dictionary"]["edge_w"],
        normloss=1,  # config.py: "Hard-coded L1 loss for normals"
    )


def build_authors_mtl(root: Path, model: str):
    """The authors' MTI-Net / PAD-Net (HRNet-18, not pretrained) and their loss for it."""
    seg_hrnet, mti_net, padnet, lf, ls = _import_from(
        root,
        "models.seg_hrnet",
        "models.mti_net",
        "models.padnet",
        "losses.loss_functions",
        "losses.loss_schemes",
    )
    p = _mtl_config(root, "mti_net" if model == "mtinet" else "pad_net")
    cwd = os.getcwd()
    os.chdir(root)  # hrnet_w18 reads models/model_info/hrnet_w18.yml relative to the cwd
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            backbone = seg_hrnet.hrnet_w18(pretrained=False)
    finally:
        os.chdir(cwd)
    channels = HRNET18_CHANNELS
    with contextlib.redirect_stdout(io.StringIO()):
        if model == "mtinet":
            heads = nn.ModuleDict(
                {
                    t: seg_hrnet.HighResolutionHead(channels, p.TASKS.NUM_OUTPUT[t])
                    for t in p.TASKS.NAMES
                }
            )
            net = mti_net.MTINet(p, backbone, channels, heads)
        else:  # common_config.get_backbone with fuse_hrnet
            backbone = nn.Sequential(backbone, seg_hrnet.HighResolutionFuse(channels, 256))
            net = padnet.PADNet(p, backbone, sum(channels))

        def loss(t):  # common_config.get_loss
            if t == "edge":
                return lf.BalancedCrossEntropyLoss(size_average=True, pos_weight=p.edge_w)
            if t in ("semseg", "human_parts"):
                return lf.SoftMaxwithLoss()
            if t == "normals":
                return lf.NormalsLoss(normalize=True, size_average=True, norm=p.normloss)
            return lf.BalancedCrossEntropyLoss(size_average=True)  # sal

        loss_ft = nn.ModuleDict({t: loss(t) for t in p.TASKS.NAMES})
        scheme = ls.MTINetLoss if model == "mtinet" else ls.PADNetLoss
        criterion = scheme(p.TASKS.NAMES, p.AUXILARY_TASKS.NAMES, loss_ft, p.loss_weights)
    return net, criterion, p


def build_authors_astmt(root: Path):
    """The ASTMT script's PASCAL network (``config.get_net_resnet`` with its defaults, no
    discriminator, from scratch), its criteria, ``p`` and its modules."""
    net_mod, loss_mod, select = _import_from(
        root,
        "fblib.networks.deeplab_multi_task.deeplab_se_resnet_multitask",
        "fblib.layers.loss",
        "fblib.util.optimizer_mtl.select_used_modules",
    )
    p = _Attr(
        TASKS=_Attr(
            NAMES=ASTMT_ORDER,
            NUM_OUTPUT=dict(RELEASE_TASKS),
            LOSS_MULT={"edge": 50, "semseg": 1, "human_parts": 2, "normals": 10, "sal": 5},
        ),
        edge_w=0.95,
        normloss=1,
        lr_dec=1,
        lr_tsk=len(ASTMT_ORDER),  # config.py: lr_tsk < 0 -> number of tasks
    )
    with contextlib.redirect_stdout(io.StringIO()):
        net = net_mod.se_resnet26(
            tasks=ASTMT_ORDER,
            n_classes=p.TASKS.NUM_OUTPUT,
            pretrained="scratch",
            classifier="atrous-v3",
            output_stride=16,
            train_norm_layers=True,
            width_decoder=64,
            squeeze_enc=True,
            squeeze_dec=True,
            adapters=True,
            norm_per_task=True,
            dscr_type=None,
            dscr_d=2,
            dscr_k=1,
        )

        def crit(t):  # common_configs.get_loss
            if t == "edge":
                return loss_mod.BalancedCrossEntropyLoss(size_average=True, pos_weight=p.edge_w)
            if t in ("semseg", "human_parts"):
                return loss_mod.SoftMaxwithLoss()
            if t == "normals":
                return loss_mod.NormalsLoss(normalize=True, size_average=True, norm=p.normloss)
            return loss_mod.BalancedCrossEntropyLoss(size_average=True)

        criteria = {t: crit(t) for t in ASTMT_ORDER}
    return net, criteria, p, net_mod, select


class _FirstOutput(nn.Module):
    """The ASTMT release's ``forward(x, task)`` returns (prediction, features): the prediction."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, task):
        return self.net(x, task)[0]


# ---- the weights all three sides share -----------------------------------------------------------


@torch.no_grad()
def randomize_and_calibrate(net: nn.Module, x: torch.Tensor, tasks=None, seed: int = 1) -> None:
    """Random batch-norm affine parameters and zero-initialised weights (so that every tensor
    the converters map shows in the outputs), then running statistics from one train-mode pass
    over ``x`` (per task for ASTMT), so the eval outputs are of order one."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass(es)
        elif isinstance(m, nn.Conv2d) and not m.weight.any():
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (0.5 / fan_in) ** 0.5)
    net.train()
    for t in tasks or [None]:
        net(x) if t is None else net(x, t)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    net.eval()


def _max_diffs(a: dict, b: dict) -> dict:
    return {t: float((a[t] - b[t]).abs().max()) for t in PASCAL_TASKS}


# ---- the authors' own training loops --------------------------------------------------------------


def _mtl_targets(batch) -> dict:
    """The release's label layout: N x C x H x W floats, 255 where ignored."""
    return {
        "semseg": batch["semseg"][:, None].float(),
        "human_parts": batch["parts"][:, None].float(),
        "sal": batch["saliency"],
        "normals": batch["normals"],
        "edge": batch["edge"],
    }


class AuthorsMTLLoop:
    """``train_vanilla``'s step (without its metric meters): forward, the release's criterion,
    ``zero_grad``, backward, ``step``."""

    def __init__(self, net, criterion, lr):
        self.net, self.criterion = net, criterion
        self.optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(self, batch):
        self.net.train()
        targets = _mtl_targets(batch)
        loss = self.criterion(self.net(batch["image"]), targets)["total"]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class AuthorsASTMTLoop:
    """The ASTMT script's batch loop (``pascal_resnet/main.py``), without its logging: per
    task, a forward, ``compute_losses``, ``zero_grad`` and ``step(closure=make_closure(...))``."""

    def __init__(self, net, criteria, p, net_mod, select, lr):
        self.net, self.criteria, self.p, self.select = net, criteria, p, select
        tasks = p.TASKS.NAMES
        groups = [  # config.get_train_params, without a discriminator
            {"params": net_mod.get_lr_params(net, part="backbone", tasks=tasks), "lr": lr},
            {
                "params": net_mod.get_lr_params(net, part="decoder", tasks=tasks),
                "lr": lr * p.lr_dec,
            },
            {
                "params": net_mod.get_lr_params(net, part="task_specific", tasks=tasks),
                "lr": lr * p.lr_tsk,
            },
        ]
        self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(self, batch):
        net = self.net.train()
        inputs = batch["image"].clone().requires_grad_()
        targets = _mtl_targets(batch)
        for task in self.p.TASKS.NAMES:
            uniq = targets[task].unique()
            if len(uniq) == 1 and uniq[0] == 255:
                continue
            out, feats = net.forward(inputs, task=task)
            losses, *_ = net.compute_losses(
                {task: out}, {task: feats}, self.criteria, targets, 0.0, self.p
            )
            self.optimizer.zero_grad()
            self.optimizer.step(closure=self.select.make_closure(loss=losses[task], net=net))


# ---- one model -----------------------------------------------------------------------------------


def build(name: str, roots: dict, batch, lr: float):
    """(mtlfast model, release-style net, authors' net for ReleaseSide, the authors' own loop
    on a second instance of their network, our -> release task names, state dict)."""
    torch.manual_seed(0)
    names = {t: RELEASE_NAME.get(t, t) for t in PASCAL_TASKS}
    x = batch["image"]
    if name in ("mtinet", "padnet"):
        authors, _, _ = build_authors_mtl(roots["mtl"], name)
        randomize_and_calibrate(authors, x)
        state = authors.state_dict()
        out = {names[t]: c for t, c in PASCAL_OUT.items()}
        backbone = HRNet()
        if name == "mtinet":
            release = ReleaseMTINet(list(names.values()), backbone, backbone.channels, out)
            ours = MTINet(PASCAL_TASKS, dataset="pascal")
        else:
            release = ReleasePADNet(list(names.values()), backbone, backbone.channels, 256, out)
            ours = PADNet(PASCAL_TASKS, dataset="pascal")
        release.load_state_dict(state, strict=True)
        load_mtinet_release(ours, state)
        second, criterion, _ = build_authors_mtl(roots["mtl"], name)
        second.load_state_dict(state, strict=True)
        own = AuthorsMTLLoop(second, criterion, lr)
        side_net = authors
    else:
        authors, *_ = build_authors_astmt(roots["astmt"])
        randomize_and_calibrate(authors, x, tasks=ASTMT_ORDER)
        state = authors.state_dict()
        release = ReleaseNet(RELEASE_TASKS, adapt=True, dscr=False)
        release.load_state_dict(state, strict=True)
        ours = ASTMT(**release_options(state))
        load_release_checkpoint(ours, state)
        second, criteria, p, net_mod, select = build_authors_astmt(roots["astmt"])
        second.load_state_dict(state, strict=True)
        own = AuthorsASTMTLoop(second, criteria, p, net_mod, select, lr)
        side_net = _FirstOutput(authors)
    for net in (authors, second, release):
        net.train()
    return ours, release, side_net, own, names, state


def _spread(xs):
    return [min(xs), max(xs)]


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def measure(name: str, args, batch, roots) -> dict:
    loadavg_before = _loadavg()
    ours, release, authors, own, names, state = build(name, roots, batch, args.lr)
    kind = name
    configured = shipped_memory_format(name)  # the model's shipped config's train.memory_format
    trainer = make_trainer(ours, "recompute", args.threads, args.lr, memory_format=configured)
    # mtlfast's inference gets its images as the trainer's evaluation does
    ours_batch = _in_layout(batch, trainer)
    release_side = ReleaseSide(release, names, kind, trainer.loss_fns, trainer.weights, args.lr)
    authors_side = ReleaseSide(authors, names, kind, trainer.loss_fns, trainer.weights, args.lr)

    # equivalence, eval mode, before any training step
    out_authors = authors_side.infer(batch)
    out_release = release_side.infer(batch)
    out_ours = _infer_ours(ours, ours_batch)
    equivalence = {
        "mtlfast_vs_authors": _max_diffs(out_ours, out_authors),
        "release_style_vs_authors": _max_diffs(out_release, out_authors),
        "authors_output_max_abs": {t: float(out_authors[t].abs().max()) for t in PASCAL_TASKS},
        "state_dict_tensors": len(state),
    }
    print(f"[{name}] equivalence {json.dumps(equivalence)}", flush=True)
    fmt = settle_layout(trainer, batch)  # "auto": the trial's steps, before any timing
    ours_batch = _in_layout(batch, trainer)
    params = {
        "authors": sum(p.numel() for p in authors.parameters()),
        "release_style": sum(p.numel() for p in release.parameters()),
        "mtlfast": sum(p.numel() for p in ours.parameters()),
    }

    load_before = _cpu_load()
    fns = {
        "mtlfast": lambda: trainer.train_step(batch),
        "release_style": lambda: release_side.step(batch),
        "authors": lambda: authors_side.step(batch),
    }
    if not args.no_own_loop:
        fns["authors_own_loop"] = lambda: own.step(batch)
    step = _alternate(fns, args.rounds, 1)
    print(f"[{name}] steps: {json.dumps({k: statistics.median(v) for k, v in step.items()})}")
    infer = _alternate(
        {
            "mtlfast": lambda: _infer_ours(ours, ours_batch),
            "release_style": lambda: release_side.infer(batch),
            "authors": lambda: authors_side.infer(batch),
        },
        args.rounds,
        1,
    )
    load_after = _cpu_load()
    loadavg_after_timing = _loadavg()
    peaks = {f"train_{k}": _peak_mib(fn) for k, fn in fns.items()}  # all have stepped already
    peaks.update(
        {
            "infer_mtlfast": _peak_mib(lambda: _infer_ours(ours, ours_batch)),
            "infer_release_style": _peak_mib(lambda: release_side.infer(batch)),
            "infer_authors": _peak_mib(lambda: authors_side.infer(batch)),
        }
    )
    print(f"[{name}] peaks MiB: {json.dumps(peaks)}", flush=True)

    def ratio(times, a, b):
        return statistics.median([x / y for x, y in zip(times[a], times[b])])

    return {
        "memory_format_mtlfast": fmt,
        "memory_format_config": configured,
        "memory_format_trial_s": trainer.layout_times,
        "parameters": params,
        "equivalence_max_abs_diff_eval": equivalence,
        "step_s": step,
        "step_s_median": {k: statistics.median(v) for k, v in step.items()},
        "step_s_min_max": {k: _spread(v) for k, v in step.items()},
        "inference_s": infer,
        "inference_s_median": {k: statistics.median(v) for k, v in infer.items()},
        "inference_s_min_max": {k: _spread(v) for k, v in infer.items()},
        "peak_mib": peaks,
        "ratios": {
            "step_release_style_over_authors": ratio(step, "release_style", "authors"),
            "step_mtlfast_over_authors": ratio(step, "mtlfast", "authors"),
            "step_mtlfast_over_release_style": ratio(step, "mtlfast", "release_style"),
            "step_authors_own_loop_over_authors": (
                ratio(step, "authors_own_loop", "authors") if "authors_own_loop" in step else None
            ),
            "inference_release_style_over_authors": ratio(infer, "release_style", "authors"),
            "inference_mtlfast_over_authors": ratio(infer, "mtlfast", "authors"),
            "train_peak_release_style_over_authors": peaks["train_release_style"]
            / peaks["train_authors"],
            "train_peak_mtlfast_over_authors": peaks["train_mtlfast"] / peaks["train_authors"],
            "infer_peak_release_style_over_authors": peaks["infer_release_style"]
            / peaks["infer_authors"],
            "infer_peak_mtlfast_over_authors": peaks["infer_mtlfast"] / peaks["infer_authors"],
        },
        "other_cpu_load_before": load_before,
        "other_cpu_load_after": load_after,
        "loadavg_before": loadavg_before,
        "loadavg_after_timing": loadavg_after_timing,
        "loadavg_after": _loadavg(),
    }


def _release_commits(roots: dict) -> dict:
    out = {}
    for key, root in roots.items():
        try:
            out[key] = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out[key] = "unknown (not a git checkout)"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--release-root",
        type=Path,
        action="append",
        required=True,
        help="a checkout of an authors' repository (MTI-Net's or ASTMT's); once for each",
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-own-loop", action="store_true", help="skip the authors' own loop")
    p.add_argument("--release-commit", action="append", default=[], help="KEY=SHA, recorded")
    p.add_argument("--quick", action="store_true", help="64x64, 1 round: a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds = 64, 1
    roots = find_roots(args.release_root)
    need = {"mtinet": "mtl", "padnet": "mtl", "astmt": "astmt"}
    missing = sorted({need[m] for m in args.models} - set(roots))
    if missing:
        raise SystemExit(f"--release-root: no checkout of {missing} given")
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch, args.size)
    commits = _release_commits(roots)
    commits.update(dict(kv.split("=", 1) for kv in args.release_commit))
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "release_roots": {k: str(v) for k, v in roots.items()},
        "release_commits": commits,
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rounds": args.rounds,
        "lr": args.lr,
        "sides": {
            "mtlfast": "Trainer.train_step, strategy recompute (bench_models.make_trainer)",
            "release_style": "bench_models.ReleaseSide over benchmarks/release_models.py",
            "authors": "the same ReleaseSide step over the authors' network: mtlfast losses",
            "authors_own_loop": "the authors' network, their losses and loop, SGD 0.9",
        },
        "optimiser": "SGD momentum 0.9, weight decay 1e-4, every side",
        "mtlfast_commit": _git_commit(),
        "malloc_env": malloc_env.current(),
        "other_processes_at_start": _other_processes(),
        "models": {},
    }
    start = time.perf_counter()
    for name in args.models:
        result["models"][name] = measure(name, args, batch, roots)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # survives a later timeout
    result["other_processes_at_end"] = _other_processes()
    result["wall_s"] = time.perf_counter() - start
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
