"""Checks a multi-branch step's inputs and decides which branches run, on which samples."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["Branch", "StepPlan", "TaskRows", "index_rows"]


@dataclass
class TaskRows:
    """The samples of the batch carrying a label (UberNet's delta_{t,i} = 1).

    Shapes: mask (N,) bool and index (K,) int64 positions in the batch, both None when all N
    samples are labelled (no indexing needed); count K (N when all, 0 when none).
    """

    mask: torch.Tensor | None
    index: torch.Tensor | None
    count: int


@dataclass
class Branch:
    """One head, run as one forward (and, in recompute mode, one backward).

    ``tasks``: the head's tasks when known in advance (its name, or its ``tasks`` attribute);
    None for a head returning a dict without declaring ``tasks``, whose tasks are found when it
    runs. ``joint``: the head returns a dict task -> prediction. ``rows``: the samples it runs
    on in recompute mode, the union of its tasks' labelled samples (all N when undeclared).
    """

    name: str
    head: Callable[[Any], Any]
    tasks: tuple[str, ...] | None
    joint: bool
    rows: TaskRows


def index_rows(tree: Any, index: torch.Tensor | None) -> Any:
    """Rows ``index`` of every tensor in ``tree`` (differentiable); ``tree`` itself when index is None.

    Shapes: tensors (N, ...), index (K,) int64; returns tensors (K, ...).
    """
    if index is None:
        return tree
    return tree_map(
        lambda t: t.index_select(0, index.to(t.device)) if isinstance(t, torch.Tensor) else t, tree
    )


def _batch_sizes(tree: Any) -> list[int | None]:
    # None for a 0-dim tensor, which has no batch dimension to index
    return [
        t.shape[0] if t.dim() > 0 else None
        for t in tree_flatten(tree)[0]
        if isinstance(t, torch.Tensor)
    ]


def _items(mapping: Any, what: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if isinstance(mapping, (Mapping, nn.ModuleDict)):
        return dict(mapping.items())
    raise TypeError(f"{what} must be a mapping task -> value, got {type(mapping).__name__}")


class StepPlan:
    """Validated inputs of one step: which branches run, each task's labelled rows, loss and weight.

    Every check that does not need a head to run happens here, before the trunk runs: unknown
    ``weights`` and ``labeled`` keys (:meth:`check_labeled`), a task without a loss function or target, labels or flags whose batch size
    differs from the images', malformed ``labeled`` flags. A head returning a dict without a
    ``tasks`` attribute is checked when it runs.

    Shapes: images (N, ...) (or a structure of such tensors); targets[task] (N, ...);
    labeled[task] (N,) bool.
    """

    def __init__(
        self,
        heads: Any,
        images: Any,
        targets: Any,
        loss_fns: Any,
        labeled: Any,
        weights: Any,
    ) -> None:
        heads = _items(heads, "heads")
        if not heads:
            raise ValueError("heads is empty: a step needs at least one head")
        self.targets = _items(targets, "targets")
        self.loss_fns = _items(loss_fns, "loss_fns")
        self.labeled = _items(labeled, "labeled")
        image_sizes = _batch_sizes(images)
        if not image_sizes or image_sizes[0] is None:
            raise TypeError("images must be a tensor (N, ...) or a structure of such tensors")
        if any(n != image_sizes[0] for n in image_sizes):
            raise ValueError(f"images tensors disagree on the batch size: {image_sizes}")
        self.batch_size: int = image_sizes[0]
        self.device = next(t.device for t in tree_flatten(images)[0] if isinstance(t, torch.Tensor))
        self._rows: dict[str, TaskRows] = {}
        self._owner: dict[str, str] = {}  # task -> head name

        declared: list[tuple[str, Any, tuple[str, ...] | None, bool]] = []
        for name, head in heads.items():
            if not callable(head):
                raise TypeError(
                    f"heads[{name!r}] must be a module (callable), got {type(head).__name__}"
                )
            tasks = getattr(head, "tasks", None)
            if tasks is not None:
                if (
                    not isinstance(tasks, (list, tuple))
                    or not tasks
                    or not all(isinstance(t, str) for t in tasks)
                ):
                    raise TypeError(
                        f"heads[{name!r}].tasks must be a non-empty list or tuple of task names, got {tasks!r}"
                    )
                tasks, joint = tuple(tasks), True
            elif name in self.loss_fns:
                tasks, joint = (name,), False
            else:
                tasks, joint = None, True  # a dict of tasks, found when it runs
            for t in tasks or ():
                self._claim(t, name)
                self._check_task(t)
            declared.append((name, head, tasks, joint))
        undeclared = any(tasks is None for _, _, tasks, _ in declared)

        self.weights: dict[str, Any] = {}
        for task, w in _items(weights, "weights").items():
            if task not in self._owner and not (undeclared and task in self.loss_fns):
                raise ValueError(
                    f"weights has task {task!r}, which no head predicts (tasks: {sorted(self._owner)})"
                )
            if isinstance(w, bool) or not (
                isinstance(w, numbers.Real) or (isinstance(w, torch.Tensor) and w.numel() == 1)
            ):
                raise TypeError(
                    f"weights[{task!r}] must be a float or a one-element tensor, got {w!r}"
                )
            self.weights[task] = float(w) if isinstance(w, numbers.Real) else w.reshape(())

        self.undeclared = undeclared
        self.check_labeled()

        self.branches: list[Branch] = []
        self.skipped: list[str] = []
        for name, head, tasks, joint in declared:
            if tasks is None:
                everyone = TaskRows(None, None, self.batch_size)
                self.branches.append(Branch(name, head, None, True, everyone))
                continue
            rows = [self.task_rows(t) for t in tasks]
            self.skipped += [t for t, r in zip(tasks, rows) if r.count == 0]
            if any(
                r.count for r in rows
            ):  # lazy evaluation: a head with nothing to learn does not run
                self.branches.append(Branch(name, head, tasks, joint, self._union(rows)))

    def check_labeled(self, final: bool = False) -> None:
        """Every key of ``labeled`` must be known: a task some head predicts, or a '/'-separated
        component whose flags such a task inherits (:meth:`_label_source`). A key that is neither
        would be silently ignored (e.g. ``"segm"`` for ``"seg"``, which then trains on every sample).

        With heads that do not declare their tasks, the tasks are known only once they ran: before
        (``final=False``) a key passes if it is, or is a component of, a key of ``loss_fns``; after
        (``final=True``, called by the step once every head ran) the exact rule applies.
        """
        used = {self._label_source(t) for t in self._owner}
        unknown = [k for k in self.labeled if k not in self._owner and k not in used]
        if self.undeclared and not final:
            parts = {part for t in self.loss_fns for part in t.split("/")}
            unknown = [k for k in unknown if k not in self.loss_fns and k not in parts]
        if unknown:
            raise ValueError(
                f"labeled has task {unknown[0]!r}, which no head predicts and no predicted task "
                f"inherits flags from (tasks: {sorted(self._owner)})"
            )

    def _claim(self, task: str, head: str) -> None:
        if task in self._owner:
            raise ValueError(
                f"task {task!r} is predicted by two heads: {self._owner[task]!r} and {head!r}"
            )
        self._owner[task] = head

    def _check_task(self, task: str) -> None:
        """Loss function, labelled flags and (if any sample is labelled) target of ``task``."""
        fn = self.loss_fns.get(task)
        if fn is None:
            raise ValueError(
                f"no loss function for task {task!r}: loss_fns has {sorted(self.loss_fns)}"
            )
        if not callable(fn):
            raise TypeError(f"loss_fns[{task!r}] must be callable, got {type(fn).__name__}")
        if self.task_rows(task).count == 0:
            return  # an unlabelled task needs no target
        if task not in self.targets:
            raise ValueError(f"no target for task {task!r}: targets has {sorted(self.targets)}")
        sizes = _batch_sizes(self.targets[task])
        if not sizes:
            raise TypeError(
                f"targets[{task!r}] must be a tensor (N, ...) or a structure of such tensors"
            )
        if any(n != self.batch_size for n in sizes):
            raise ValueError(
                f"targets[{task!r}] has batch size {sizes[0] if len(set(sizes)) == 1 else sizes}, "
                f"but images have {self.batch_size}"
            )

    def _label_source(self, task: str) -> str | None:
        """The key of ``labeled`` that holds ``task``'s flags: ``task`` itself, else the one
        '/'-separated component of ``task`` that is a key of ``labeled`` (a deep-supervision key
        such as ``"deep_supervision/scale_0/semseg"`` or ``"semseg/scale_0.5"`` inherits the mask
        of ``"semseg"``), else None (every sample is labelled)."""
        if task in self.labeled:
            return task
        parents = [part for part in task.split("/") if part in self.labeled] if "/" in task else []
        if len(parents) > 1:
            raise ValueError(
                f"task {task!r} is not in labeled and could inherit the flags of several of its "
                f"components {parents}: give labeled[{task!r}] explicitly"
            )
        return parents[0] if parents else None

    def task_rows(self, task: str) -> TaskRows:
        """The samples labelled for ``task``, from ``labeled`` at :meth:`_label_source` (None: all)."""
        if task in self._rows:
            return self._rows[task]
        source = self._label_source(task)
        if source is not None and source != task:
            rows = self.task_rows(
                source
            )  # shared: one host sync per mask, however many keys use it
            self._rows[task] = rows
            return rows
        n = self.batch_size
        mask = self.labeled.get(task)
        if mask is None:
            rows = TaskRows(None, None, n)
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = (
                    f"a {mask.dtype} tensor"
                    if isinstance(mask, torch.Tensor)
                    else type(mask).__name__
                )
                raise TypeError(
                    f"labeled[{task!r}] must be a bool tensor of shape ({n},), got {got}"
                )
            if mask.shape != (n,):
                raise ValueError(
                    f"labeled[{task!r}] has shape {tuple(mask.shape)}, but images have batch size {n}: "
                    f"expected ({n},), one flag per sample"
                )
            index = mask.nonzero().squeeze(1)  # the step's one host sync per task
            count = index.numel()
            rows = TaskRows(None, None, n) if count == n else TaskRows(mask, index, count)
        self._rows[task] = rows
        return rows

    def _union(self, rows: list[TaskRows]) -> TaskRows:
        """The samples labelled for any of a joint head's tasks."""
        present = [r for r in rows if r.count]
        if any(r.index is None for r in present):
            return TaskRows(None, None, self.batch_size)
        if len(present) == 1:
            return present[0]
        mask = present[0].mask.clone()
        for r in present[1:]:
            mask |= r.mask.to(mask.device)
        index = mask.nonzero().squeeze(1)
        count = index.numel()
        return (
            TaskRows(None, None, count)
            if count == self.batch_size
            else TaskRows(mask, index, count)
        )

    def positions(self, task: TaskRows, branch: TaskRows) -> torch.Tensor | None:
        """Where ``task``'s labelled samples sit among the rows a branch ran on (None: all of them).

        Shapes: returns (K,) int64 indices into the branch's (M, ...) outputs.
        """
        if branch.index is None:
            return task.index
        if task.count == branch.count:
            return None
        return task.mask.to(branch.index.device).index_select(0, branch.index).nonzero().squeeze(1)

    def predictions(self, branch: Branch, out: Any) -> dict[str, Any]:
        """A head's output as task -> prediction, checked against what the head is known to predict."""
        if not branch.joint:
            return {branch.name: out}
        if not isinstance(out, Mapping):
            if branch.tasks is None:
                raise ValueError(
                    f"no loss function for task {branch.name!r}: head {branch.name!r} returned one "
                    f"prediction, so its name is its task, but loss_fns has {sorted(self.loss_fns)}"
                )
            raise TypeError(
                f"head {branch.name!r} declares tasks {list(branch.tasks)} and must return a dict "
                f"task -> prediction, got {type(out).__name__}"
            )
        if branch.tasks is None:
            for task in out:
                if not isinstance(task, str):
                    raise TypeError(
                        f"head {branch.name!r} returned a dict with a non-str key {task!r}"
                    )
                if self._owner.get(task) != branch.name:
                    self._claim(task, branch.name)
                    self._check_task(task)
            return dict(out)
        for task in out:
            if task not in branch.tasks:
                raise ValueError(
                    f"head {branch.name!r} returned task {task!r}, which is not in its tasks {list(branch.tasks)}"
                )
        missing = [t for t in branch.tasks if t not in out]
        if missing:
            raise ValueError(f"head {branch.name!r} returned no prediction for task(s) {missing}")
        return {t: out[t] for t in branch.tasks}

    def target(self, task: str, rows: TaskRows) -> Any:
        """``targets[task]`` restricted to the samples labelled for it."""
        return index_rows(self.targets[task], rows.index)

    def loss(self, task: str, prediction: Any, target: Any) -> torch.Tensor:
        """``loss_fns[task](prediction, target)``, checked to be one value.

        Shapes: returns a 0-dim tensor.
        """
        loss = self.loss_fns[task](prediction, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = (
                f"shape {tuple(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else type(loss).__name__
            )
            raise ValueError(f"loss_fns[{task!r}] must return a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise ValueError(
                f"the loss of task {task!r} does not require grad: loss_fns[{task!r}] ignores the prediction"
            )
        return loss.reshape(())

    def weight(self, task: str) -> Any:
        """``weights[task]``, 1.0 when not given."""
        return self.weights.get(task, 1.0)

    def check_representation(self, leaves: list[Any]) -> None:
        """The trunk output's tensors must all be batched like the images."""
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor) and (t.dim() == 0 or t.shape[0] != self.batch_size):
                raise ValueError(
                    f"trunk output tensor {i} has shape {tuple(t.shape)}; every tensor of the shared "
                    f"representation must have the images' batch size {self.batch_size} first"
                )
