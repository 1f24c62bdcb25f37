"""Small trunks, heads and a two-strategy runner shared by the engine tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from mtlfast.engine import multi_branch_step

N, C, H = 6, 4, 6  # batch, channels, spatial size: small enough to keep every test fast


def conv_trunk(layers: int = 4, extra: tuple[nn.Module, ...] = ()) -> nn.Sequential:
    """conv/ReLU pairs (``layers`` modules in all), then ``extra`` modules."""
    mods: list[nn.Module] = [nn.Conv2d(3, C, 3, padding=1)]
    while len(mods) < layers:
        mods.append(nn.ReLU() if len(mods) % 2 else nn.Conv2d(C, C, 3, padding=1))
    return nn.Sequential(*mods, *extra)


class Head(nn.Module):
    """conv1x1-ReLU-conv1x1: per-sample, so it gives the same rows on any subset of the batch."""

    def __init__(self, out: int, cin: int = C) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(cin, 8, 1), nn.Conv2d(8, out, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TwoScales(nn.Module):
    """A tensor in, (full resolution, half resolution) out: a multi-scale backbone's last stage."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(C, C, 3, stride=2, padding=1)

    def forward(self, x):
        return x, self.down(x)


class PairConv(nn.Module):
    """A tuple in, a tuple out: lets segment boundaries fall on tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)

    def forward(self, xs):
        f1, f2 = xs
        return torch.relu(self.c1(f1)), torch.tanh(self.c2(f2))


class MultiScaleHead(nn.Module):
    """Uses both scales: the half-resolution score is upsampled and added."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.full, self.coarse = Head(out), Head(out)

    def forward(self, xs):
        f1, f2 = xs
        return self.full(f1) + F.interpolate(self.coarse(f2), size=f1.shape[-2:], mode="nearest")


class JointHead(nn.Module):
    """A joint decoder returning a dict (MTI-Net style): a shared layer, then one layer per task."""

    def __init__(self, outs: dict[str, int], declare: bool = True) -> None:
        super().__init__()
        if declare:
            self.tasks = tuple(outs)
        self.shared = nn.Conv2d(C, 8, 1)
        self.per_task = nn.ModuleDict({t: nn.Conv2d(8, o, 1) for t, o in outs.items()})

    def forward(self, x):
        h = torch.relu(self.shared(x))
        return {t: conv(h) for t, conv in self.per_task.items()}


def seg_loss(pred, target):
    return F.cross_entropy(pred, target)


def targets_for(outs: dict[str, int], n: int = N, size: int = H) -> dict[str, torch.Tensor]:
    """Segmentation targets for the task named 'seg', regression targets for the others."""
    return {
        t: torch.randint(0, o, (n, size, size))
        if t == "seg"
        else torch.randn(n, o, size, size, dtype=torch.float64)
        for t, o in outs.items()
    }


def loss_fns_for(outs) -> dict:
    return {t: seg_loss if t == "seg" else F.mse_loss for t in outs}


def grads(*modules: nn.Module) -> dict[str, torch.Tensor | None]:
    return {f"{i}.{n}": p.grad for i, m in enumerate(modules) for n, p in m.named_parameters()}


def run_both(trunk, heads, images, targets, loss_fns, seed: int = 1, **kwargs):
    """Runs naive and recompute on copies of the same model from the same RNG state.

    Returns {strategy: (trunk copy, heads copy, StepResult, CPU RNG state after the step)}.
    """
    out = {}
    for strategy in ("naive", "recompute"):
        t, h = copy.deepcopy(trunk), copy.deepcopy(heads)
        torch.manual_seed(seed)
        result = multi_branch_step(t, h, images, targets, loss_fns, strategy=strategy, **kwargs)
        out[strategy] = (t, h, result, torch.get_rng_state())
    return out


def assert_same_grads(out, **tol) -> None:
    """Every parameter's .grad equal between strategies, None in one exactly when None in the other."""
    a = grads(out["naive"][0], out["naive"][1])
    b = grads(out["recompute"][0], out["recompute"][1])
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, f"{name}: .grad None in one strategy only"
        else:
            torch.testing.assert_close(b[name], a[name], msg=lambda m, n=name: f"{n}: {m}", **tol)


def assert_same_tree(a, b, **tol) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, **tol)
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y, **tol)
