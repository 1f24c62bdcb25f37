"""Properties of ``multi_branch_step``: for any labelled subset, weights and segment count, the
recompute strategy leaves the gradients of plain autograd; malformed ``labeled`` and ``weights``
raise naming them, before anything runs."""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mtlfast.engine import multi_branch_step

from .strategies import names_argument

N, C = 4, 3
TASKS = ("a", "b", "c")


def _network(seed):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 1), nn.Tanh())
    heads = nn.ModuleDict(
        {t: nn.Sequential(nn.Conv2d(C, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)) for t in TASKS}
    )
    return trunk, heads


def _loss(pred, target):
    return ((pred - target) ** 2).mean()


@st.composite
def steps(draw):
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, 3, 5, 5, generator=g)
    targets = {t: torch.randn(N, 2, 5, 5, generator=g) for t in TASKS}
    labeled = {
        t: torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
        for t in draw(st.lists(st.sampled_from(TASKS), unique=True))
    }
    weights = {
        t: draw(st.floats(0.0, 4.0)) for t in draw(st.lists(st.sampled_from(TASKS), unique=True))
    }
    segments = draw(st.sampled_from([None, 1, 2, 4]))
    return seed, images, targets, labeled, weights, segments


@given(steps())
def test_recompute_leaves_the_gradients_of_naive(step):
    seed, images, targets, labeled, weights, segments = step
    trunk, heads = _network(seed)
    results, grads = [], []
    for strategy in ("naive", "recompute"):
        t, h = copy.deepcopy(trunk), copy.deepcopy(heads)
        loss_fns = dict.fromkeys(TASKS, _loss)
        results.append(
            multi_branch_step(
                t,
                h,
                images,
                targets,
                loss_fns,
                labeled=labeled,
                weights=weights,
                strategy=strategy,
                segments=segments,
            )
        )
        grads.append([p.grad for p in (*t.parameters(), *h.parameters())])
    naive, recompute = results
    assert naive.ran == recompute.ran and sorted(naive.skipped) == sorted(recompute.skipped)
    torch.testing.assert_close(naive.total, recompute.total, rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


_BAD = [
    ("labeled", {"d": torch.ones(N, dtype=torch.bool)}),
    ("labeled", {"a": torch.ones(N)}),
    ("labeled", {"a": torch.ones(N + 1, dtype=torch.bool)}),
    ("labeled", {"a": [True] * N}),
    ("labeled", ["a"]),
    ("weights", {"d": 1.0}),
    ("weights", {"a": "1"}),
    ("weights", {"a": torch.ones(2)}),
    ("weights", {"a": True}),
    ("weights", 3.0),
]


@given(steps(), st.sampled_from(_BAD))
def test_malformed_labeled_and_weights_raise_naming_them(step, bad):
    seed, images, targets, _, _, segments = step
    trunk, heads = _network(seed)
    name, value = bad
    kwargs = {"labeled": None, "weights": None, name: value}
    try:
        multi_branch_step(
            trunk, heads, images, targets, dict.fromkeys(TASKS, _loss), segments=segments, **kwargs
        )
    except (ValueError, TypeError) as e:
        assert names_argument(str(e), (name,) + tuple(f"{name}[{t!r}]" for t in TASKS)), str(e)
    else:
        raise AssertionError(f"{name}={value!r} was accepted")
    assert all(p.grad is None for p in (*trunk.parameters(), *heads.parameters())), (
        "ran before checking"
    )
