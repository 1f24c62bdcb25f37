"""The protocol every balancing method follows, and the plain-autograd ``backward`` they share.

A balancer turns one step's per-task losses (and, for the methods that need them, per-task
gradients) into the gradient that reaches the shared parameters, then updates its own state.
The same object serves three callers:

* a user's own loop: ``balancer.backward(losses, features)`` after the forward pass;
* the memory engine: ``multi_branch_step(..., balancer=balancer)``, which hands it each task's
  gradient at the branching point (or at a shared layer) as the branches run, without a second
  backward through the trunk;
* the trainer (``balancing.name`` in the config), which also checkpoints its ``state_dict``.

What a method needs (:attr:`Balancer.needs`):

* ``"none"``: the losses alone (fixed weights, uncertainty weighting, DWA);
* ``"layer"``: each task's gradient at the weight of one shared layer W (GradNorm), one task
  at a time, reduced to its norms at once: T branching-point gradients are never held together;
* ``"features"``: every task's gradient at the shared representation, all at once (MGDA-UB,
  PCGrad, CAGrad): T representation-sized gradients, never T trunk graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = ["Balancer"]

Needs = Literal["none", "layer", "features"]


def _float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class Balancer(nn.Module):
    """Base class of the balancing methods: per-task losses (and gradients) in, a backward out.

    Subclasses set :attr:`needs` and implement :meth:`_weights` and, as their kind requires,
    :meth:`observe` (``"layer"``), :meth:`combine` (``"features"``) and :meth:`update`. Their
    whole state (weights, counters, their own optimiser's moments) is in ``state_dict()``.

    Args:
        tasks: the task names, distinct, in a fixed order (the order of :attr:`weights`).

    Shapes: losses 0-dim tensors; gradients shaped like what they are the gradient of.
    """

    #: what the engine must hand over (see the module docstring)
    needs: ClassVar[Needs] = "none"

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be a list of task names, got {tasks!r}")
        tasks = tuple(tasks)
        if not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(
                f"tasks must be a non-empty list of non-empty names, got {list(tasks)}"
            )
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tasks

    # ---------------------------------------------------------------------------- weights

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _weights(self) -> torch.Tensor:
        """The current weights, (T,) in the order of :attr:`tasks`."""
        raise NotImplementedError

    @property
    def weights(self) -> dict[str, float]:
        """task -> current weight. Loss-weighting methods: the factor the next step multiplies the
        task's loss by. Gradient methods: the coefficient of the task's gradient in the shared
        gradient of the last step (``sum_t weights[t] * grad_t``)."""
        return dict(zip(self.tasks, self._weights().detach().double().cpu().tolist()))

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        """task -> the factor its loss is multiplied by before its backward.

        That weighted loss's gradient is what the task's own (head) parameters receive, and, for
        methods whose ``needs`` is not ``"features"``, what it contributes to the shared ones.
        Gradient methods return 1.0: heads get their task's own gradient, as in MGDA-UB (Sener &
        Koltun, Alg. 2), PCGrad and CAGrad, whose combination concerns the shared parameters.
        """
        if self.needs == "features":
            return dict.fromkeys(self.tasks, 1.0)
        w = self._weights().detach().clone()
        return {t: w[i] for i, t in enumerate(self.tasks)}

    # ---------------------------------------------------------------------------- hooks

    def shared_layer(self, shared: nn.Module | Sequence[nn.Module]) -> list[torch.Tensor]:
        """``"layer"`` methods: the parameters W of the shared layer whose gradients they observe."""
        raise NotImplementedError(f"{type(self).__name__} observes no shared layer")

    def observe(self, task: str, grads: Sequence[torch.Tensor]) -> None:
        """``"layer"`` methods: ``grads`` is the gradient of ``loss_weights()[task] * L_task`` with
        respect to each of :meth:`shared_layer`'s parameters, for one task of this step."""
        raise NotImplementedError(f"{type(self).__name__} observes no gradients")

    def combine(
        self, grads: Mapping[str, Sequence[torch.Tensor]], losses: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """``"features"`` methods: the shared representation's gradient from each task's.

        ``grads[t]`` is task t's gradient at the representation's floating tensors (in the order of
        ``tree_flatten``), for every task that ran; returns one tensor per position.
        """
        raise NotImplementedError(f"{type(self).__name__} combines no gradients")

    def update(self, losses: Mapping[str, torch.Tensor]) -> None:
        """The end of a step: ``losses`` task -> 0-dim (unweighted) loss of the tasks that ran.

        Methods with state update it here; a step with a non-finite loss (or observed gradient)
        leaves the state as it was.
        """

    # ---------------------------------------------------------------------------- plain autograd

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        features: Any,
        shared: nn.Module | Sequence[nn.Module] | None = None,
    ) -> torch.Tensor:
        """Backpropagates the balanced losses in a plain autograd loop, then updates the state.

        For ``"features"`` methods, each task's gradient at ``features`` (``autograd.grad``, one
        pass through the heads per task), then one backward of the weighted losses whose gradient
        at ``features`` is replaced by :meth:`combine`'s (a tensor hook), so the trunk's backward
        runs once. For ``"layer"`` methods, each task's gradient at the layer W of ``shared``,
        then one ordinary backward. Accumulates into ``.grad`` like ``loss.backward()``.

        Args:
            losses: task -> 0-dim loss with its graph, for some or all of :attr:`tasks`.
            features: the shared representation the heads took (a tensor or a tuple/list of
                tensors), part of the losses' graph.
            shared: the shared network (a module or a list of modules), where ``"layer"``
                methods find W; ignored by the others.

        Returns: the 0-dim weighted total (detached).
        """
        losses = self._check_losses(losses)
        hw = self.loss_weights()
        weighted = {t: (l if _is_one(hw[t]) else l * _on(hw[t], l)) for t, l in losses.items()}
        leaves = [t for t in tree_flatten(features)[0] if _float_tensor(t)]
        if not leaves or not all(t.requires_grad for t in leaves):
            raise ValueError(
                "features must be the tensor (or tensors) the heads took, requiring grad; "
                f"got {type(features).__name__}"
            )
        handles = []
        if self.needs == "layer":
            if shared is None:
                raise ValueError(
                    f"{type(self).__name__}.backward needs shared= (the shared network)"
                )
            params = self.shared_layer(shared)
            for t, l in weighted.items():
                g = torch.autograd.grad(l, params, retain_graph=True, allow_unused=True)
                self.observe(
                    t, [torch.zeros_like(p) if x is None else x for x, p in zip(g, params)]
                )
        elif self.needs == "features":
            grads = {}
            for t, l in weighted.items():
                g = torch.autograd.grad(l, leaves, retain_graph=True, allow_unused=True)
                grads[t] = [torch.zeros_like(f) if x is None else x for x, f in zip(g, leaves)]
            combined = self.combine(grads, {t: l.detach() for t, l in losses.items()})
            del grads
            for leaf, c in zip(leaves, combined):
                handles.append(leaf.register_hook(lambda _g, c=c: c))
        total = sum(list(weighted.values())[1:], next(iter(weighted.values())))
        try:
            total.backward()
        finally:
            for h in handles:
                h.remove()
        self.update({t: l.detach() for t, l in losses.items()})
        return total.detach()

    def _check_losses(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError(
                f"losses must be a non-empty mapping task -> 0-dim tensor, got {losses!r}"
            )
        unknown = [t for t in losses if t not in self.tasks]
        if unknown:
            raise ValueError(f"losses has task {unknown[0]!r}, not one of tasks {list(self.tasks)}")
        out = {}
        for t in self.tasks:  # in the balancer's order, whatever the mapping's
            if t not in losses:
                continue
            l = losses[t]
            if not isinstance(l, torch.Tensor) or l.numel() != 1:
                raise ValueError(f"losses[{t!r}] must be a one-element tensor, got {l!r}")
            out[t] = l.reshape(())
        return out

    def _present(self, names: Sequence[str]) -> list[int]:
        """Indices in :attr:`tasks` of ``names`` (the tasks of this step), in the balancer's order."""
        return [i for i, t in enumerate(self.tasks) if t in names]

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


def _is_one(w: float | torch.Tensor) -> bool:
    return isinstance(w, float) and w == 1.0


def _on(w: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return w.to(like.device) if isinstance(w, torch.Tensor) else w


def _finite(values: Sequence[torch.Tensor]) -> bool:
    """All of ``values`` finite; one host sync for the lot."""
    if not values:
        return True
    return bool(torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in values])).all())


# ------------------------------------------------------------------------------------ gradients


def gram(grads: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """The Gram matrix of T gradients, each given as a list of tensors (one vector, in pieces).

    ``M[i, j] = sum_k <grads[i][k], grads[j][k]>``, accumulated in float64 on the host: the
    solvers that read it (min-norm, CAGrad's dual) are sensitive to rounding. No T x D stack is
    ever made: T(T+1)/2 dot products of the pieces as they are.

    Shapes: T lists of tensors of matching shapes; returns (T, T) float64.
    """
    t = len(grads)
    entries = []
    for i in range(t):
        for j in range(i, t):
            dots = [torch.dot(_flat(a), _flat(b)).double() for a, b in zip(grads[i], grads[j])]
            entries.append(
                torch.stack(dots).sum() if dots else torch.zeros((), dtype=torch.float64)
            )
    values = torch.stack(entries).cpu().numpy() if entries else np.zeros(0)
    m = np.zeros((t, t))
    k = 0
    for i in range(t):
        for j in range(i, t):
            m[i, j] = m[j, i] = values[k]
            k += 1
    return m


def _flat(x: torch.Tensor) -> torch.Tensor:
    # half-precision dot products would lose the digits the solvers need
    return x.reshape(-1) if x.dtype in (torch.float32, torch.float64) else x.reshape(-1).float()


def combination(
    grads: Sequence[Sequence[torch.Tensor]], coefficients: np.ndarray
) -> list[torch.Tensor]:
    """``sum_t coefficients[t] * grads[t]``, piece by piece, into fresh tensors.

    Shapes: T lists of K tensors; coefficients (T,); returns K tensors.
    """
    out = []
    for k in range(len(grads[0])):
        acc = grads[0][k] * float(coefficients[0])
        for t in range(1, len(grads)):
            acc.add_(grads[t][k], alpha=float(coefficients[t]))
        out.append(acc)
    return out
