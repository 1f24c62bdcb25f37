"""A tiny float64 network and a plain-autograd runner shared by the balancing tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mtlfast import balancing
from mtlfast.engine import multi_branch_step

N, C, H = 6, 4, 6
OUTS = {"seg": 3, "depth": 1, "normals": 2}


def network(seed: int = 0, layers: int = 5) -> tuple[nn.Sequential, nn.ModuleDict]:
    """conv/ReLU trunk (its last module a conv) and a conv1x1-ReLU-conv1x1 head per task."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Conv2d(3, C, 3, padding=1)]
    while len(mods) < layers:
        mods.append(nn.ReLU() if len(mods) % 2 else nn.Conv2d(C, C, 3, padding=1))
    trunk = nn.Sequential(*mods).double()
    heads = nn.ModuleDict(
        {
            t: nn.Sequential(nn.Conv2d(C, 8, 1), nn.ReLU(), nn.Conv2d(8, o, 1))
            for t, o in OUTS.items()
        }
    ).double()
    return trunk, heads


def batch(seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, H, H, generator=g, dtype=torch.float64)
    targets = {
        t: torch.randn(N, o, H, H, generator=g, dtype=torch.float64) for t, o in OUTS.items()
    }
    return x, targets


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


LOSS_FNS = dict.fromkeys(OUTS, mse)


def grads_of(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def zero(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def plain_step(trunk, heads, balancer, x, targets, weights=None, labeled=None) -> None:
    """The same step without the engine: losses on the labelled rows, ``balancer.backward``."""
    features = trunk(x)
    losses = {}
    for t, head in heads.items():
        rows = (
            slice(None) if labeled is None or t not in labeled else labeled[t].nonzero().squeeze(1)
        )
        loss = mse(head(features)[rows], targets[t][rows])
        losses[t] = loss * (weights or {}).get(t, 1.0)
    balancer.backward(losses, features, shared=trunk)


def run(mode: str, name: str, steps: int = 3, options=None, weights=None, labeled=None, **kw):
    """``steps`` steps of balancer ``name`` on a fresh network by ``mode`` ("plain", "naive",
    "recompute"); returns (the last step's gradients, the balancer)."""
    trunk, heads = network()
    x, targets = batch()
    b = balancing.create(name, list(OUTS), **(options or {})).double()
    for _ in range(steps):
        zero(trunk, heads)
        if mode == "plain":
            plain_step(trunk, heads, b, x, targets, weights, labeled)
        else:
            multi_branch_step(
                trunk,
                heads,
                x,
                targets,
                LOSS_FNS,
                weights=weights,
                labeled=labeled,
                strategy=mode,
                balancer=b,
                **kw,
            )
    return grads_of(trunk, heads), b


def clone(module):
    return copy.deepcopy(module)
