"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018): task weights learned so that
each task's gradient norm at a shared layer follows its relative training rate (Sec. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._base import Balancer, _finite

__all__ = ["GradNorm"]


class GradNorm(Balancer):
    """Weights w_i, updated after every step to reduce GradNorm's loss (Sec. 3.1, Eq. 2)::

        G_i   = ||grad_W (w_i L_i)||                       at one shared layer W
        r_i   = (L_i / L_i(0)) / mean_j (L_j / L_j(0))     the inverse training rate
        L_grad = mean_i | G_i - [mean_j G_j] * r_i^alpha |  the bracket a constant

    then ``sum_i w_i = T`` again (renormalised after every update, so that balancing does not
    change the global learning rate). Only the w_i are updated by L_grad, with their own Adam
    optimiser (paper: learning rate 0.025, Sec. 5.5), created once with the balancer and
    checkpointed with it; all w_i start at 1.

    The gradient of L_grad with respect to w is exact without double backprop: ``G_i = |w_i|
    ||grad_W L_i||`` is linear in w_i and the target is a constant, so
    ``dL_grad/dw_i = mean_c sign(G_ic - target_ic) sign(w_i) ||grad_W L_i||_c / T``. It needs
    each task's gradient at W only, which the engine obtains from each task's gradient at the
    branching point through the last trunk segment's kept graph (no second trunk pass), one task
    at a time, keeping only its norms.

    Departures from public implementations, which the paper does not support: weights
    renormalised to sum to T (not 1); one Adam for the whole run (not one per step); L_grad
    reaches the weights only (never the network); W is one layer (LibMTL uses every shared
    parameter) and the weights are renormalised, not ``T * softmax(logits)`` (LibMTL).

    Args:
        tasks: the task names.
        alpha: the asymmetry (paper: 0.12 on the toy, 1.5 on NYUv2).
        lr: the learning rate of the weights' Adam (betas, eps as given).
        layer: the shared layer W, a module name in the shared network (exact, or a suffix after
            a '.'): its ``weight`` is W, its bias left out (Sec. 3.1). None: the last module, in
            registration order, with a weight of two or more dimensions (for an
            ``nn.Sequential`` trunk, its last layer).
        per_channel: norms per filter channel (G_i a vector over W's output channels, one
            L_grad term each) or of the whole matrix. None (default): per filter channel for a
            convolution (a weight of 3+ dimensions), whole matrix for a dense layer, which is what
            Sec. 3.1 prescribes ("for convolutional filters, we separately consider the gradient
            norms of each filter channel, while for dense layers we consider the matrix norm of
            the full affine transformation matrix"). False: one norm of the whole weight, the
            reading of public implementations.
        initial_steps: L_i(0) is the mean of task i's first ``initial_steps`` losses (1: its loss
            at the first step it ran, the paper's).
        min_weight: after each Adam step, weights below it are raised to it (then renormalised,
            so they stay positive). Not in the paper, which never says what keeps a weight
            positive, but needed: near an equilibrium weight smaller than Adam's step (the toy's
            sigma = 100 task settles near 0.02 with steps of 0.025) the weight crosses zero, and a
            negative weight makes the network ascend that task's loss (the toy then diverged).
            None: no floor, the paper's update as written.

    State: ``task_weights`` (T,), ``initial_losses`` and ``initial_counts`` (T,), ``steps``, the
    optimiser's moments. After each update, ``last_loss`` (L_grad) and ``last_grad``
    (dL_grad/dw, (T,)) hold what it used (not state).

    With ``min_weight=None`` a weight can reach 0: its task's gradient at W is then 0, from which
    the engine (which sees ``w_i grad L_i``) cannot recover ||grad_W L_i||, and it stays there.
    """

    needs = "layer"

    def __init__(
        self,
        tasks: Sequence[str],
        alpha: float = 1.5,
        lr: float = 0.025,
        layer: str | None = None,
        per_channel: bool | None = None,
        initial_steps: int = 1,
        min_weight: float | None = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks)
        if not alpha >= 0:
            raise ValueError(f"alpha must be non-negative, got {alpha!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError(f"layer must be a module name or None, got {layer!r}")
        if per_channel is not None and not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be True, False or None, got {per_channel!r}")
        if (
            isinstance(initial_steps, bool)
            or not isinstance(initial_steps, int)
            or initial_steps < 1
        ):
            raise ValueError(f"initial_steps must be an int >= 1, got {initial_steps!r}")
        if min_weight is not None and not 0 < min_weight < 1:
            raise ValueError(f"min_weight must be in (0, 1) or None, got {min_weight!r}")
        self.alpha, self.layer, self.per_channel = float(alpha), layer, per_channel
        self.min_weight = min_weight
        self.initial_steps = initial_steps
        t = self.num_tasks
        self.task_weights = nn.Parameter(torch.ones(t))
        self.register_buffer("initial_losses", torch.zeros(t))
        self.register_buffer("initial_counts", torch.zeros(t, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.Adam([self.task_weights], lr=lr, betas=tuple(betas), eps=eps)
        self.layer_name: str | None = None  # the module W was found at
        self.last_loss: float | None = None
        self.last_grad: torch.Tensor | None = None
        self._norms: dict[str, torch.Tensor] = {}  # this step: task -> ||grad_W L_i|| per channel
        self._cache: tuple[tuple[int, ...], list[torch.Tensor]] | None = None

    def _weights(self) -> torch.Tensor:
        return self.task_weights

    # ---------------------------------------------------------------------------- W

    def shared_layer(self, shared: nn.Module | Sequence[nn.Module]) -> list[torch.Tensor]:
        """``[W]``: the weight of ``layer`` (or of the last layer) in ``shared``.

        ``shared`` is a module, or a list of modules named ``"0"``, ``"1"``, ... (the engine's
        trunk, as ``nn.Sequential`` names them).
        """
        mods = [shared] if isinstance(shared, nn.Module) else list(shared)
        key = tuple(id(m) for m in mods)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if isinstance(shared, nn.Module):
            named = list(shared.named_modules())
        else:
            named = [
                (n, m) for i, top in enumerate(mods) for n, m in top.named_modules(prefix=str(i))
            ]
        weighted = [
            (n, m)
            for n, m in named
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2
        ]
        if self.layer is None:
            if not weighted:
                raise ValueError("GradNorm: the shared network has no layer with a 2+-dim weight")
            name, module = weighted[-1]
        else:
            found = [(n, m) for n, m in named if n == self.layer or n.endswith("." + self.layer)]
            if len(found) != 1:
                what = (
                    "no module" if not found else f"{len(found)} modules ({[n for n, _ in found]})"
                )
                raise ValueError(
                    f"GradNorm layer={self.layer!r}: {what} of that name in the shared network "
                    f"(layers with weights: {[n for n, _ in weighted][-8:]}...)"
                )
            name, module = found[0]
            if (
                not isinstance(getattr(module, "weight", None), torch.Tensor)
                or module.weight.dim() < 2
            ):
                raise ValueError(
                    f"GradNorm layer={self.layer!r}: {name!r} has no weight of 2+ dims"
                )
        if not module.weight.requires_grad:
            raise ValueError(f"GradNorm: the weight of layer {name!r} does not require grad")
        self.layer_name = name
        self._cache = (key, [module.weight])
        return self._cache[1]

    def _norm(self, grad: torch.Tensor) -> torch.Tensor:
        """(C,) norms per output channel, or (1,) of the whole weight."""
        per_channel = grad.dim() > 2 if self.per_channel is None else self.per_channel
        if per_channel:
            return torch.linalg.vector_norm(grad.flatten(1), dim=1)
        return torch.linalg.vector_norm(grad).reshape(1)

    def observe(self, task: str, grads: Sequence[torch.Tensor]) -> None:
        (grad,) = grads
        i = self.tasks.index(task)
        w = self.task_weights.detach()[i].abs().to(grad.device, torch.float64)
        g = self._norm(grad.detach()).double()
        # G_i = |w_i| ||grad_W L_i||: the engine passes grad_W (w_i L_i)
        self._norms[task] = torch.where(w > 0, g / w.clamp(min=1e-300), torch.zeros_like(g))

    # ---------------------------------------------------------------------------- the update

    def update(self, losses: Mapping[str, torch.Tensor]) -> None:
        norms, self._norms = self._norms, {}
        idx = [i for i in self._present(list(losses)) if self.tasks[i] in norms]
        if not idx:
            return
        names = [self.tasks[i] for i in idx]
        if not _finite([losses[t] for t in names]) or not all(
            bool(torch.isfinite(norms[t]).all()) for t in names
        ):
            return
        w = self.task_weights
        with torch.no_grad():
            index = torch.tensor(idx, device=w.device)
            values = torch.stack([losses[t].detach().to(w.device, torch.float64) for t in names])
            counts = self.initial_counts[index]
            fresh = counts < self.initial_steps
            if bool(fresh.any()):  # L_i(0): the running mean of the first initial_steps losses
                old = self.initial_losses[index].double()
                mean = (old * counts + values) / (counts + 1)
                self.initial_losses[index] = torch.where(fresh, mean, old).to(self.initial_losses)
                self.initial_counts[index] = counts + fresh.long()
            n = torch.stack([norms[t].to(w.device) for t in names])
            loss, grad = self._loss_and_grad(n, values, index)
            full = torch.zeros_like(w)
            full[index] = grad.to(w)
            w.grad = full
        self.optimizer.step()
        w.grad = None
        with torch.no_grad():
            if self.min_weight is not None:
                w.clamp_(min=self.min_weight)
            w.mul_(self.num_tasks / w.sum())  # sum_i w_i = T (Sec. 3.1)
            self.steps += 1
        self.last_loss, self.last_grad = float(loss), full

    def _loss_and_grad(
        self, n: torch.Tensor, values: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_grad and its exact gradient with respect to the present tasks' weights.

        Shapes: n (P, C) the unweighted norms ||grad_W L_i|| (C channels, or 1); values (P,) the
        losses; index (P,) the tasks' positions; returns a 0-dim loss and (P,) gradient.
        """
        w = self.task_weights.detach()[index].double()
        big_g = w.abs()[:, None] * n  # G_i per channel
        ratio = values / self.initial_losses[index].double()
        r = ratio / ratio.mean()
        target = big_g.mean(0, keepdim=True) * r[:, None] ** self.alpha  # a constant (Sec. 3.1)
        diff = big_g - target
        loss = diff.abs().mean()  # (1/T) sum_i, each the mean over channels
        grad = (diff.sign() * w.sign()[:, None] * n).mean(1) / len(index)
        return loss, grad

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, alpha={self.alpha}, layer={self.layer!r}"
