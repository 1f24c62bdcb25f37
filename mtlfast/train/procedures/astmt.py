"""ASTMT's training procedure (Maninis et al., CVPR 2019, Sec. 4 and appendix): single-task passes
with an adversarial term on the task gradients."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from ...engine import StepResult
from ...engine._context import running
from ...models.astmt import ASTMT
from ...models.base import _stacked_parameters
from ...nn import TaskSE
from .._dist_losses import zero_loss
from .._sync_bn import is_sync_batchnorm
from ..async_sgd import task_parameter_groups
from .base import Procedure
from .reversal import ganin_weight, reverse_gradient
from .used_weights import UsedWeightsOnly

__all__ = ["ASTMTProcedure"]

_IGNORE = -100
_EXECUTIONS = ("sequential", "batched")
_UPDATES = ("batch", "task")


class ASTMTProcedure(Procedure):
    """One ASTMT training step: for each task labelled in the batch, the task-modulated pass,
    the task loss and the adversarial term on its gradient, then the update.

    Per task t (Sec. 4, Fig. 4; appendix Eq. 1 and "Discriminator"):
        - ``L_t = w_t * loss_t(model(x, t), y_t)`` on the samples labelled for t;
        - ``g_t = dL_t / dF``, the gradient at the interface F of the shared and the
          task-specific network, by double backprop (``create_graph=True``), so that ``g_t``
          is differentiable in the network's weights;
        - ``L_d`` = cross-entropy of the gradient discriminator (:meth:`ASTMT.discriminator`,
          two 1x1 convolutions, gradients normalised by their norm) predicting t from ``g_t``
          at every pixel where it is not zero, through gradient reversal with weight lambda, so
          that the discriminator descends ``L_d`` and the network ascends it;
        - the loss ``(1 - w_d) L_t + w_d L_d``, w_d = 0.1 (appendix).
    The discriminator trains with its own learning rate (``discriminator_lr`` times the base).

    Options (the paper's ablations, Table 3: ``adversarial``; modulation is the model's,
    ``model.options`` ``se_encoder`` / ``se_decoder`` / ``adapters``):
        adversarial: the adversarial term (False: the T single-task losses alone).
        discriminator_weight: w_d (appendix: 0.1; the release's ``--dscr_w`` default is 0.01).
        discriminator_lr: learning-rate factor of the discriminator (the release's ``--lr_dscr``: 10).
        discriminator_at: F, "decoder" (the decoder's output, the task classifiers' input: the
            release's) or "encoder" (the backbone's last feature: the gradient then runs
            through the whole decoder twice, which needs a decoder without SE blocks,
            ``decoder_se=False``: the fused SE op has no double backward).
        discriminator_hidden: width of its hidden layer; None: as wide as F (the release's).
        normalize: "pixel" (each pixel's gradient vector by its norm, the release's) or "sample".
        reversal: "ganin", lambda = ``reversal_weight * (2 / (1 + exp(-gamma p)) - 1)`` at
            progress ``p = (step + 1) / max_steps`` (the release's, per epoch there), or
            "constant" lambda = ``reversal_weight``.
        updates: "task" (default): the paper's and the release's T optimiser steps per batch,
            one after each task's pass ("T updates are happening for the same mini-batch on the
            shared part", appendix), each pass freed with its gradients before the next (peak
            memory: one task pass); needs ``optimizer``. "batch": one step after all tasks on
            the sum of their gradients (the task-batched variant: every gradient is held across
            the T passes).
        execution: with ``updates="batch"``: "sequential" (default): the shared stages
            (:attr:`ASTMT.shared_stages`: the stem with a modulated encoder, all of the encoder
            without encoder modulation) run once, then each task's pass runs forward and
            backward in turn and is freed before the next; "batched": the T passes stacked into
            one (the fused per-sample ops, as :meth:`ASTMT.forward_all`): one graph holding T
            passes' activations, on a 2-core CPU 1.18x slower than the T passes (the README;
            nothing after the stem is shared, so the convolutions do the same work). Its maps
            are T times larger: in a loop of your own, call
            :func:`mtlfast.train.keep_freed_memory` as the trainer does, or each map over
            32 MiB is faulted in afresh every step (2x slower). With ``updates="task"`` each
            pass runs the whole network.
        task_lr_multiplier: multiplies the learning rate of the task-specific parameters (heads
            and the stacked per-task rows: task SE, task batch norm, adapters) by this factor
            (appendix: the shared layers' rate is divided by T; the release: ``--lr_tsk`` = T
            times the base rate on the task-specific ones). None: as the optimiser has it.

    "Update only the weights that were used" (appendix): :class:`UsedWeightsOnly` hooks keep an
    optimiser step from moving, by momentum or weight decay, the stacked rows of tasks that did
    not run in it; a task's own parameters (its head) have no gradient then and are skipped.

    The task-batched and the sequential execution give the same gradients where each task's
    pass depends on its own samples only: in eval mode, or with task-specific batch norm after
    the shared stages (the default whenever modulation is on); a shared batch norm would see
    the T stacked copies together.

    Where it departs from the release (``experiments/dense_predict/pascal_resnet/main.py``):
    the release rebuilds its SGD optimiser at every epoch (the poly rate changes once per epoch
    and the momentum is reset), weights the discriminator 0.01 (the appendix: 0.1), ramps lambda
    per epoch, and labels the discriminator's targets from the ground truth's non-ignored pixels
    resized to the feature size (here: the pixels where ``g_t`` is not zero, which the
    normalisation would otherwise send to 0).

    On several ranks (``torchrun``; :mod:`mtlfast.train.distributed`), K ranks with batch B take
    the steps of one process with batch KB (tested to float tolerance with the adversarial
    term, ``updates="task"``, partial labels and ``train.sync_bn``). Every rank runs the tasks
    labelled on any rank, in the same order; a rank with none of a task's samples contributes
    a zero gradient but takes part in the collectives (with synchronised batch norm it runs the
    pass on no row, so that the norms' collectives pair up; else it skips it). Each rank weights
    its task loss by its share ``K d_r / D`` of the global denominator (as the engine's step,
    :mod:`mtlfast.train._dist_losses`), takes ``g_t`` of the global loss (its rows of one
    process's ``g_t``) and sums its pixels' cross-entropy over the valid pixels of all ranks,
    so that L_d is the mean over the global batch. Per task pass it communicates:

        - one all-reduce of 2 numbers, before the backward: the valid pixels of ``g_t`` (L_d's
          global denominator) and whether a loss is not finite (the update's decision); none
          with ``updates="batch"`` and no adversarial term;
        - with ``updates="task"``, the pass's gradients of the model and the discriminator,
          averaged by :class:`~mtlfast.train.distributed.GradientSync` (buckets sent while the
          backward runs) before the update, whose clipping and non-finite check so see the same
          global gradient on every rank: T times the parameters' bytes per step, where the
          engine's step and ``updates="batch"`` (after its passes; the task-batched execution
          during its backward) send them once;

    and per step one all-reduce of 2 numbers (the global L_d, the discriminator's accuracy)
    besides the DistributedStep's (the loss denominators before, the losses and rank 0's
    batch-norm buffers after). The reversal's lambda follows :attr:`steps`, which every rank
    advances alike; :class:`UsedWeightsOnly` gets the same tasks on every rank. ``train.sync_bn``
    synchronises task batch norm (:class:`mtlfast.nn.TaskBatchNorm2d`, ASTMT's default with
    modulation) too: each task's statistics are those of its samples on all ranks (one more
    all-reduce of T counts per task batch norm in the task-batched passes). Without it every
    norm's statistics are each rank's, so the ranks agree with each other (rank 0's running
    statistics broadcast) but equal one process with batch KB only in eval mode.

    Usable in a user's loop: ``procedure.backward(batch, loss_fns, weights)`` leaves the
    gradients, ``optimizer.step()`` follows (with ``updates="task"`` the procedure steps the
    optimiser between tasks itself and needs ``optimizer``).

    Args:
        model: an :class:`mtlfast.models.ASTMT`.
        optimizer: the optimiser of the model's parameters; the discriminator's parameters are
            added to it as a group of their own (None: the caller trains the discriminator,
            :attr:`discriminator`).
        max_steps: the run's length, for the reversal schedule.
        grad_clip: clip each per-task update's gradient norm (``updates="task"``).
    """

    name = "astmt"
    #: trains on several ranks (mtlfast.train.distributed): see "On several ranks" above
    distributed = True
    #: arms the DistributedStep's gradient sync itself, once per backward pass
    syncs_per_pass = True

    def __init__(
        self,
        model: ASTMT,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        max_steps: int = 1,
        adversarial: bool = True,
        discriminator_weight: float = 0.1,
        discriminator_lr: float = 10.0,
        discriminator_at: str = "decoder",
        discriminator_hidden: int | None = None,
        normalize: str = "pixel",
        reversal: str = "ganin",
        reversal_gamma: float = 10.0,
        reversal_weight: float = 1.0,
        execution: str = "sequential",
        updates: str = "task",
        task_lr_multiplier: float | None = None,
        grad_clip: float | None = None,
    ) -> None:
        if not isinstance(model, ASTMT):
            raise TypeError(
                f"ASTMTProcedure: model must be an mtlfast.models.ASTMT, got {type(model).__name__}"
            )
        checks = [
            ("execution", execution in _EXECUTIONS, f"one of {_EXECUTIONS}"),
            ("updates", updates in _UPDATES, f"one of {_UPDATES}"),
            (
                "discriminator_at",
                discriminator_at in ("decoder", "encoder"),
                "'decoder' or 'encoder'",
            ),
            ("normalize", normalize in ("pixel", "sample"), "'pixel' or 'sample'"),
            ("reversal", reversal in ("ganin", "constant"), "'ganin' or 'constant'"),
            ("discriminator_weight", 0.0 <= discriminator_weight < 1.0, "in [0, 1)"),
            ("discriminator_lr", discriminator_lr >= 0, "non-negative"),
            (
                "reversal_weight",
                reversal_weight >= 0 and math.isfinite(reversal_weight),
                "finite and non-negative",
            ),
            ("max_steps", max_steps >= 1, "at least 1"),
            (
                "task_lr_multiplier",
                task_lr_multiplier is None or task_lr_multiplier > 0,
                "positive or None",
            ),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ValueError(f"ASTMTProcedure: {key} must be {what}, got {locals()[key]!r}")
        if updates == "task" and execution != "sequential":
            raise ValueError(
                "ASTMTProcedure: updates='task' steps between tasks: it needs execution='sequential' "
                "(execution='batched' goes with updates='batch')"
            )
        if updates == "task" and optimizer is None:
            raise ValueError(
                "ASTMTProcedure: updates='task' (the default) steps the optimizer between tasks: "
                "pass optimizer, or updates='batch'"
            )
        if (
            adversarial
            and discriminator_at == "encoder"
            and any(isinstance(m, TaskSE) for m in model.decoder.modules())
        ):
            raise ValueError(
                "ASTMTProcedure: discriminator_at='encoder' backpropagates twice through the "
                "decoder, and its SE blocks' fused op (mtlfast.ops.task_se) has no double "
                "backward; use discriminator_at='decoder' (the release's) or decoder_se=False"
            )
        self.model = model
        self.optimizer = optimizer
        self.adversarial = adversarial
        self.w_d = float(discriminator_weight) if adversarial else 0.0
        self.at = discriminator_at
        self.reversal, self.gamma, self.reversal_weight = reversal, reversal_gamma, reversal_weight
        self.execution, self.updates = execution, updates
        self.max_steps, self.grad_clip = max_steps, grad_clip
        self.steps = 0
        self.discriminator = None
        if adversarial:
            param = next(model.parameters())
            self.discriminator = model.discriminator(
                hidden=discriminator_hidden,
                at=discriminator_at,
                per_pixel=normalize == "pixel",
                bias=False,
            ).to(device=param.device, dtype=param.dtype)
        self.used = None
        if optimizer is not None:
            self._attach(optimizer, discriminator_lr, task_lr_multiplier)
        self.last_discriminator_accuracy: float | None = None

    # ---- optimiser --------------------------------------------------------------------------

    def _attach(
        self, optimizer: torch.optim.Optimizer, discriminator_lr: float, task_lr: float | None
    ) -> None:
        if task_lr is not None and task_lr != 1.0:
            if optimizer.state:
                raise ValueError(
                    "ASTMTProcedure: task_lr_multiplier regroups the optimizer: pass it before its first step"
                )
            groups = task_parameter_groups(self.model)
            own = {id(p) for name, ps in groups.items() if name != "shared" for p in ps}
            t = len(self.model.tasks)
            own |= {id(p) for m in self.model.modules() for p in _stacked_parameters(m, t)}
            regrouped = []
            for group in optimizer.param_groups:
                shared = [p for p in group["params"] if id(p) not in own]
                specific = [p for p in group["params"] if id(p) in own]
                if shared:
                    regrouped.append({**group, "params": shared})
                if specific:
                    regrouped.append({**group, "params": specific, "lr": group["lr"] * task_lr})
            optimizer.param_groups[:] = regrouped
        if self.discriminator is not None:
            optimizer.add_param_group(
                {
                    "params": list(self.discriminator.parameters()),
                    "lr": optimizer.defaults["lr"] * discriminator_lr,
                }
            )
        self.used = UsedWeightsOnly(optimizer, self.model, len(self.model.tasks))

    def reversal_lambda(self) -> float:
        """lambda of the gradient reversal at the current step."""
        if self.reversal == "constant":
            return self.reversal_weight
        progress = min((self.steps + 1) / self.max_steps, 1.0)
        return ganin_weight(progress, self.gamma, self.reversal_weight)

    # ---- one step ---------------------------------------------------------------------------

    def train_backward(self, trainer: Any, batch: dict) -> StepResult:
        # under train.strategy, as the engine's step: with "recompute" each task's pass keeps only
        # the inputs of the blocks of its first recompute_stages encoder stages and recomputes
        # them in backward (ASTMT._lean; the double backprop from the decoder's or encoder's
        # output works through them)
        with running(trainer.config.train.strategy):
            return self.backward(
                batch,
                trainer.loss_fns,
                trainer.weights,
                parallel=getattr(trainer, "parallel", None),
            )

    def backward(
        self, batch: dict, loss_fns: dict, weights: dict | None = None, *, parallel: Any = None
    ) -> StepResult:
        """The step's passes on ``batch`` (``image``, each task's target, optional ``labeled``),
        for the tasks of ``loss_fns`` (task -> ``fn(prediction, target)``), weighted by
        ``weights`` (task -> w_t, default 1); leaves the gradients in ``.grad`` (with
        ``updates="task"``, the last task's, the others having been applied).

        ``parallel``: on several ranks, the :class:`mtlfast.train.distributed.DistributedStep`
        built with the discriminator's parameters as ``extra_params``, after its
        ``before(..., arm=False)`` on this batch; its ``after(result)`` follows (the trainer
        does both). ``batch`` is then this rank's share of the global batch.

        Returns a :class:`mtlfast.engine.StepResult`: ``losses`` the unweighted task losses and,
        with the adversarial term, ``"discriminator"`` (L_d averaged over the tasks); ``total``
        the loss whose gradient was taken (summed over the tasks).
        """
        model = self.model
        weights = weights or {}
        x = batch["image"]
        unknown = [t for t in loss_fns if t not in model.tasks]
        if unknown:
            raise ValueError(
                f"ASTMTProcedure: loss_fns has tasks {unknown} the model does not predict"
            )
        ranks = None
        if parallel is not None:
            ranks = self._ranks(parallel)
            # each task's loss as this rank's share of the global batch's (global denominators,
            # the saliency balance of the global batch): the weights carry K * d_r / D
            _, fns, _, scaled = parallel.inputs
            loss_fns = {t: fns.get(t, fn) for t, fn in loss_fns.items()}
            weights = {t: scaled.get(t, weights.get(t, 1.0)) for t in loss_fns}
        runs, skipped = [], []
        for i, name in enumerate(model.tasks):
            if name not in loss_fns:
                continue
            flags = batch.get("labeled", {}).get(name)
            if ranks is not None:  # a task labelled on any rank runs on all (on none of its rows)
                if not parallel.labelled.get(name, 0):
                    skipped.append(name)
                elif flags is None or bool(flags.all()):
                    runs.append((i, name, None))
                else:
                    runs.append((i, name, flags.nonzero().flatten()))
            elif flags is None or bool(flags.all()):
                runs.append((i, name, None))
            elif bool(flags.any()):
                runs.append((i, name, flags.nonzero().flatten()))
            else:
                skipped.append(name)
        result = StepResult(
            losses={}, total=torch.zeros((), device=x.device), ran=[], skipped=skipped
        )
        if runs:
            lam = self.reversal_lambda()
            if ranks is not None:
                run = self._batched_ranks if self.execution == "batched" else self._sequential_ranks
                terms = run(x, batch, runs, loss_fns, weights, lam, result, ranks)
            elif self.execution == "batched":
                terms = self._batched(x, batch, runs, loss_fns, weights, lam, result)
            else:
                terms = self._sequential(x, batch, runs, loss_fns, weights, lam, result)
            result.total = sum(terms[1:], terms[0])
            if self.used is not None:
                ran = [runs[-1][0]] if self.updates == "task" else [i for i, _, _ in runs]
                self.used.set_used(ran)
        elif ranks is not None:  # no task labelled on any rank: after() still pairs the sync
            ranks.grads.start(ranks.params)
        self.steps += 1
        return result

    def _target(self, batch: dict, name: str, rows: torch.Tensor | None):
        y = batch[name]
        return y if rows is None else y.index_select(0, rows.to(y.device))

    def _discriminate(self, g: torch.Tensor, task: torch.Tensor | int, lam: float):
        """(logits, labels, correct pixels, valid pixels) of the discriminator on ``g`` through
        the reversal: labels ``task`` (an int, or one per sample) where ``g`` is not zero, else
        ignored. Shapes: g (K, C, h, w); task (K,) or int; logits (K, T, h, w); labels (K, h, w).
        """
        logits = self.discriminator(reverse_gradient(g, lam))
        with torch.no_grad():
            valid = g.detach().abs().amax(1) > 0
            if isinstance(task, int):
                labels = torch.full(valid.shape, task, dtype=torch.long, device=g.device)
            else:
                labels = task[:, None, None].expand(valid.shape).clone()
            labels[~valid] = _IGNORE
            count = int(valid.sum())
            correct = int(((logits.argmax(1) == labels) & valid).sum())
        return logits, labels, correct, count

    def _adversarial(self, g: torch.Tensor, task: torch.Tensor | int, lam: float):
        """(L_d, correct pixels, valid pixels) of the discriminator on ``g`` with labels ``task``
        (an int, or one per sample). Shapes: g (K, C, h, w); task (K,) or int."""
        logits, labels, correct, count = self._discriminate(g, task, lam)
        if count == 0:
            return logits.reshape(-1)[:0].sum(), 0, 0
        return F.cross_entropy(logits.float(), labels, ignore_index=_IGNORE), correct, count

    def _record(self, result: StepResult, name: str, loss: torch.Tensor) -> None:
        result.losses[name] = loss.detach()
        result.ran.append(name)

    def _finish_discriminator(
        self, result: StepResult, d_losses: list, correct: int, count: int
    ) -> None:
        if self.discriminator is None or not d_losses:
            return
        self._record(
            result, "discriminator", torch.stack([d.detach().float() for d in d_losses]).mean()
        )
        self.last_discriminator_accuracy = correct / count if count else None

    def _sequential(self, x, batch, runs, loss_fns, weights, lam, result) -> list[torch.Tensor]:
        model, size = self.model, x.shape[-2:]
        share = self.updates == "batch" and model.shared_stages > 0
        if share:  # the shared part once, its graph kept; each task's pass starts from leaves
            shared = model.shared_part(x)
            leaves = [t.detach().requires_grad_() for t in shared]
        terms, d_losses, correct, count = [], [], 0, 0
        for k, (i, name, rows) in enumerate(runs):
            inputs = leaves if share else model.shared_part(x)
            if rows is not None:
                inputs = [t.index_select(0, rows.to(t.device)) for t in inputs]
            enc, dec = model.task_part(inputs, i)
            loss = loss_fns[name](model.predict(dec, i, size), self._target(batch, name, rows))
            wl = loss * float(weights.get(name, 1.0))
            self._record(result, name, loss)
            term = wl
            if self.discriminator is not None:
                (g,) = torch.autograd.grad(
                    wl, dec if self.at == "decoder" else enc, create_graph=True
                )
                d_loss, c, n = self._adversarial(g, i, lam)
                d_losses.append(d_loss)
                correct, count = correct + c, count + n
                term = (1 - self.w_d) * wl + self.w_d * d_loss
            term.backward()
            terms.append(term.detach())
            del enc, dec, inputs, loss, wl, term
            if self.updates == "task" and k < len(runs) - 1:
                self._step_between(i, result)
        if share:
            pairs = [(s, leaf.grad) for s, leaf in zip(shared, leaves) if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])
        self._finish_discriminator(result, d_losses, correct, count)
        return terms

    def _step_between(self, task: int, result: StepResult, bad: bool | None = None) -> None:
        """The release's per-task update, inside the step (the trainer applies the last one).
        ``bad``: whether a loss of the step so far is not finite (None: ``result``'s; on several
        ranks: on any rank); the gradients are then the averaged ones, so every rank decides
        alike."""
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = (
            torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        )
        bad = bool(result.nonfinite) if bad is None else bad
        if bad or not bool(torch.isfinite(norm)):
            opt.zero_grad(set_to_none=True)  # this task's update is dropped; the trainer reports it
            return
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        self.used.set_used([task])
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _batched(self, x, batch, runs, loss_fns, weights, lam, result) -> list[torch.Tensor]:
        model, size = self.model, x.shape[-2:]
        n = x.shape[0]
        shared = model.shared_part(x)
        index, task, blocks = [], [], []
        start = 0
        for i, name, rows in runs:
            idx = torch.arange(n, device=x.device) if rows is None else rows.to(x.device)
            index.append(idx)
            task.append(torch.full((idx.numel(),), i, dtype=torch.long, device=x.device))
            blocks.append((start, start + idx.numel()))
            start += idx.numel()
        index, task = torch.cat(index), torch.cat(task)
        enc, dec = model.task_part([t.index_select(0, index) for t in shared], task)
        wls = []
        for (i, name, rows), (a, b) in zip(runs, blocks):
            loss = loss_fns[name](model.predict(dec[a:b], i, size), self._target(batch, name, rows))
            self._record(result, name, loss)
            wls.append(loss * float(weights.get(name, 1.0)))
        if self.discriminator is None:
            total = sum(wls[1:], wls[0])
            total.backward()
            return [w.detach() for w in wls]
        # each task's loss reaches its own rows only: one gradient gives every g_t
        (g,) = torch.autograd.grad(
            sum(wls[1:], wls[0]), dec if self.at == "decoder" else enc, create_graph=True
        )
        d_losses, terms, correct, count = [], [], 0, 0
        for (i, _, _), (a, b), wl in zip(runs, blocks, wls):
            d_loss, c, k = self._adversarial(g[a:b], i, lam)
            d_losses.append(d_loss)
            correct, count = correct + c, count + k
            terms.append((1 - self.w_d) * wl + self.w_d * d_loss)
        total = sum(terms[1:], terms[0])
        total.backward()
        self._finish_discriminator(result, d_losses, correct, count)
        return [t.detach() for t in terms]

    # ---- on several ranks -------------------------------------------------------------------

    def _ranks(self, parallel: Any) -> _Ranks:
        if not dist.is_initialized():
            raise RuntimeError("ASTMTProcedure: parallel given without a process group")
        if (
            self.discriminator is not None
            and self.at == "encoder"
            and any(is_sync_batchnorm(m) for m in self.model.decoder.modules())
        ):
            raise ValueError(
                "ASTMTProcedure: discriminator_at='encoder' backpropagates twice through the "
                "decoder, and synchronised batch norm has no double backward across ranks; use "
                "discriminator_at='decoder' (the release's) or train.sync_bn false"
            )
        params = [*self.model.parameters(), *(p for m in self.modules() for p in m.parameters())]
        return _Ranks(parallel, params)

    def _others(self, name: str) -> list[torch.Tensor]:
        """The heads' parameters but task ``name``'s: no gradient comes to them in its pass."""
        return [p for t, h in self.model.heads.items() if t != name for p in h.parameters()]

    def _sequential_ranks(self, x, batch, runs, loss_fns, weights, lam, result, ranks):
        """:meth:`_sequential` on this rank's rows of the global batch (see the class)."""
        model, size, device = self.model, x.shape[-2:], x.device
        per_task = self.updates == "task"
        share = not per_task and model.shared_stages > 0
        if share:
            shared = model.shared_part(x)
            leaves = [t.detach().requires_grad_() for t in shared]
        terms, shares, correct, count, bad = [], [], 0, 0, False
        for k, (i, name, rows) in enumerate(runs):
            here = rows is None or rows.numel() > 0
            term, local_bad, valid = None, False, 0
            # no rows here: a pass on none keeps synchronised batch norm's collectives paired
            if here or ranks.synced:
                inputs = leaves if share else model.shared_part(x)
                if rows is not None:
                    inputs = [t.index_select(0, rows.to(t.device)) for t in inputs]
                enc, dec = model.task_part(inputs, i)
                pred, target = model.predict(dec, i, size), self._target(batch, name, rows)
                if here:
                    loss = loss_fns[name](pred, target)
                    self._record(result, name, loss)
                    local_bad = not bool(torch.isfinite(loss.detach()))
                    term = loss * float(weights.get(name, 1.0))
                else:
                    term = zero_loss(pred, target)
                if self.discriminator is not None:
                    # g of the global loss (the weight carries K): one process's rows of g_t
                    (g,) = torch.autograd.grad(
                        term / ranks.world, dec if self.at == "decoder" else enc, create_graph=True
                    )
                    logits, labels, c, valid = self._discriminate(g, i, lam)
                    correct += c
            if self.discriminator is not None or per_task:
                total_valid, any_bad = ranks.sum([valid, float(local_bad)], device)
                count, bad = count + int(total_valid), bad or any_bad > 0
            if term is not None and self.discriminator is not None:
                # L_d, the mean over every rank's valid pixels: this rank's share of it
                d_share = F.cross_entropy(
                    logits.float(), labels, ignore_index=_IGNORE, reduction="sum"
                ) / max(total_valid, 1.0)
                shares.append(d_share.detach())
                term = (1 - self.w_d) * term + self.w_d * ranks.world * d_share
            if per_task:
                ranks.grads.start(self._others(name) if term is not None else ranks.params)
            if term is not None:
                term.backward()
                terms.append(term.detach())
            term = inputs = enc = dec = pred = logits = g = None
            if per_task and k < len(runs) - 1:
                ranks.grads.finish()
                self._step_between(i, result, bad)
        if share:
            pairs = [(s, leaf.grad) for s, leaf in zip(shared, leaves) if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])
        if not per_task:  # the gradients summed over the passes, averaged in after()
            ranks.grads.start()
        self._finish_ranks(result, shares, correct, count, len(runs), ranks, device)
        return terms or [torch.zeros((), device=device)]

    def _batched_ranks(self, x, batch, runs, loss_fns, weights, lam, result, ranks):
        """:meth:`_batched` on this rank's rows of the global batch (see the class)."""
        model, size, device = self.model, x.shape[-2:], x.device
        n = x.shape[0]
        index, task, blocks = [], [], []
        start = 0
        for i, _, rows in runs:
            idx = torch.arange(n, device=device) if rows is None else rows.to(device)
            index.append(idx)
            task.append(torch.full((idx.numel(),), i, dtype=torch.long, device=device))
            blocks.append((start, start + idx.numel()))
            start += idx.numel()
        running = start > 0 or ranks.synced
        wls, pieces, valid, correct = [], [], [0] * len(runs), 0
        if running:
            shared = model.shared_part(x)
            index, task = torch.cat(index), torch.cat(task)
            enc, dec = model.task_part([t.index_select(0, index) for t in shared], task)
            for (i, name, rows), (a, b) in zip(runs, blocks):
                pred, target = model.predict(dec[a:b], i, size), self._target(batch, name, rows)
                if b > a:
                    loss = loss_fns[name](pred, target)
                    self._record(result, name, loss)
                    wls.append(loss * float(weights.get(name, 1.0)))
                else:
                    wls.append(zero_loss(pred, target))
            if self.discriminator is not None:
                (g,) = torch.autograd.grad(
                    sum(wls[1:], wls[0]) / ranks.world,
                    dec if self.at == "decoder" else enc,
                    create_graph=True,
                )
                for k, ((i, _, _), (a, b)) in enumerate(zip(runs, blocks)):
                    logits, labels, c, valid[k] = self._discriminate(g[a:b], i, lam)
                    pieces.append((logits, labels))
                    correct += c
        terms, shares = wls, []
        if self.discriminator is not None:
            valid = ranks.sum(valid, device)
            if running:
                terms = []
                for (logits, labels), wl, v in zip(pieces, wls, valid):
                    d_share = F.cross_entropy(
                        logits.float(), labels, ignore_index=_IGNORE, reduction="sum"
                    ) / max(v, 1.0)
                    shares.append(d_share.detach())
                    terms.append((1 - self.w_d) * wl + self.w_d * ranks.world * d_share)
        ranks.grads.start(() if running else ranks.params)
        if running:
            sum(terms[1:], terms[0]).backward()
        self._finish_ranks(result, shares, correct, int(sum(valid)), len(runs), ranks, device)
        return [t.detach() for t in terms] or [torch.zeros((), device=device)]

    def _finish_ranks(self, result, shares, correct, count, tasks, ranks, device) -> None:
        """The global batch's L_d (averaged over the tasks) and the discriminator's accuracy."""
        if self.discriminator is None:
            return
        mine = sum(float(s) for s in shares) / tasks
        d_loss, correct = ranks.sum([mine, correct], device)
        self._record(result, "discriminator", torch.tensor(d_loss, device=device))
        self.last_discriminator_accuracy = correct / count if count else None

    # ---- state ------------------------------------------------------------------------------

    def modules(self) -> list[torch.nn.Module]:
        return [] if self.discriminator is None else [self.discriminator]

    def state_dict(self) -> dict:
        state: dict = {"steps": self.steps}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])


class _Ranks:
    """This rank's side of a data-parallel ASTMT step: the trainer's DistributedStep's process
    group and gradient sync, and every parameter the step trains (the model's, the
    discriminator's)."""

    def __init__(self, parallel: Any, params: list[torch.Tensor]) -> None:
        self.world, self.group, self.synced = parallel.world, parallel.group, parallel.synced
        self.grads = parallel.grads
        self.params = params

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed over the ranks (one all-reduce, float64)."""
        vec = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(vec, group=self.group)
        return vec.tolist()
