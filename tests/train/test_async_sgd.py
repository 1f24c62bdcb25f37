"""UberNet's asynchronous SGD against a direct per-sample implementation of Table 3."""

import copy

import pytest
import torch
from torch import nn

from mtlfast.train.async_sgd import AsyncSGD, task_parameter_groups

TASKS = ["a", "b"]
GAMMA = {"a": 1.0, "b": 3.0}
LR, DECAY = 0.05, 0.01
B = {"shared": 3, "a": 2, "b": 2}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tasks = list(TASKS)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def loss(self, x, y, delta):
        """sum_t delta_t gamma_t L_t, summed over the samples (Table 3's per-sample terms)."""
        f = self.trunk(x)
        total = 0.0
        for t in TASKS:
            per_sample = (self.heads[t](f).squeeze(1) - y[t]) ** 2
            total = total + GAMMA[t] * (per_sample * delta[t]).sum()
        return total


def _stream(m=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 4, generator=g)
    y = {t: torch.randn(m, generator=g) for t in TASKS}
    delta = {
        "a": (torch.rand(m, generator=g) < 0.6).float(),
        "b": (torch.rand(m, generator=g) < 0.3).float(),
    }
    return x, y, delta


def _table3(model, x, y, delta, momentum=0.0):
    """Table 3 as written: one sample at a time, accumulators and counters per group."""
    groups = task_parameter_groups(model)
    acc = {p: [torch.zeros_like(q) for q in ps] for p, ps in groups.items()}
    count = dict.fromkeys(groups, 0)
    buf = {p: [torch.zeros_like(q) for q in ps] for p, ps in groups.items()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=False)
        model.loss(
            x[i : i + 1],
            {t: y[t][i : i + 1] for t in TASKS},
            {t: delta[t][i : i + 1] for t in TASKS},
        ).backward()
        count["shared"] += 1
        for t in TASKS:
            count[t] += int(delta[t][i])
        for p, ps in groups.items():
            if p == "shared" or delta[p][i]:
                for a, q in zip(acc[p], ps):
                    a += q.grad
            if count[p] == B[p]:
                with torch.no_grad():
                    for a, q, b in zip(acc[p], ps, buf[p]):
                        step = DECAY * q + a / B[p]
                        b.mul_(momentum).add_(step)
                        q -= LR * (b if momentum else step)
                        a.zero_()
                count[p] = 0
    return model


def _async(model, x, y, delta, batch=1, momentum=0.0, stop=None, asgd_state=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, weight_decay=DECAY)
    asgd = AsyncSGD(opt, task_parameter_groups(model), B)
    if asgd_state is not None:
        opt.load_state_dict(asgd_state[0])
        asgd.load_state_dict(asgd_state[1])
    start = 0 if asgd_state is None else asgd_state[2]
    end = x.shape[0] if stop is None else stop
    updated = []
    for i in range(start, end, batch):
        s = slice(i, min(i + batch, end))
        model.loss(x[s], {t: y[t][s] for t in TASKS}, {t: delta[t][s] for t in TASKS}).backward()
        counts = {"shared": s.stop - s.start, **{t: int(delta[t][s].sum()) for t in TASKS}}
        updated.append(asgd.step(counts))
        opt.zero_grad(set_to_none=True)
    return model, (copy.deepcopy(opt.state_dict()), copy.deepcopy(asgd.state_dict()), end), updated


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_async_sgd_equals_table_3_per_sample(momentum):
    x, y, delta = _stream()
    ref = _table3(Tiny(), x, y, delta, momentum)
    ours, _, updated = _async(Tiny(), x, y, delta, momentum=momentum)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert sum("shared" in u for u in updated) == x.shape[0] // B["shared"]
    assert sum("b" in u for u in updated) == int(delta["b"].sum()) // B["b"]


def test_a_group_not_due_is_not_moved_by_momentum_or_decay():
    x, y, delta = _stream()
    model = Tiny()
    head = model.heads["b"].weight.detach().clone()
    delta["b"][:] = 0
    delta["b"][5] = 1  # one labelled sample: b's counter stays below B_b = 2
    _async(model, x, y, delta, momentum=0.9)
    assert torch.equal(model.heads["b"].weight, head)


def test_state_dict_resumes_exactly():
    x, y, delta = _stream(m=24)
    whole, _, _ = _async(Tiny(), x, y, delta, batch=2, momentum=0.9)
    half, state, _ = _async(Tiny(), x, y, delta, batch=2, momentum=0.9, stop=10)
    assert any(c for c in state[1]["counters"].values())  # something was pending
    resumed, _, _ = _async(half, x, y, delta, batch=2, momentum=0.9, asgd_state=state)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p)


def test_groups_and_errors():
    model = Tiny()
    groups = task_parameter_groups(model)
    assert set(groups) == {"shared", "a", "b"}
    assert groups["a"] == list(model.heads["a"].parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    asgd = AsyncSGD(opt, groups, 4)
    with pytest.raises(RuntimeError, match="observe"):
        opt.step()
    with pytest.raises(ValueError, match="unknown groups"):
        asgd.observe({"c": 1})
    with pytest.raises(ValueError, match="batch_sizes"):
        AsyncSGD(opt, groups, {"shared": 2})
    with pytest.raises(ValueError, match="not in the optimizer"):
        AsyncSGD(torch.optim.SGD(model.trunk.parameters(), lr=0.1), groups, 2)
