"""Losses, targets and gradient probes shared by the MTI-Net and PAD-Net tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N, H, W = 2, 37, 45  # odd sizes: every stride-2 step rounds up


def targets_for(outputs: dict[str, int]) -> dict[str, torch.Tensor]:
    """Random targets at (H, W): class maps for semseg/parts, dense maps otherwise."""
    out = {}
    for task, k in outputs.items():
        if task in ("semseg", "parts"):
            out[task] = torch.randint(0, k, (N, H, W))
        else:
            out[task] = torch.randn(N, k, H, W)
    return out


def loss_fns_for(tasks) -> dict:
    def ce(p, t):
        return F.cross_entropy(p, t)

    def l1(p, t):
        return (p - t).abs().mean()

    return {t: ce if t in ("semseg", "parts") else l1 for t in tasks}


def grads_of(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """name -> d loss / d parameter (None where the loss does not depend on it)."""
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return dict(zip(names, grads))


def touched(grads: dict, prefix: str) -> list[str]:
    """Parameters under ``prefix`` with a nonzero gradient."""
    return [
        n
        for n, g in grads.items()
        if n.startswith(prefix) and g is not None and bool(g.abs().sum() > 0)
    ]


def all_params(module: torch.nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in module.named_parameters() if n.startswith(prefix)]


class TinyBackbone(nn.Module):
    """Any 4-scale backbone with channels/strides plugs in (no segments(): one trunk module)."""

    channels = (4, 8, 8, 16)
    strides = (4, 8, 16, 32)

    def __init__(self):
        super().__init__()
        convs, cin = [], 3
        for i, c in enumerate(self.channels):
            convs.append(nn.Conv2d(cin, c, 3, stride=4 if i == 0 else 2, padding=1))
            cin = c
        self.convs = nn.ModuleList(convs)

    def forward(self, x):
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return tuple(out)


def recompute_runs(model, decoder_cls: type, method: str, monkeypatch) -> tuple[dict, dict]:
    """One naive and one recompute engine step, each on a copy of ``model`` in training mode:
    (strategy -> the engine strategy every call of ``decoder_cls.method`` saw, strategy -> the
    state dict after the step). ``method`` is a staticmethod of the decoder."""
    import copy

    from mtlfast.engine import current_strategy, multi_branch_step

    calls: list = []
    original = getattr(decoder_cls, method)

    def counted(*args):
        calls.append(current_strategy())
        return original(*args)

    monkeypatch.setattr(decoder_cls, method, staticmethod(counted))
    x = torch.randn(N, 3, H, W)
    outputs = model.decoder.out_channels
    targets, loss_fns = targets_for(outputs), loss_fns_for(outputs)
    seen, states = {}, {}
    for strategy in ("naive", "recompute"):
        m = copy.deepcopy(model).train()
        calls.clear()
        multi_branch_step(
            m.trunk, m.heads, x, m.expand(targets), m.expand(loss_fns), strategy=strategy
        )
        seen[strategy] = list(calls)
        states[strategy] = {k: v.clone() for k, v in m.state_dict().items()}
    assert current_strategy() is None
    return seen, states
