"""One training step's backward over a shared trunk and many task branches (UberNet Sec. 4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._balance import BalanceRun
from ._context import running
from ._graph import reaches
from ._plan import Branch, StepPlan, index_rows
from ._replay import device_types_of, no_autocast
from ._segments import (
    CheckpointedTrunk,
    _is_float_tensor,
    run_modules,
    split_segments,
    trunk_modules,
)

__all__ = ["StepResult", "multi_branch_step"]

STRATEGIES = ("naive", "recompute")

# The argument types of multi_branch_step. A "tree" is a tensor or a (nested) tuple, list or dict
# of tensors, as torch.utils._pytree flattens it (multi-scale features, a structured target).
TensorTree = torch.Tensor | Sequence[Any] | Mapping[str, Any]
Trunk = nn.Sequential | nn.ModuleList | Sequence[nn.Module]
Heads = nn.ModuleDict | Mapping[str, Callable[[TensorTree], Any]]
LossFn = Callable[[Any, Any], torch.Tensor]
Weight = float | torch.Tensor


@dataclass
class StepResult:
    """What one :func:`multi_branch_step` computed; every tensor is detached.

    Attributes:
        losses: task -> 0-dim loss, unweighted: ``loss_fns[task]`` on the samples labelled for
            the task (UberNet Eq. 4: the loss function averages over them).
        total: 0-dim ``sum_t weights[t] * losses[t]``, the loss whose gradient was accumulated.
        ran: tasks whose loss was computed, in the order of ``heads``.
        skipped: tasks with no labelled sample in the batch; a head all of whose tasks are
            skipped did not run, and its parameters' ``.grad`` is untouched.
        task_grads: with ``keep_task_grads``, task -> gradient of ``weights[t] * losses[t]`` with
            respect to the trunk output (the branching point), for every task in ``ran``: the
            trunk output's structure (a tensor or tuple of tensors), full batch shape, zero on
            samples not labelled for the task and on outputs the task does not use (None for
            non-floating outputs). Their sum is the gradient the trunk's backward starts from.
            None without ``keep_task_grads``.
        nonfinite: (property) the tasks in ``ran`` whose loss is not finite.

    Shapes: losses[t] and total 0-dim; task_grads[t] like the trunk output, (N, ...) each.
    """

    losses: dict[str, torch.Tensor]
    total: torch.Tensor
    ran: list[str]
    skipped: list[str]
    task_grads: dict[str, Any] | None = None

    @property
    def nonfinite(self) -> list[str]:
        """Tasks whose loss is NaN or infinite (their gradients then are too), in ``ran`` order.

        Computed when read, from the losses alone: a step whose losses are all finite pays
        nothing for it. A finite loss can still give a non-finite gradient (an overflow in a
        backward); check the gradients' norm for that, as :class:`mtlfast.train.Trainer` does.
        """
        return [t for t in self.ran if not bool(torch.isfinite(self.losses[t]))]


def multi_branch_step(
    trunk: Trunk,
    heads: Heads,
    images: TensorTree,
    targets: Mapping[str, TensorTree],
    loss_fns: Mapping[str, LossFn],
    *,
    labeled: Mapping[str, torch.Tensor] | None = None,
    weights: Mapping[str, Weight] | None = None,
    strategy: Literal["recompute", "naive"] = "recompute",
    segments: int | None = None,
    keep_task_grads: bool = False,
    balancer: Any = None,
) -> StepResult:
    """Forward and backward of a multi-task network, accumulating every parameter's ``.grad``.

    The loss is UberNet's Eq. 4: ``sum_t w_t * loss_t`` where ``loss_t`` is ``loss_fns[t]`` on
    the samples labelled for task t only (the loss function is expected to average).

    ``strategy="recompute"`` (UberNet Sec. 4): the trunk runs under ``no_grad`` keeping only its
    segments' inputs (about sqrt(L) anchors); its output is detached; each branch then runs its
    forward on the samples labelled for it, its backward into its parameters and the branching
    point, and frees everything before the next one; finally the trunk runs backward once from
    the summed branch-point gradient, recomputing its segments from their anchors, last first.
    The last of two or more segments is not recomputed: its graph is kept from the forward, as
    ``torch.utils.checkpoint.checkpoint_sequential`` does. Peak memory is the anchors plus the
    last segment's activations plus the larger of one branch and one recomputed segment,
    whatever the number of tasks; ``segments=1`` recomputes the whole trunk (least memory).
    ``strategy="naive"``: plain autograd over the whole graph, every head on every sample, the
    baseline. Both leave the same ``.grad`` (to float rounding) and the same buffers and global
    RNG state; they accumulate into existing ``.grad`` like ``loss.backward()``.

    Lazy evaluation: a task with no labelled sample is skipped; a head runs only if one of its
    tasks has a labelled sample, in both strategies, so a skipped head's ``.grad`` stays as it was
    (None on a fresh model). A joint decoder (a head returning a dict) runs, in recompute mode, on
    the union of its tasks' labelled samples, and each task's loss uses the rows labelled for it.

    Heads must not modify their input in place: other heads share it (in recompute mode autograd
    refuses it on the full batch; in naive mode later heads would silently see the change).

    Equality with naive under partial labels holds for heads whose per-sample outputs do not
    depend on the other samples of the batch: batch-statistics BatchNorm (or dropout) in a head
    sees different batches (or draws different masks) when the head runs on fewer samples. In the
    trunk, which always runs on the whole batch, batch norm, dropout and autocast are replayed
    exactly (``SegmentReplay`` in ``mtlfast/engine/_replay.py``). Backward passes run with autocast
    off, as torch recommends; recomputed forwards run under the autocast state of the first.

    Args:
        trunk: nn.Sequential, nn.ModuleList or list of modules, each module's output being the
            next one's single argument (a tuple is passed whole, like nn.Sequential); the last
            output, a tensor or a tuple of tensors (e.g. multi-scale features), is the shared
            representation.
        heads: name -> module taking the representation and returning either the prediction of
            task ``name``, or a dict task -> prediction (a joint decoder such as MTI-Net's). A
            joint decoder should list its tasks in a ``tasks`` attribute: then it can be skipped
            and its inputs checked before anything runs; without it, it runs on every sample.
        images: (N, ...) tensor (or a tuple of them), the first module's input.
        targets: task -> (N, ...) target (or a structure of such tensors).
        loss_fns: task -> ``fn(prediction, target) -> 0-dim tensor``, given labelled rows only.
        labeled: task -> (N,) bool, whether each sample carries the task's label; None, or a
            task missing from it, means every sample does. A task missing from it whose
            '/'-separated components include one key of ``labeled`` takes that key's flags: a
            deep-supervision prediction (``"deep_supervision/scale_0/semseg"``, UberNet's
            ``"semseg/scale_0.5"``) is labelled where its task is, even when ``labeled`` is not
            expanded with ``model.expand``. Several such components raise ValueError, and so
            does a key that is neither a predicted task nor a component one inherits from.
        weights: task -> float (or one-element tensor) w_t; 1 when missing.
        strategy: "recompute" or "naive".
        segments: the number of trunk segments (anchors) in recompute mode, in [1, L]; default
            round(sqrt(L)). Checked, then unused, in naive mode.
        keep_task_grads: also return each task's gradient at the branching point.
        balancer: an ``mtlfast.balancing`` method (None: the losses as weighted). Its
            ``loss_weights()`` multiply ``weights`` (a deep-supervision key takes its task's);
            per its ``needs``, each task's gradient at the branching point is handed to it as the
            branches run (GradNorm: carried to its shared layer through the last segment's kept
            graph, one task at a time; MGDA, PCGrad, CAGrad: all kept, then combined into the
            gradient the trunk's backward starts from, the last segment then recomputed like
            the others so that its graph is not alive next to them); then its state is updated.
            Never a second trunk pass: memory grows by at most T branching-point gradients.

    Shapes: images (N, ...); targets[t] (N, ...); labeled[t] (N,) bool; predictions (K, ...) for
    the K rows a head ran on; returns a :class:`StepResult`.

    Raises:
        ValueError: unknown strategy; segments out of range; empty heads; a task without a loss
            function or target; weights for a task no head predicts; a ``labeled`` key that no
            predicted task uses (its own flags or a component's); labels, flags or trunk
            outputs whose batch size is not N; a prediction that does not depend on the
            representation; a joint head returning other tasks than it declares.
        TypeError: malformed arguments (e.g. ``labeled[t]`` not a bool tensor).
        Errors found only when a head runs (its returned tasks, its dependence on the
        representation, an unknown ``labeled`` key when a head does not declare its tasks) are
        raised before that head's backward, but in recompute mode after the backward of the
        heads before it. Likewise, an exception raised by a loss function (or a head) propagates
        as is, and in recompute mode the ``.grad`` of every earlier head's parameters (and of the
        trunk's, never) already holds that head's gradient: nothing is restored, so zero the
        gradients before retrying (``optimizer.zero_grad()``). In naive mode nothing is written.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    modules = trunk_modules(trunk)
    bounds = split_segments(len(modules), segments)
    plan = StepPlan(heads, images, targets, loss_fns, labeled, weights)
    result = StepResult(losses={}, total=None, ran=[], skipped=list(plan.skipped))  # type: ignore[arg-type]
    if keep_task_grads:
        result.task_grads = {}
    terms: list[torch.Tensor] = []
    balance = BalanceRun(balancer, modules, plan) if balancer is not None else None
    if plan.branches:  # nothing labelled at all: nothing runs, not even the trunk
        run = _naive if strategy == "naive" else _recompute
        with running(strategy):
            run(modules, bounds, plan, images, result, terms, keep_task_grads, balance)
        if balance is not None:
            balance.finish(balance.task_losses(result, plan))
    # summed one by one: losses may differ in dtype (autocast) and type promotion sorts it out
    result.total = sum(terms[1:], terms[0]) if terms else torch.zeros((), device=plan.device)
    return result


def _branch_losses(
    plan: StepPlan,
    branch: Branch,
    x: Any,
    inputs: list[torch.Tensor],
    result: StepResult,
    naive: bool,
    balance: BalanceRun | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Runs one head on ``x``; returns (task, w_t * loss_t) for its tasks with labelled samples.

    ``inputs`` are the branch's own (non-leaf) views of the representation's tensors: the check
    that each prediction depends on them walks the head's graph before any backward.
    """
    preds = plan.predictions(branch, branch.head(x))
    ran_on = plan.batch_size if naive else branch.rows.count
    out = []
    for task, pred in preds.items():
        rows = plan.task_rows(task)
        if rows.count == 0:
            if task not in result.skipped:
                result.skipped.append(task)
            continue
        leaves = [t for t in tree_flatten(pred)[0] if isinstance(t, torch.Tensor)]
        for t in leaves:
            if t.dim() == 0 or t.shape[0] != ran_on:
                raise ValueError(
                    f"head {branch.name!r} returned a prediction for task {task!r} of shape "
                    f"{tuple(t.shape)}; it ran on {ran_on} samples, so the first dimension must be {ran_on}"
                )
        if not reaches(leaves, inputs):
            raise ValueError(
                f"the prediction of head {branch.name!r} for task {task!r} does not depend on the "
                "trunk output it was given (a constant or parameter-only tensor?)"
            )
        pick = rows.index if naive else plan.positions(rows, branch.rows)
        loss = plan.loss(task, index_rows(pred, pick), plan.target(task, rows))
        w = plan.weight(task)
        if balance is not None:
            w = balance.weight(task, w)
        weighted = loss if isinstance(w, float) and w == 1.0 else loss * w
        result.losses[task] = loss.detach()
        result.ran.append(task)
        out.append((task, weighted))
    return out


def _full_grads(
    grads: list[torch.Tensor | None],
    inputs: list[Any],
    reps: list[Any],
    index: torch.Tensor | None,
    spec: Any,
) -> Any:
    """Gradients at a branch's inputs scattered into the full batch, in the representation's structure.

    Shapes: grads[k] (K, ...) for the branch's K rows; reps[k] (N, ...); returns (N, ...) each.
    """
    it = iter(grads)
    full = []
    for x, rep in zip(inputs, reps):
        if not _is_float_tensor(x):
            full.append(None)
            continue
        g = next(it)
        if g is None:
            full.append(torch.zeros_like(rep))
        elif index is None:
            full.append(g)
        else:
            full.append(torch.zeros_like(rep).index_copy_(0, index.to(g.device), g))
    return tree_unflatten(full, spec)


def _naive(modules, bounds, plan, images, result, terms, keep_task_grads, balance=None) -> None:
    """Plain autograd: trunk and every running head on every sample, one backward of the total."""
    rep = run_modules(modules, images)
    leaves, spec = tree_flatten(rep)
    plan.check_representation(leaves)
    # A trunk without trainable parameters gives an output that is not part of any graph; make
    # it a leaf so heads can be checked and task gradients taken, as in recompute mode.
    leaves = [
        t.detach().requires_grad_() if _is_float_tensor(t) and not t.requires_grad else t
        for t in leaves
    ]
    device_types = device_types_of(images, leaves)
    if balance is not None and balance.needs == "layer":
        balance.set_graph(leaves, device_types)
    wants = keep_task_grads or (balance is not None and balance.wants_grads)
    total = None
    for branch in plan.branches:
        # one view per branch: a node of its own to check the head against and take gradients at
        inputs = [t.view_as(t) if _is_float_tensor(t) else t for t in leaves]
        checked = [t for t in inputs if _is_float_tensor(t)]
        for task, weighted in _branch_losses(
            plan, branch, tree_unflatten(inputs, spec), checked, result, naive=True, balance=balance
        ):
            if wants:
                with no_autocast(device_types):
                    g = torch.autograd.grad(weighted, checked, retain_graph=True, allow_unused=True)
                full = _full_grads(list(g), inputs, leaves, None, spec)
                if keep_task_grads:
                    result.task_grads[task] = full
                if balance is not None:
                    balance.take(task, full)
            terms.append(weighted.detach())
            total = weighted if total is None else total + weighted
        if balance is not None:
            balance.branch_done(branch.name)
    if plan.undeclared:
        plan.check_labeled(final=True)  # the undeclared heads' tasks are known now
    handles = []
    if balance is not None:  # gradient methods: the trunk's gradient replaced by the combination
        handles = balance.hook_outputs(leaves, balance.task_losses(result, plan))
    try:
        if total is not None:
            with no_autocast(device_types):
                total.backward()
    finally:
        for h in handles:
            h.remove()


def _recompute(modules, bounds, plan, images, result, terms, keep_task_grads, balance=None) -> None:
    """UberNet Sec. 4: checkpointed trunk, one branch at a time, one trunk backward."""
    # A gradient method holds T branching-point gradients until the last head is done: with the
    # last segment recomputed too, they are never alive together with its graph, and the step's
    # peak stays that of the trunk's backward up to a T where the gradients alone outgrow it
    # (bench_balancing: MGDA's peak 1.30x from T = 2 to 16 with the graph kept, 1.04x without).
    holds_grads = balance is not None and balance.needs == "features"
    trunk = CheckpointedTrunk(modules, bounds, keep_last=not holds_grads)
    leaves, spec = tree_flatten(trunk.forward(images))
    plan.check_representation(leaves)
    if balance is not None:
        balance.use_trunk(trunk)
    # the branching point: detached leaves whose .grad collects every branch's gradient
    reps = [t.detach().requires_grad_() if _is_float_tensor(t) else t for t in leaves]
    del leaves
    device_types = device_types_of(images, reps)
    for branch in plan.branches:
        # a call per branch: everything the branch allocated dies when it returns
        _recompute_branch(
            plan, branch, reps, spec, result, terms, keep_task_grads, device_types, balance
        )
    if plan.undeclared:
        plan.check_labeled(
            final=True
        )  # the undeclared heads' tasks are known now; before the trunk's backward
    grads = [t.grad if _is_float_tensor(t) else None for t in reps]
    if balance is not None:
        floats = [_is_float_tensor(t) for t in reps]
        grads = balance.start_grads(grads, floats, balance.task_losses(result, plan))
    del reps
    trunk.backward(grads, spec)  # empties `grads` as it goes


def _recompute_branch(
    plan, branch, reps, spec, result, terms, keep_task_grads, device_types, balance=None
) -> None:
    """Forward and backward of one head on its labelled rows, into its parameters and ``reps[k].grad``."""
    index = branch.rows.index
    if index is None:  # every sample: no copy, just a node of the branch's own
        inputs = [t.view_as(t) if _is_float_tensor(t) else t for t in reps]
    else:
        inputs = [
            t.index_select(0, index.to(t.device)) if isinstance(t, torch.Tensor) else t
            for t in reps
        ]
    checked = [t for t in inputs if _is_float_tensor(t)]
    losses = _branch_losses(
        plan, branch, tree_unflatten(inputs, spec), checked, result, naive=False, balance=balance
    )
    if not losses:
        return  # an undeclared joint head none of whose tasks is labelled
    captured: list[torch.Tensor | None] = [None] * len(checked)
    handles = []
    wants = keep_task_grads or (balance is not None and balance.wants_grads)
    if wants and len(losses) == 1:
        # one task: its gradient is the branch's, seen on the way through at no extra cost
        for k, t in enumerate(checked):
            handles.append(
                t.register_hook(lambda g, k=k: captured.__setitem__(k, g.detach().clone()))
            )
    elif wants:
        # a joint decoder: one extra backward through the head per task, then the summed one
        # (per balancer task, not per key, when only the balancer wants them)
        groups = losses if keep_task_grads else balance.group(losses)
        for task, weighted in groups:
            with no_autocast(device_types):
                g = torch.autograd.grad(weighted, checked, retain_graph=True, allow_unused=True)
            full = _full_grads(list(g), inputs, reps, index, spec)
            if keep_task_grads:
                result.task_grads[task] = full
            if balance is not None:
                balance.take(task, full)
    loss = losses[0][1]
    for _, weighted in losses[1:]:
        loss = loss + weighted
    terms.extend(weighted.detach() for _, weighted in losses)
    try:
        with no_autocast(device_types):
            torch.autograd.backward(loss)
    finally:
        for h in handles:
            h.remove()
    if handles:
        full = _full_grads(captured, inputs, reps, index, spec)
        if keep_task_grads:
            result.task_grads[losses[0][0]] = full
        if balance is not None:
            balance.take(losses[0][0], full)
    if balance is not None:
        balance.branch_done(branch.name)
