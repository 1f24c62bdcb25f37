"""Each method against a direct implementation on tiny problems, and its defining properties."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mtlfast import balancing
from mtlfast.balancing._base import combination, gram
from mtlfast.balancing.mgda import min_norm_weights
from mtlfast.balancing.pcgrad import pcgrad_coefficients, random_orders

from .models import OUTS, batch, mse, network, zero

TASKS = list(OUTS)


def vectors(t: int, d: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(d, generator=g, dtype=torch.float64)] for _ in range(t)]


def stack(g):
    return torch.stack([v[0] for v in g])


# ------------------------------------------------------------------------------------ MGDA


@pytest.mark.parametrize("seed", range(5))
def test_mgda_two_tasks_closed_form(seed):
    g = vectors(2, 7, seed)
    if seed == 3:  # g1 inside the other's half-space beyond its norm: the vertex
        g[1][0] = 3.0 * g[0][0] + 0.01 * g[1][0]
    g1, g2 = g[0][0], g[1][0]
    gamma = float(torch.clamp((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1))
    alpha = min_norm_weights(gram(g))
    np.testing.assert_allclose(alpha, [gamma, 1 - gamma], rtol=0, atol=1e-12)


def _min_norm_slsqp(m: np.ndarray) -> np.ndarray:
    t = m.shape[0]
    res = minimize(
        lambda a: a @ m @ a,
        np.full(t, 1 / t),
        jac=lambda a: 2 * m @ a,
        bounds=[(0, 1)] * t,
        constraints={"type": "eq", "fun": lambda a: a.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return res.x


@pytest.mark.parametrize("t,d", [(3, 10), (5, 8), (6, 4), (16, 40)])
def test_mgda_min_norm_in_the_convex_hull(t, d):
    g = vectors(t, d, t * d)
    m = gram(g)
    alpha = min_norm_weights(m)
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12
    norm2 = alpha @ m @ alpha
    ref = _min_norm_slsqp(m)
    assert norm2 <= ref @ m @ ref * (1 + 1e-8) + 1e-12
    rand = np.random.default_rng(0).dirichlet(np.ones(t), 2000)
    assert norm2 <= np.einsum("ki,ij,kj->k", rand, m, rand).min() + 1e-12
    # optimality of the min-norm point u: u.g_t >= |u|^2 for every t
    assert (m @ alpha >= norm2 * (1 - 1e-6) - 1e-12).all()


def _frank_wolfe_on_vectors(g: torch.Tensor, iters: int = 250, tol: float = 1e-5) -> torch.Tensor:
    """Sener & Koltun's Alg. 2 literally (their code's limits), on the gradient vectors (rows)."""
    t = g.shape[0]
    alpha = torch.full((t,), 1.0 / t, dtype=g.dtype)
    for _ in range(iters):
        u = alpha @ g
        k = int(torch.argmin(g @ u))
        v1v1, v1v2, v2v2 = float(u @ u), float(u @ g[k]), float(g[k] @ g[k])
        if v1v2 >= v1v1:
            gamma = 1.0
        elif v1v2 >= v2v2:
            gamma = 0.0
        else:
            gamma = (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2)
        new = gamma * alpha
        new[k] += 1 - gamma
        done = float((new - alpha).abs().sum()) < tol
        alpha = new
        if done:
            break
    return alpha


def test_mgda_plain_frank_wolfe_would_stop_short():
    """Why away steps: the paper's plain Frank-Wolfe, 250 iterations, ends 0.4% above the minimum
    on this 3-task problem; the solver here reaches it."""
    g = vectors(3, 10, 30)
    m = gram(g)
    plain = _frank_wolfe_on_vectors(stack(g)).numpy()
    ours = min_norm_weights(m)
    assert plain @ m @ plain > 1.003 * (ours @ m @ ours)


def _direct_feature_method(combine_fn):
    """Plain autograd by hand: per-task gradients at the features, ``combine_fn(G (T, D))``
    gives the trunk's gradient, each head its own loss's. Returns the gradients and G."""
    trunk, heads = network()
    x, targets = batch()
    f = trunk(x)
    losses = [mse(heads[t](f), targets[t]) for t in TASKS]
    g = torch.stack([torch.autograd.grad(l, f, retain_graph=True)[0].reshape(-1) for l in losses])
    d = combine_fn(g).reshape(f.shape)
    hook = f.register_hook(lambda _: d)
    sum(losses).backward()
    hook.remove()
    return [p.grad.clone() for m in (trunk, heads) for p in m.parameters()], g


def _balancer_grads(name, **options):
    trunk, heads = network()
    x, targets = batch()
    b = balancing.create(name, TASKS, **options).double()
    f = trunk(x)
    b.backward({t: mse(heads[t](f), targets[t]) for t in TASKS}, f)
    return [p.grad.clone() for m in (trunk, heads) for p in m.parameters()], b


def _min_norm_of(g: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_min_norm_slsqp((g @ g.T).numpy()))


def test_mgda_against_the_min_norm_point_by_hand():
    expected, g = _direct_feature_method(lambda g: _min_norm_of(g) @ g)
    got, b = _balancer_grads("mgda")
    for e, a in zip(expected, got):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)
    alpha = torch.tensor([b.weights[t] for t in TASKS], dtype=torch.float64)
    torch.testing.assert_close(alpha, _min_norm_of(g), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+"])
def test_mgda_normalisations(normalize):
    g = vectors(3, 6, 7)
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5), "c": torch.tensor(3.0)}
    b = balancing.MGDA(["a", "b", "c"], normalize=normalize)
    out = b.combine(dict(zip("abc", g)), losses)[0]
    vec = stack(g)
    norms = vec.norm(dim=1)
    loss = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    n = {"l2": norms, "loss": loss, "loss+": loss * norms}[normalize]
    alpha = _min_norm_of(vec / n[:, None])
    torch.testing.assert_close(out, (alpha / n) @ vec, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------ PCGrad


def _pcgrad_literal(g: torch.Tensor, orders) -> torch.Tensor:
    """Yu et al.'s Alg. 1 on the vectors."""
    out = []
    for i in range(g.shape[0]):
        gi = g[i].clone()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return torch.stack(out).sum(0)


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_against_the_literal_projections(seed):
    g = vectors(5, 6, seed)
    orders = random_orders(5, seed, 3)
    beta = pcgrad_coefficients(gram(g), orders)
    got = combination(g, beta)[0]
    torch.testing.assert_close(got, _pcgrad_literal(stack(g), orders), rtol=1e-10, atol=1e-12)


def test_pcgrad_two_conflicting_gradients():
    g = [
        [torch.tensor([1.0, 0.0], dtype=torch.float64)],
        [torch.tensor([-1.0, 1.0], dtype=torch.float64)],
    ]
    beta = pcgrad_coefficients(gram(g), [[1], [0]])
    # g1' = g1 + g2/2 = (0.5, 0.5), orthogonal to g2; g2' = g2 + g1 = (0, 1), orthogonal to g1
    torch.testing.assert_close(
        combination(g, beta)[0], torch.tensor([0.5, 1.5], dtype=torch.float64)
    )


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    g = [[v[0].abs()] for v in vectors(4, 5, 2)]  # all dot products positive
    b = balancing.PCGrad(["a", "b", "c", "d"])
    out = b.combine(dict(zip("abcd", g)), {})[0]
    torch.testing.assert_close(out, stack(g).sum(0), rtol=0, atol=1e-15)
    assert b.weights == dict.fromkeys("abcd", 1.0)


def test_pcgrad_balancer_against_the_literal_one():
    orders = random_orders(len(TASKS), 5, 0)
    expected, _ = _direct_feature_method(lambda g: _pcgrad_literal(g, orders))
    got, _ = _balancer_grads("pcgrad", seed=5)
    for e, a in zip(expected, got):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ CAGrad


def _cagrad_official(g: np.ndarray, alpha: float = 0.5, rescale: int = 1) -> np.ndarray:
    """The authors' ``cagrad`` (grads as columns), SciPy's SLSQP on the dual, ported to numpy."""
    gg = g.T @ g
    t = g.shape[1]
    g0_norm = np.sqrt(gg.mean() + 1e-8)
    x_start = np.ones(t) / t
    c = alpha * g0_norm + 1e-8

    def objfn(x):
        return (x @ gg @ x_start + c * np.sqrt(x @ gg @ x + 1e-8)).sum()

    res = minimize(
        objfn,
        x_start,
        bounds=[(0, 1)] * t,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    gw = g @ res.x
    lmbda = c / (np.linalg.norm(gw) + 1e-8)
    d = g.mean(1) + lmbda * gw
    return d / {0: 1, 1: 1 + alpha**2, 2: 1 + alpha}[rescale], res


@pytest.mark.parametrize("t,d,seed", [(2, 5, 0), (3, 7, 1), (5, 9, 2), (6, 4, 3)])
def test_cagrad_dual_against_slsqp(t, d, seed):
    g = vectors(t, d, seed)
    expected, res = _cagrad_official(stack(g).numpy().T)
    b = balancing.CAGrad([str(i) for i in range(t)])
    m = gram(g)
    beta = b.coefficients(m)
    got = combination(g, beta)[0].numpy()
    # the dual's minimum: ours no higher than SLSQP's, the update the same
    tb = np.full(t, 1 / t)
    w = beta * (1 + 0.25) - tb
    w = w / w.sum()
    c = 0.5 * np.sqrt(tb @ m @ tb + 1e-8)
    ours = w @ m @ tb + c * np.sqrt(w @ m @ w + 1e-8)
    assert ours <= res.fun + 1e-9
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-7)


def test_cagrad_maximises_the_worst_improvement_in_the_ball():
    g = vectors(4, 6, 11)
    vec = stack(g)
    m = gram(g)
    b = balancing.CAGrad(list("abcd"), rescale=0)
    d = combination(g, b.coefficients(m))[0]
    g0 = vec.mean(0)
    radius = 0.5 * float(g0.norm())
    assert abs(float((d - g0).norm()) - radius) < 1e-6 * radius  # on the ball's boundary
    worst = float((vec @ d).min())
    rng = torch.Generator().manual_seed(0)
    u = torch.randn(5000, 6, generator=rng, dtype=torch.float64)
    u = g0 + radius * u / u.norm(dim=1, keepdim=True)
    assert worst >= float((u @ vec.T).min(1).values.max()) - 1e-9


def test_cagrad_alpha_zero_is_the_average_gradient():
    g = vectors(3, 5, 4)
    b = balancing.CAGrad(list("abc"), alpha=0.0)
    torch.testing.assert_close(combination(g, b.coefficients(gram(g)))[0], stack(g).mean(0))


# ------------------------------------------------------------------------------------ GradNorm


def _lgrad_double_backprop(trunk, heads, x, targets, w, initial, alpha, per_channel):
    """L_grad and dL_grad/dw with G_i from ``autograd.grad(..., create_graph=True)``."""
    f = trunk(x)
    losses = [mse(heads[t](f), targets[t]) for t in TASKS]
    weight = trunk[-1].weight
    w = w.clone().requires_grad_()
    norms = []
    for i, l in enumerate(losses):
        (gw,) = torch.autograd.grad(w[i] * l, weight, create_graph=True)
        norms.append(gw.flatten(1).norm(dim=1) if per_channel else gw.norm().reshape(1))
    big_g = torch.stack(norms)
    values = torch.stack([l.detach() for l in losses])
    ratio = values / initial
    r = ratio / ratio.mean()
    target = (big_g.mean(0, keepdim=True) * r[:, None] ** alpha).detach()
    lgrad = (big_g - target).abs().mean()
    (grad,) = torch.autograd.grad(lgrad, w)
    return lgrad.detach(), grad, values


@pytest.mark.parametrize("per_channel", [None, True, False])
@pytest.mark.parametrize("mode", ["plain", "recompute"])
def test_gradnorm_gradient_matches_double_backprop(per_channel, mode):
    """The exact (linearity) gradient of L_grad, step by step, against create_graph=True, and
    the weights against a literal GradNorm with its own Adam and renormalisation."""
    from mtlfast.engine import multi_branch_step

    trunk, heads = network()
    b = balancing.GradNorm(TASKS, alpha=0.7, lr=0.05, per_channel=per_channel).double()
    ref_w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    ref_opt = torch.optim.Adam([ref_w], lr=0.05)
    initial = None
    for step in range(4):
        x, targets = batch(seed=10 + step)
        lgrad, grad, values = _lgrad_double_backprop(
            trunk,
            heads,
            x,
            targets,
            ref_w.detach(),
            values_or(initial, trunk, heads, x, targets),
            0.7,
            per_channel is not False,
        )
        if initial is None:
            initial = values
        zero(trunk, heads)
        if mode == "plain":
            f = trunk(x)
            b.backward({t: mse(heads[t](f), targets[t]) for t in TASKS}, f, shared=trunk)
        else:
            multi_branch_step(
                trunk, heads, x, targets, dict.fromkeys(TASKS, mse), segments=2, balancer=b
            )
        assert b.layer_name == "4"
        torch.testing.assert_close(
            torch.tensor(b.last_loss, dtype=torch.float64), lgrad, rtol=1e-10, atol=1e-14
        )
        torch.testing.assert_close(b.last_grad, grad, rtol=1e-9, atol=1e-14)
        ref_w.grad = grad
        ref_opt.step()
        with torch.no_grad():
            ref_w.mul_(3 / ref_w.sum())
        torch.testing.assert_close(b.task_weights.detach(), ref_w.detach(), rtol=1e-12, atol=1e-12)
        assert abs(sum(b.weights.values()) - 3) < 1e-12


def values_or(initial, trunk, heads, x, targets):
    if initial is not None:
        return initial
    with torch.no_grad():
        f = trunk(x)
        return torch.stack([mse(heads[t](f), targets[t]) for t in TASKS])


def test_gradnorm_initial_loss_is_the_mean_of_the_first_k():
    b = balancing.GradNorm(["a", "b"], initial_steps=3)
    for v in ([1.0, 4.0], [2.0, 5.0], [3.0, 6.0], [100.0, 100.0]):
        for t in "ab":
            b.observe(t, [torch.ones(2, 2)])
        b.update({"a": torch.tensor(v[0]), "b": torch.tensor(v[1])})
    torch.testing.assert_close(b.initial_losses, torch.tensor([2.0, 5.0]))
    assert int(b.steps) == 4


def test_gradnorm_moves_weight_to_the_slower_task():
    """alpha > 0 and equal gradient norms: the task whose loss fell less gets more weight."""
    b = balancing.GradNorm(["fast", "slow"], alpha=1.0)
    for step in range(5):
        for t in ("fast", "slow"):
            b.observe(t, [torch.ones(3, 3) * b.weights[t]])  # equal ||grad_W L_i||
        b.update({"fast": torch.tensor(1.0 / (step + 1)), "slow": torch.tensor(1.0)})
    assert b.weights["slow"] > 1 > b.weights["fast"]
    assert abs(sum(b.weights.values()) - 2) < 1e-6


def test_gradnorm_skips_a_nonfinite_step():
    b = balancing.GradNorm(["a", "b"])
    for t in "ab":
        b.observe(t, [torch.ones(2, 2)])
    b.update({"a": torch.tensor(float("nan")), "b": torch.tensor(1.0)})
    assert int(b.steps) == 0 and b.weights == {"a": 1.0, "b": 1.0}


# ------------------------------------------------------------------------------------ the rest


def test_uncertainty_against_kendalls_loss():
    """exp(-s) L + s with s trained by Adam: the network's gradients and s's trajectory."""
    trunk, heads = network()
    b = balancing.Uncertainty(TASKS, lr=0.1).double()
    trunk2, heads2 = network()
    s = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.1)
    for step in range(3):
        x, targets = batch(seed=step)
        zero(trunk, heads, trunk2, heads2)
        f = trunk(x)
        b.backward({t: mse(heads[t](f), targets[t]) for t in TASKS}, f)
        f2 = trunk2(x)
        losses = torch.stack([mse(heads2[t](f2), targets[t]) for t in TASKS])
        (torch.exp(-s) * losses + s).sum().backward()
        opt.step()
        opt.zero_grad()
        for p, q in zip(
            list(trunk.parameters()) + list(heads.parameters()),
            list(trunk2.parameters()) + list(heads2.parameters()),
        ):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.log_vars.detach(), s.detach(), rtol=1e-12, atol=1e-14)


def test_dwa_follows_the_formula():
    b = balancing.DWA(["a", "b", "c"], temperature=2.0, period=2)
    history = [
        [3.0, 1.0, 2.0],
        [2.0, 1.0, 2.0],
        [1.0, 0.9, 1.0],
        [1.0, 0.7, 1.5],
        [0.5, 0.5, 0.5],
        [0.4, 0.6, 0.5],
    ]
    seen = []
    for v in history:
        b.update({k: torch.tensor(x, dtype=torch.float64) for k, x in zip("abc", v)})
        seen.append(list(b.weights.values()))
    h = np.array(history)
    means = [h[0:2].mean(0), h[2:4].mean(0), h[4:6].mean(0)]
    # seen[i]: the weights of step i + 2; steps 1-4 (periods 1 and 2) weigh 1
    assert seen[:3] == [[1.0, 1.0, 1.0]] * 3
    for k, row in ((0, seen[3]), (1, seen[5])):
        r = means[k + 1] / means[k]
        expected = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
        np.testing.assert_allclose(row, expected, rtol=1e-12)
    assert seen[4] == seen[3]
    assert abs(sum(seen[5]) - 3) < 1e-12


def test_fixed_is_the_engines_weighting_bit_for_bit():
    from mtlfast.engine import multi_branch_step

    x, targets = batch()
    weights = {"seg": 2.0, "depth": 0.5}
    out = []
    for balancer in (None, balancing.Fixed(TASKS, weights={"normals": 3.0})):
        trunk, heads = network()
        w = dict(weights, normals=3.0) if balancer is None else weights
        multi_branch_step(
            trunk, heads, x, targets, dict.fromkeys(TASKS, mse), weights=w, balancer=balancer
        )
        out.append([p.grad for m in (trunk, heads) for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_gradnorm_keeps_weights_positive():
    """A weight pushed below zero by Adam's fixed-size steps stops at min_weight (renormalised);
    with min_weight=None it goes negative, the paper's update as written."""
    for floor in (1e-3, None):
        b = balancing.GradNorm(["small", "big"], alpha=0.0, lr=0.5, min_weight=floor)
        lowest = 1.0
        for _ in range(10):
            b.observe("small", [torch.ones(2, 2) * b.weights["small"]])
            b.observe("big", [torch.ones(2, 2) * 100 * b.weights["big"]])
            b.update({"small": torch.tensor(1.0), "big": torch.tensor(1.0)})
            assert abs(sum(b.weights.values()) - 2) < 1e-6
            lowest = min(lowest, b.weights["big"])
        assert lowest > 0 if floor else lowest < 0
