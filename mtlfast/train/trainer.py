"""The trainer: a thin loop around one engine step, with evaluation, checkpoints and logs."""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .. import __version__
from .. import balancing as mtl_balancing
from .. import losses as mtl_losses
from .. import models as mtl_models
from ..engine import StepResult, multi_branch_step
from ..metrics import DEFAULT_METRIC, LOWER_IS_BETTER
from ..nn import use_fast_batch_norm, use_winograd
from ..ops import set_winograd_autotune, winograd_autotune_choices
from . import checkpoint as ckpt
from . import distributed as _distributed
from ._auxiliary import front_end_only
from ._layout import MIN_STEPS, NAMES, LayoutTrial, to_memory_format
from ._runtime import Runtime
from .config import Config, config_to_dict, load_config
from .data import batch_to, build_datasets, eval_loader, train_loader
from .evaluate import ConstantPredictor, evaluate, load_baselines, recalibrate_batch_norm
from .malloc import keep_freed_memory
from .optim import LRFactor, build_optimizer, build_scheduler
from .procedures import build_procedure
from .runlog import RunLog, draw_plots

__all__ = ["NonFiniteLossError", "Trainer", "build_model", "default_threads"]

_PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# "auto" starts contiguous; the first steps choose (_layout.py)
_MEMORY_FORMAT = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "auto": torch.contiguous_format,
}


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient (``train.nonfinite: raise``, or too many in a row)."""


def _busy_cores(interval: float = 0.25) -> float:
    """Cores other processes keep busy now: /proc/stat's busy time over ``interval`` seconds,
    less this process's; the 1-minute load average where /proc is missing (it lags a minute)."""

    def busy_ticks() -> int:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    try:
        ticks0, own0, t0 = busy_ticks(), time.process_time(), time.monotonic()
        time.sleep(interval)
        ticks1, own1, t1 = busy_ticks(), time.process_time(), time.monotonic()
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, ((ticks1 - ticks0) / hz - (own1 - own0)) / (t1 - t0))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def default_threads(num_workers: int = 0, load: float | None = None) -> int:
    """torch's intra-op threads for training on CPU: the cores that neither data workers nor
    other work on the machine keep busy, at least 1.

    ``load`` is the number of cores other work uses (default: measured over a quarter of a
    second at start, see :func:`_busy_cores`). Why: OpenMP threads spin at every barrier
    waiting for the slowest one, so a thread that shares its core with another process stalls
    every operation. The demo's MTI-Net step with another process busy on each core took
    2.1-2.7 s on 1 thread and 11-29 s on 2 (README, "CPU threads"); on an idle machine, 2
    threads are the faster.
    """
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    threads = max(1, cores - num_workers)
    idle = cores - (_busy_cores() if load is None else load)
    return max(1, min(threads, int(idle + 0.5)))


def build_model(config: Config) -> nn.Module:
    """``mtlfast.models.create`` for ``config.model`` on ``config.tasks`` (and
    ``config.loss.auxiliary``), with the output channels of ``config.data.dataset``."""
    options = dict(config.model.options)
    options.setdefault("dataset", config.data.dataset)  # the output channels of its data
    tasks = [*config.tasks, *config.loss.auxiliary]
    try:
        return mtl_models.create(
            config.model.name, tasks, backbone=config.model.backbone, **options
        )
    except TypeError as e:  # an option the model's constructor does not take
        raise ValueError(f"model.options: {e}") from None


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class _Best:
    score: float | None = None
    step: int | None = None
    results: dict | None = None


class Trainer:
    """Trains ``config.model`` on ``config.data`` with the memory engine, evaluating and
    checkpointing as ``config.train`` and ``config.eval`` say.

    ``train_step(batch) -> StepResult`` is one update: the engine's
    :func:`mtlfast.engine.multi_branch_step` over ``model.engine_branches()`` with the expanded
    targets, losses, label masks and weights (deep supervision included), then the optimiser and
    learning-rate schedule. ``fit()`` loops it to ``train.max_steps`` and returns the results
    (also saved as ``results.json``).

    The run directory holds ``config.yaml`` (the resolved config), ``checkpoints/`` (``step_<N>.pt``,
    the last ``train.keep_last`` kept, ``last.pt`` the newest and ``best.pt`` the best by
    ``eval.select``), ``log.csv``, ``tensorboard/``, ``plots/*.png`` and ``results.json``.

    Args:
        config: the run's :class:`Config` (``load_config`` reads one from YAML).
        run_dir: where everything is written; None writes nothing (tests, notebooks).
        model, datasets: replace what the config would build (datasets: (train, eval)).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | os.PathLike | None = None,
        *,
        model: nn.Module | None = None,
        datasets: tuple[Any, Any] | None = None,
    ) -> None:
        self.config = config
        tc = config.train
        self.runtime = Runtime(tc.progress)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if tc.device == "auto" else tc.device
        )
        self.device = _distributed.local_device(self.device)  # torchrun: this rank's GPU
        if tc.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                "train.precision: fp16 needs a CUDA device (its gradient scaler); use bf16 on CPU"
            )
        self.kept_freed_memory = False
        if self.device.type == "cpu":
            threads = tc.threads or _distributed.threads_per_rank(
                default_threads(config.data.num_workers)
            )
            torch.set_num_threads(threads)
            # no page faulted in afresh for every large tensor of every step (malloc.py)
            self.kept_freed_memory = tc.keep_freed_memory and keep_freed_memory()
            if tc.threads is None:
                self.runtime.print(
                    f"training on the CPU with {threads} thread(s): the idle cores "
                    "(set train.threads to choose)"
                )
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
        _seed_everything(config.seed)
        self.model = (model if model is not None else build_model(config)).to(self.device)
        # the layout of the 4-d weights, kept by the optimiser's state and every batch's images
        self.memory_format = _MEMORY_FORMAT[tc.memory_format]
        to_memory_format(self.model, self.memory_format)
        # "auto": the trial of the first steps, set up by the first train_step (a resumed run
        # knows its remaining steps only then); False once settled
        self._layout_trial: LayoutTrial | bool | None = (
            None if tc.memory_format == "auto" and not tc.deterministic else False
        )
        self.layout_times: dict[str, list[float]] | None = None
        use_winograd(self.model, tc.conv_algorithm != "direct")
        # "auto": the first step measures the Winograd shapes; said once, after it
        self._autotune_untold = tc.conv_algorithm == "auto" and not tc.deterministic
        if tc.conv_algorithm != "direct":  # process-wide, like cudnn.benchmark
            set_winograd_autotune(self._autotune_untold)
        use_fast_batch_norm(self.model)  # aten's to float rounding, faster on the CPU
        if tc.sync_bn and self.runtime.world_size > 1:
            self.model = _distributed.convert_sync_batchnorm(self.model)
        lacking = [a for a in ("tasks", "expand", "engine_branches") if not hasattr(self.model, a)]
        if lacking:
            raise TypeError(
                f"model: {type(self.model).__name__} lacks {lacking} of the mtlfast.models.MultiTaskModel "
                "protocol the trainer drives"
            )
        self.tasks = list(config.tasks)
        # front-end-only tasks: trained through deep supervision, never evaluated
        self.auxiliary = list(config.loss.auxiliary)
        missing = [t for t in self.tasks + self.auxiliary if t not in self.model.tasks]
        if missing:
            raise ValueError(
                f"tasks: the model does not predict {missing} (its tasks: {self.model.tasks})"
            )
        self.optimizer = build_optimizer(self.model, config.optim)
        # before the schedule: a procedure may add parameter groups (ASTMT's discriminator)
        self.procedure = build_procedure(config, self.model, self.optimizer)
        if self.procedure is not None and config.balancing.name != "fixed":
            raise ValueError(
                f"procedure {config.procedure.name!r} runs its own backward: it does not combine "
                f"with balancing.name {config.balancing.name!r}"
            )
        self.scheduler = build_scheduler(self.optimizer, config.schedule, tc.max_steps)
        self.autocast_dtype = _PRECISION[tc.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.loss_fns = {
            t: mtl_losses.for_task(t, **config.loss.options.get(t, {}))
            for t in self.tasks + self.auxiliary
        }
        unknown = set(config.loss.options) - set(self.tasks + self.auxiliary)
        if unknown:
            raise ValueError(f"loss.options: tasks {sorted(unknown)} are not in tasks {self.tasks}")
        self.weights = _loss_weights(config)
        if self.auxiliary:
            _check_auxiliary(self.model, self.auxiliary)
        self.balancer = _build_balancer(config).to(self.device)
        self.parallel = self._distributed_step()  # None on one process
        self.train_set, self.eval_set = datasets if datasets is not None else build_datasets(config)
        self.baselines = load_baselines(config.eval.baselines)
        if config.eval.select == "delta_m" and self.baselines is None:
            raise ValueError("eval.select: 'delta_m' needs eval.baselines (single-task results)")
        if self.baselines is not None:
            lacking = [t for t in self.tasks if t not in self.baselines]
            if lacking:
                raise ValueError(f"eval.baselines: no single-task result for tasks {lacking}")
        self._check_select()
        # the training state (all of it in the checkpoint)
        self.step = 0
        self.batches = 0  # training batches consumed: the data order's position
        self.best = _Best()
        self.history: list[dict] = []
        self.before: dict | None = None
        self.constant: dict | None = None
        self.nonfinite = {"skipped": 0, "consecutive": 0, "by_task": {}}
        self.train_time = 0.0
        self.log: RunLog | None = None
        self._resumed_from: int | None = None  # the checkpoint's step when resumed
        self._fit_start = time.perf_counter()

    def _distributed_step(self) -> _distributed.DistributedStep | None:
        """Data parallelism over the initialised process group (torchrun), None on one process."""
        if self.runtime.world_size == 1:
            return None
        procedure = getattr(self, "procedure", None)
        if procedure is not None and not getattr(procedure, "distributed", False):
            raise NotImplementedError(
                f"procedure {type(procedure).__name__} does not run on several processes yet "
                "(torchrun); train it on one"
            )
        extra = [p for m in procedure.modules() for p in m.parameters()] if procedure else []
        return _distributed.DistributedStep(
            self.model,
            list(self.loss_fns),
            strategy=self.config.train.strategy,
            balancer=self.balancer,
            extra_params=extra,  # ASTMT's discriminator: broadcast and averaged as the model
        )

    # ------------------------------------------------------------------------------ one step

    def _segments(self, trunk: Any) -> int | None:
        """The engine's trunk segments: ``train.segments``, else the model's ``engine_segments``
        (at most the trunk's modules), else None (the engine's ``round(sqrt(L))``)."""
        if self.config.train.segments is not None:
            return self.config.train.segments
        preferred = getattr(self.model, "engine_segments", None)
        if preferred is None:
            return None
        return max(1, min(int(preferred), len(trunk)))

    def _engine_inputs(self, batch: dict) -> tuple:
        model = self.model
        tasks = self.tasks + self.auxiliary
        targets = {t: batch[t] for t in tasks}
        labeled = {t: m for t, m in batch.get("labeled", {}).items() if t in tasks}
        weights = model.expand(self.weights)
        ds = self.config.loss.deep_supervision
        if ds != 1.0:
            weights = {k: (w if k in self.weights else w * ds) for k, w in weights.items()}
        inputs = (
            model.engine_branches(),
            model.expand(targets),
            model.expand(self.loss_fns),
            model.expand(labeled),
            weights,
        )
        if self.auxiliary:  # only the front end's (deep-supervision) predictions of them train
            inputs = front_end_only(inputs, self.auxiliary)
        return inputs

    def _formatted(self, batch: dict) -> dict:
        """``batch`` with its images in ``train.memory_format``: a new dict, the same tensor when
        the images already have that layout (always so for NCHW batches and "contiguous")."""
        image = batch.get("image")
        if isinstance(image, torch.Tensor) and image.dim() == 4:
            batch = {**batch, "image": image.contiguous(memory_format=self.memory_format)}
        return batch

    def train_step(self, batch: dict) -> StepResult:
        """One update on ``batch`` (a collated batch dict on any device): the engine's forward and
        backward, gradient clipping, the optimiser and schedule steps. A step whose loss or
        gradient is not finite is not applied (``train.nonfinite``): parameters, buffers and
        optimiser state stay as they were, and the event is counted with the tasks responsible.
        With ``train.memory_format: auto`` the first steps of the process (8 of them) alternate
        between the layouts and are timed; then the faster layout stays (:attr:`memory_format`).

        Returns the engine's :class:`mtlfast.engine.StepResult` (losses unweighted, total
        unscaled).
        """
        trial = self._layout_trial
        if trial is None:  # "auto" and the first step of this process
            left = self.config.train.max_steps - self.step
            trial = self._layout_trial = LayoutTrial(self.device) if left >= MIN_STEPS else False
        if not trial:
            return self._train_step(batch)
        self._set_memory_format(trial.next_format())
        trial.start()
        result = self._train_step(batch)
        if trial.stop():
            self._settle_layout(trial)
        return result

    def _set_memory_format(self, memory_format: torch.memory_format) -> None:
        if memory_format != self.memory_format:
            to_memory_format(self.model, memory_format, self.optimizer)
            self.memory_format = memory_format

    def _settle_layout(self, trial: LayoutTrial) -> None:
        """The trial is over: the layout every rank trains in from now on (rank 0's choice)."""
        if self.runtime.world_size > 1:
            flag = torch.tensor([float(trial.choice == torch.channels_last)], device=self.device)
            _distributed._broadcast([flag])
            trial.decide(torch.channels_last if flag.item() else torch.contiguous_format)
        self._set_memory_format(trial.choice)
        self.layout_times = trial.times
        self._layout_trial = False
        self.runtime.print(trial.summary())

    def _train_step(self, batch: dict) -> StepResult:
        tc = self.config.train
        batch = self._formatted(batch_to(batch, self.device))
        self.model.train()
        (trunk, heads), targets, loss_fns, labeled, weights = self._engine_inputs(batch)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        if (
            scale != 1.0
        ):  # fp16: the engine runs its own backward, so the scale rides on the weights
            weights = {k: w * scale for k, w in weights.items()}
        if self.parallel is not None:  # this rank's share of the global batch's loss
            heads, loss_fns, labeled, weights = self.parallel.before(
                heads,
                batch["image"],
                targets,
                loss_fns,
                labeled,
                weights,
                # a procedure with several backward passes per step arms the sync per pass
                arm=not getattr(self.procedure, "syncs_per_pass", False),
            )
        buffers = [
            b for b in self.model.buffers() if b.is_floating_point() or b.dtype == torch.long
        ]
        saved = [
            b.clone() for b in buffers
        ]  # batch-norm statistics, restored if the step is not applied
        cast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with cast:
            if self.procedure is not None:  # a paper's own step (config.procedure)
                result = self.procedure.train_backward(self, batch)
            else:
                result = multi_branch_step(
                    trunk,
                    heads,
                    batch["image"],
                    targets,
                    loss_fns,
                    labeled=labeled,
                    weights=weights,
                    strategy=tc.strategy,
                    segments=self._segments(trunk),
                    balancer=self.balancer if self.parallel is None else self.parallel.balancer,
                )
        if self.parallel is not None:  # averaged gradients; the global batch's losses
            self.parallel.after(result)
        if scale != 1.0:
            result.total = result.total / scale
        bad_tasks = result.nonfinite
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = (
            torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        )
        finite = not bad_tasks and bool(torch.isfinite(norm))
        self.last_grad_norm = float(norm)
        if finite:
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, tc.grad_clip, norm)
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.nonfinite["consecutive"] = 0
        else:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
            if self.scaler.is_enabled():
                self.scaler.update()  # the scaler lowers its scale, as it does when it skips itself
            if self.scaler.is_enabled() and not bad_tasks:
                # an fp16 gradient overflow: the scaler's own calibration, not a failure of training
                self.nonfinite["fp16_overflow"] = self.nonfinite.get("fp16_overflow", 0) + 1
                if self.log is not None:
                    self.log.scalars(
                        self.step + 1,
                        {"train/fp16_overflow_skipped": self.nonfinite["fp16_overflow"]},
                    )
            else:
                self._nonfinite(bad_tasks or self._nonfinite_gradient_owners())
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # the schedule follows the step count, applied or not; torch warns when the first is not
            warnings.filterwarnings(
                "ignore", message=re.escape("Detected call of `lr_scheduler.step()`")
            )
            self.scheduler.step()
        self.step += 1
        if self._autotune_untold:
            self._autotune_untold = False
            choices = winograd_autotune_choices()
            if choices:
                self.runtime.print(
                    f"conv_algorithm auto: Winograd kept at {sum(map(bool, choices.values()))} of the "
                    f"{len(choices)} convolution shapes measured on this CPU "
                    "(mtlfast.ops.winograd_autotune_choices())"
                )
        if self.log is not None:  # every step: GradNorm's weights move every step
            weights = self.balancer.weights
            self.log.scalars(
                self.step, {f"train/weight/{t}": self.weights[t] * weights[t] for t in self.tasks}
            )
        result.applied = finite  # type: ignore[attr-defined]
        return result

    def _nonfinite_gradient_owners(self) -> list[str]:
        """The tasks whose own parameters got a non-finite gradient (their names appear in the
        parameter's path, e.g. ``heads.depth`` or a joint decoder's ``aggregation.depth``), else
        ``["(shared)"]``. Runs only on the failure path: a finite step never pays for it."""
        tasks = set(self.tasks)
        owners: list[str] = []
        for name, p in self.model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                for part in name.split("."):
                    if part in tasks and part not in owners:
                        owners.append(part)
        return [f"{t} (gradient)" for t in owners] or ["(shared gradient)"]

    def _nonfinite(self, tasks: list[str]) -> None:
        tc = self.config.train
        what = f"step {self.step + 1}: non-finite loss or gradient from {', '.join(tasks)}"
        if tc.nonfinite == "raise":
            raise NonFiniteLossError(f"{what} (train.nonfinite: raise)")
        self.nonfinite["skipped"] += 1
        self.nonfinite["consecutive"] += 1
        for t in tasks:
            self.nonfinite["by_task"][t] = self.nonfinite["by_task"].get(t, 0) + 1
        self.runtime.warn(f"{what}; the update was skipped")
        if self.log is not None:
            self.log.scalars(self.step + 1, {"train/nonfinite_skipped": self.nonfinite["skipped"]})
        if self.nonfinite["consecutive"] >= tc.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{what}; {self.nonfinite['consecutive']} steps in a row were not finite "
                f"(train.max_consecutive_nonfinite); the last good checkpoint is kept"
            )

    # ------------------------------------------------------------------------------ evaluation

    def _eval_kwargs(self) -> dict:
        return {
            "dataset": self.config.data.dataset,
            "edge_thresholds": self.config.eval.edge_thresholds,
            "max_batches": self.config.eval.max_batches,
            "autocast_dtype": self.autocast_dtype,
            "reduce_over_ranks": self.runtime.world_size > 1,
        }

    def _bn_batches(self) -> int:
        ec = self.config.eval
        if ec.bn_recalibration is not None:
            return ec.bn_recalibration
        return 20 if self.config.train.max_steps <= ec.bn_recalibration_until else 0

    def evaluate(self, model: nn.Module | None = None, recalibrate: bool = True) -> dict:
        """The validation metrics of ``model`` (default the trained one) as :func:`evaluate` gives
        them, after precise-BN on training batches when ``eval.bn_recalibration`` asks for it."""
        model = self.model if model is None else model
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            n = self._bn_batches() if recalibrate else 0
            if n:
                # its own data order (another seed), so the training order is untouched
                loader = train_loader(
                    _with_seed(self.config, self.config.seed + 7919),
                    self.train_set,
                    start=self.step,
                    rank=self.runtime.rank,
                    world_size=self.runtime.world_size,
                )
                recalibrate_batch_norm(
                    model,
                    (self._formatted(batch_to(b, self.device)) for b in loader),
                    n,
                    self.autocast_dtype,
                )
                if self.parallel is not None and model is self.model:
                    self.parallel.sync_buffers()  # norms that are not synchronised: rank 0's
            loader = eval_loader(
                self.config,
                self.eval_set,
                self.config.data.eval_samples,
                self.runtime.rank,
                self.runtime.world_size,
            )
            total = (
                len(loader)
                if self.config.eval.max_batches is None
                else min(len(loader), self.config.eval.max_batches)
            )
            with self.runtime.progress(total, "eval", unit="batch", leave=False) as bar:
                return evaluate(
                    model,
                    (self._formatted(b) for b in loader),
                    self.tasks,
                    baselines=self.baselines,
                    progress=bar,
                    **self._eval_kwargs(),
                )

    def _check_select(self) -> None:
        select = self.config.eval.select
        if select in ("auto", "delta_m"):
            return
        task, _, metric = select.partition("/")
        if task not in self.tasks or not metric:
            raise ValueError(
                f"eval.select: expected 'auto', 'delta_m' or '<task>/<metric>' with a task of "
                f"{self.tasks}, got {select!r}"
            )

    def score(self, results: dict) -> float:
        """The figure ``eval.select`` maximises: delta_m against the single-task baselines, or
        against the constant predictor without them ("auto"), or one metric (negated when lower
        is better)."""
        select = self.config.eval.select
        tasks = results["tasks"]
        if select in ("auto", "delta_m"):
            reference = (
                self.baselines if self.baselines is not None else (self.constant or {}).get("tasks")
            )
            if reference is None:
                raise RuntimeError("score: no baselines and no constant predictor's results")
            return _relative_gain(tasks, reference)
        task, _, metric = select.partition("/")
        if metric not in tasks.get(task, {}):
            raise ValueError(
                f"eval.select: task {task!r} has no metric {metric!r} (has {sorted(tasks.get(task, {}))})"
            )
        value = float(tasks[task][metric])
        return -value if metric in LOWER_IS_BETTER else value

    def _evaluate_and_select(self) -> dict:
        results = self.evaluate()
        results["step"] = self.step
        results["score"] = self.score(results)
        self.history.append(results)
        if self.log is not None:
            values = _val_scalars(results)
            values["val/score"] = results["score"]
            if results["delta_m"] is not None:
                values["val/delta_m"] = results["delta_m"]
            self.log.scalars(self.step, values)
        if self.best.score is None or results["score"] > self.best.score:
            self.best = _Best(results["score"], self.step, results)
            if self.run_dir is not None and self.runtime.is_main:
                ckpt.save_checkpoint(
                    {
                        "version": __version__,
                        "step": self.step,
                        "model": self.model.state_dict(),
                        "results": results,
                        "config": config_to_dict(self.config),
                    },
                    self.run_dir / "checkpoints" / "best.pt",
                )
        return results

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain data (see :mod:`mtlfast.train.checkpoint`)."""
        return {
            "version": __version__,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "procedure": self.procedure.state_dict() if self.procedure is not None else {},
            "rng": ckpt.capture_rng(),
            "data": {"seed": self.config.seed, "batches": self.batches, "epoch": self._epoch()},
            "config": config_to_dict(self.config),
            "trainer": {
                "best": vars(self.best),
                "history": self.history,
                "before": self.before,
                "constant": self.constant,
                "nonfinite": self.nonfinite,
                "train_time": self.train_time,
            },
        }

    def _epoch(self) -> int:
        """The epoch of the data order the next batch comes from."""
        per_epoch = len(self.train_set) // (self.config.data.batch_size * self.runtime.world_size)
        return self.batches // max(per_epoch, 1)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        # torch restores each group's implementation flags with its hyperparameters: this run's
        # optim.fused decides, whatever the saved run used
        kept = {k: self.optimizer.defaults.get(k) for k in ("fused", "foreach")}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update(kept)
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule follows this run's config (a resume may change train.max_steps): the saved
        # LRFactor state would otherwise bring the old length back
        factor = LRFactor(self.config.schedule, self.config.train.max_steps)
        self.scheduler.lr_lambdas = [factor] * len(self.optimizer.param_groups)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "balancer" in state:  # checkpoints from before balancing have none: fixed weights
            self.balancer.load_state_dict(state["balancer"])
        if self.procedure is not None and state.get("procedure"):
            self.procedure.load_state_dict(state["procedure"])
        self.step = int(state["step"])
        self.batches = int(state["data"]["batches"])
        t = state["trainer"]
        self.best = _Best(**t["best"])
        self.history = list(t["history"])
        self.before, self.constant = t["before"], t["constant"]
        self.nonfinite = dict(t["nonfinite"])
        self.train_time = float(t["train_time"])
        ckpt.restore_rng(state["rng"])

    def save(self) -> None:
        """Writes ``checkpoints/step_<N>.pt`` atomically, points ``last.pt`` at it and keeps the
        newest ``train.keep_last`` step files."""
        if self.run_dir is None or not self.runtime.is_main:
            return
        directory = self.run_dir / "checkpoints"
        path = directory / f"step_{self.step:08d}.pt"
        ckpt.save_checkpoint(self.state_dict(), path)
        _link_atomically(path, directory / "last.pt")
        for _, old in ckpt.checkpoint_files(directory)[self.config.train.keep_last :]:
            old.unlink(missing_ok=True)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, overrides: list[str] | None = None) -> Trainer:
        """A trainer continuing the run in ``run_dir`` from its newest valid checkpoint (from the
        start, with a warning, when it has none)."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        trainer = cls(load_config(config_path, overrides), run_dir)
        found = ckpt.latest_checkpoint(run_dir / "checkpoints", map_location=trainer.device)
        if found is None:
            trainer.runtime.warn(f"{run_dir}: no checkpoint to resume from; starting the run again")
        else:
            path, state = found
            trainer.load_state_dict(state)
            trainer._resumed_from = trainer.step
            trainer.runtime.print(f"resuming {run_dir} from {path.name} (step {trainer.step})")
        return trainer

    # ------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Trains to ``train.max_steps``, evaluating every ``train.eval_every`` steps and at the
        end, checkpointing every ``train.checkpoint_every`` steps and at the end; returns (and
        writes) the results."""
        tc = self.config.train
        self._fit_start = time.perf_counter()
        resumed_from = self._resumed_from
        if self.run_dir is not None and self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.runtime.write_text(
                self.run_dir / "config.yaml",
                yaml.safe_dump(config_to_dict(self.config), sort_keys=False),
            )
            self.log = RunLog(self.run_dir, self.runtime, tc.tensorboard, resume_step=resumed_from)
            # temporary files of saves a killed process never finished (this process is the only writer)
            for stale in (self.run_dir / "checkpoints").glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            if self.step == 0:
                self._start()
            self._loop()
            if not self.history or self.history[-1]["step"] != self.step:
                self._evaluate_and_select()
            self.save()
            results = self.results()
            if self.run_dir is not None:
                self.runtime.write_json(self.run_dir / "results.json", results)
                if tc.plots and self.runtime.is_main:
                    self.log.close()
                    references = {"constant predictor": (self.constant or {}).get("tasks")}
                    if self.baselines is not None:
                        references["single-task"] = self.baselines
                    draw_plots(self.run_dir, references)
            return results
        finally:
            if self.log is not None:
                self.log.close()

    def _start(self) -> None:
        """Before the first step: the constant predictor's and the untrained model's metrics,
        and a word on tasks that no training sample is labelled for."""
        self._report_unlabelled()
        constant = ConstantPredictor.fit(
            (b for b in train_loader(self.config, self.train_set)),
            self.tasks,
            getattr(self.model, "out_channels", {}),
            max_batches=20,
        ).to(self.device)
        self.constant = self.evaluate(constant, recalibrate=False)
        if self.config.eval.before_training:
            self.before = self.evaluate(recalibrate=False)
            if self.log is not None:
                self.log.scalars(0, _val_scalars(self.before))

    def _report_unlabelled(self) -> None:
        labels = getattr(self.train_set, "labels", None)
        if labels is None or labels == "random":
            return
        covered = {t for source in labels for t in source}
        lacking = [t for t in self.tasks if t not in covered]
        if lacking:
            raise ValueError(
                f"data.labels: no source dataset is labelled for tasks {lacking}: they would never train"
            )

    def _loop(self) -> None:
        tc = self.config.train
        if self.step >= tc.max_steps:
            return
        loader = train_loader(
            self.config,
            self.train_set,
            start=self.batches,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
        )
        batches = iter(loader)
        window: list[StepResult] = []
        images, busy = 0, 0.0  # since the last log line: images and seconds of loading + stepping
        with self.runtime.progress(tc.max_steps, "train", initial=self.step) as bar:
            while self.step < tc.max_steps:
                tick = time.perf_counter()
                batch = next(batches)
                self.batches += 1
                result = self.train_step(batch)
                spent = time.perf_counter() - tick
                self.train_time += spent
                busy += spent
                images += batch["image"].shape[0] * self.runtime.world_size  # all ranks'
                window.append(result)
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._log_train(window, images / max(busy, 1e-9), bar)
                    window, images, busy = [], 0, 0.0
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                    results = self._evaluate_and_select()
                    bar.write(f"step {self.step}: " + _brief(results))
                if (
                    tc.checkpoint_every
                    and self.step % tc.checkpoint_every == 0
                    and self.step < tc.max_steps
                ):
                    self.save()

    def _log_train(self, window: list[StepResult], images_per_s: float, bar) -> None:
        losses: dict[str, list[float]] = {}
        for r in window:
            for t, v in r.losses.items():
                losses.setdefault(t, []).append(float(v))
        values = {f"train/loss/{t}": sum(v) / len(v) for t, v in losses.items()}
        values["train/loss"] = sum(float(r.total) for r in window) / len(window)
        values["train/lr"] = self.optimizer.param_groups[0]["lr"]
        values["train/grad_norm"] = self.last_grad_norm
        values["train/images_per_s"] = images_per_s
        if self.log is not None:
            self.log.scalars(self.step, values)
        bar.set_postfix_str(f"loss {values['train/loss']:.3f} | {images_per_s:.1f} img/s")

    def results(self) -> dict:
        """What the run measured: final and best metrics per task, delta_m, the untrained and
        constant predictors' metrics, steps, time, peak memory and skipped steps."""
        final = self.history[-1] if self.history else None
        return {
            "version": __version__,
            "steps": self.step,
            "final": final,
            "best": {
                "step": self.best.step,
                "score": self.best.score,
                "results": self.best.results,
            },
            "before_training": self.before,
            "constant_predictor": self.constant,
            "train_time_s": self.train_time,
            # this call of fit(): evaluations, checkpoints and start-up included (a resumed run's
            # earlier sessions are not)
            "fit_wall_time_s": time.perf_counter() - self._fit_start,
            "images_per_s": self.step
            * self.config.data.batch_size
            * self.runtime.world_size
            / self.train_time
            if self.train_time
            else None,
            "peak_memory_bytes": _peak_memory_bytes(self.device),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "kept_freed_memory": self.kept_freed_memory,
            "memory_format": NAMES[self.memory_format],
            # train.memory_format auto: the timed steps of each layout that chose it
            "memory_format_trial_s": self.layout_times,
            "nonfinite": self.nonfinite,
        }


# ------------------------------------------------------------------------------------ helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _with_seed(config: Config, seed: int) -> Config:
    import dataclasses

    return dataclasses.replace(config, seed=seed)


def _loss_weights(config: Config) -> dict[str, float]:
    w = config.loss.weights
    tasks = [*config.tasks, *config.loss.auxiliary]
    if w is None:
        return dict.fromkeys(tasks, 1.0)
    if isinstance(w, str):
        table = mtl_losses.PASCAL_WEIGHTS if w == "pascal" else mtl_losses.NYUD_WEIGHTS
        lacking = [t for t in tasks if t not in table]
        if lacking:
            raise ValueError(f"loss.weights: the {w!r} weights have no entry for tasks {lacking}")
        return {t: float(table[t]) for t in tasks}
    unknown = set(w) - set(tasks)
    if unknown:
        raise ValueError(f"loss.weights: tasks {sorted(unknown)} are not in tasks {tasks}")
    return {t: float(w.get(t, 1.0)) for t in tasks}


def _check_auxiliary(model: nn.Module, auxiliary: list[str]) -> None:
    """Each front-end-only task must reach the loss through a deep-supervision prediction."""
    keys = model.expand(dict.fromkeys(auxiliary, 1.0)) or {}
    lacking = [t for t in auxiliary if not any(k != t and t in k.split("/") for k in keys)]
    if lacking:
        raise ValueError(
            f"loss.auxiliary: {type(model).__name__} has no deep-supervision prediction of "
            f"{lacking}, so they would never train (MTI-Net and PAD-Net have them)"
        )


def _build_balancer(config: Config) -> mtl_balancing.Balancer:
    """``mtlfast.balancing.create`` for ``config.balancing`` on the run's tasks."""
    bc = config.balancing
    if config.train.precision == "fp16" and bc.name != "fixed":
        # the gradient scaler's factor rides on the loss weights and would enter the losses and
        # gradient norms the balancer learns from
        raise ValueError(
            f"balancing.name {bc.name!r} does not support train.precision fp16 yet; use bf16"
        )
    try:
        # auxiliary tasks' losses (deep supervision) are weighted by it too
        tasks = [*config.tasks, *config.loss.auxiliary]
        return mtl_balancing.create(bc.name, tasks, **bc.options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"balancing: {e}") from None


def _relative_gain(results: dict, reference: dict) -> float:
    """Mean over tasks of the signed relative change of each task's delta_m metric against
    ``reference`` (MTI-Net Eq. 2's delta_m); tasks whose reference value is 0 are left out."""
    total, n = 0.0, 0
    for task, metrics in results.items():
        name = DEFAULT_METRIC.get(task)
        if (
            name is None
            or name not in metrics
            or task not in reference
            or name not in reference[task]
        ):
            continue
        b = float(reference[task][name])
        if b == 0:
            continue
        rel = (float(metrics[name]) - b) / abs(b)
        total += -rel if name in LOWER_IS_BETTER else rel
        n += 1
    return total / n if n else float("-inf")


def _val_scalars(results: dict) -> dict[str, float]:
    """``val/<task>/<metric>`` -> value for the scalar metrics of an evaluation."""
    return {
        f"val/{t}/{m}": v
        for t, ms in results["tasks"].items()
        for m, v in ms.items()
        if isinstance(v, float)
    }


def _brief(results: dict) -> str:
    parts = []
    for task, metrics in results["tasks"].items():
        name = DEFAULT_METRIC.get(task)
        if name in metrics:
            parts.append(f"{task} {name} {metrics[name]:.4g}")
    if results.get("delta_m") is not None:
        parts.append(f"delta_m {100 * results['delta_m']:+.2f}%")
    return ", ".join(parts)


def _link_atomically(target: Path, link: Path) -> None:
    """``link`` becomes a hard link to ``target`` (a copy where links are not supported), atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
