"""Optimisers with per-group learning-rate multipliers, and the per-step learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig

__all__ = ["LRFactor", "build_optimizer", "build_scheduler"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _multiplier(name: str, multipliers: dict[str, float]) -> float:
    best, factor = -1, 1.0
    for prefix, f in multipliers.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, factor = len(prefix), f
    return factor


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over the trainable parameters of ``model``.

    Parameters are grouped by learning-rate multiplier (``config.lr_multipliers``: a
    parameter-name prefix -> factor, the longest matching prefix winning; e.g. ASTMT's x T for
    the task-specific layers) and, with ``no_weight_decay_on_norms``, by whether they belong to a
    normalisation layer. Each group's ``lr`` is ``config.lr`` times its multiplier; a
    multiplier of 0 freezes its parameters. With ``config.fused`` (the default) torch's fused
    implementation runs where it can: every parameter a floating tensor on CPU or CUDA.
    """
    unknown = [
        p
        for p in config.lr_multipliers
        if not any(n == p or n.startswith(p + ".") for n, _ in model.named_parameters())
    ]
    if unknown:
        raise ValueError(f"optim.lr_multipliers: no parameter name starts with {unknown}")
    norm_params = set()
    if config.no_weight_decay_on_norms:
        for m in model.modules():
            if isinstance(m, _NORMS) or type(m).__name__.endswith("BatchNorm2d"):
                norm_params |= {id(p) for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = _multiplier(name, config.lr_multipliers)
        if mult == 0:
            continue
        wd = 0.0 if id(p) in norm_params else config.weight_decay
        groups.setdefault((mult, wd), []).append(p)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameter")
    param_groups = [
        {"params": ps, "lr": config.lr * mult, "weight_decay": wd}
        for (mult, wd), ps in groups.items()
    ]
    # torch's CPU default is a Python loop of several elementwise passes per tensor; the fused
    # kernel reads and writes each tensor once (bench_optimizer on 2 cores: SGD over MTI-Net's
    # 24.5M parameters 27 -> 15 ms, Adam 65 -> 24 ms; PAD-Net's Adam 163 -> 27 ms)
    fused = config.fused and _fusable(groups.values())
    if config.name == "sgd":
        return (_FusedSGD if fused else torch.optim.SGD)(
            param_groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            **({"fused": True} if fused else {}),
        )
    if fused:
        cls = _FusedAdam if config.name == "adam" else _FusedAdamW
    else:
        cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
    return cls(
        param_groups,
        lr=config.lr,
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        **({"fused": True} if fused else {}),
    )


class _LayoutSafe:
    """What torch's fused optimisers (2.13, CPU) assume and the trainer does not guarantee, made
    true for each group as the step gathers it (after every step pre-hook: AsyncSGD's and
    UsedWeightsOnly's):

    * a parameter's gradient and state tensors have the parameter's strides. The fused kernels
      walk the tensors' memory in order, so a channels-last weight with an NCHW gradient or
      momentum (a layout switched after the optimiser's state was made, a state loaded from
      the other layout) is updated with the wrong elements, silently;
    * SGD's momentum buffers of a group all present or all absent: a parameter stepping for
      the first time next to others that stepped before (a task's head first seen at step k,
      one of AsyncSGD's groups first due) starts from zero momentum, which with no dampening
      is the loop's first step (``0 * momentum + grad = grad``).
    """

    # torch's step calls _init_group once per group, after every step pre-hook (those hooks run
    # around step itself, twice if step were overridden here and called super's)
    def _init_group(self, group, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            self._prepare(group)
        return super()._init_group(group, *args, **kwargs)  # type: ignore[misc]

    def _prepare(self, group: dict) -> None:
        state_of = self.state  # type: ignore[attr-defined]
        stepping = [p for p in group["params"] if p.grad is not None]
        for p in stepping:
            if p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)
            state = state_of.get(p) or {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p).copy_(v)
        if group.get("momentum", 0) != 0 and group.get("dampening", 0) == 0:
            started = [("momentum_buffer" in state_of.get(p, {})) for p in stepping]
            if any(started) and not all(started):
                for p, has in zip(stepping, started):
                    if not has:
                        state_of[p]["momentum_buffer"] = torch.zeros_like(p)


class _FusedSGD(_LayoutSafe, torch.optim.SGD):
    pass


class _FusedAdam(_LayoutSafe, torch.optim.Adam):
    pass


class _FusedAdamW(_LayoutSafe, torch.optim.AdamW):
    pass


def _fusable(groups) -> bool:
    """Whether torch's fused optimisers take these parameters: floating tensors on CPU or CUDA."""
    return all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for ps in groups for p in ps
    )


class LRFactor:
    """The learning-rate factor of step ``s`` (0-based): a linear warm-up from ``warmup_factor``
    to 1 over ``warmup_steps``, then poly ``(1 - s / max_steps) ** power`` (the releases'),
    half-cosine to 0, or constant. A plain object, so the scheduler's state saves as data."""

    def __init__(self, config: ScheduleConfig, max_steps: int) -> None:
        self.kind, self.power = config.kind, config.power
        self.warmup_steps, self.warmup_factor = config.warmup_steps, config.warmup_factor
        self.max_steps = max_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return self.warmup_factor + (1 - self.warmup_factor) * alpha
        progress = min(step / self.max_steps, 1.0)
        if self.kind == "poly":
            return (1.0 - progress) ** self.power
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig, max_steps: int):
    """A ``LambdaLR`` stepping once per training step with :class:`LRFactor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(config, max_steps))
