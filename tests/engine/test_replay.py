"""Recomputation replays the first forward: batch norm, dropout, other stateful buffers, autocast."""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from mtlfast.engine import multi_branch_step

from .models import (
    C,
    H,
    Head,
    N,
    assert_same_grads,
    conv_trunk,
    loss_fns_for,
    run_both,
    targets_for,
)

OUTS = {"seg": 3, "depth": 1}
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def buffers(module):
    return {n: b.clone() for n, b in module.named_buffers()}


def assert_same_buffers(out):
    a, b = buffers(out["naive"][0]), buffers(out["recompute"][0])
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_batch_norm_in_trunk_updates_running_statistics_once():
    extra = (
        nn.BatchNorm2d(C),
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        nn.BatchNorm2d(C, momentum=None),
    )
    trunk = conv_trunk(2, extra).double()
    heads = nn.ModuleDict({t: Head(o) for t, o in OUTS.items()}).double()
    before = buffers(trunk)
    labeled = {"depth": torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)}
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for(OUTS),
        loss_fns_for(OUTS),
        labeled=labeled,
        segments=3,
    )
    assert_same_grads(out, **TIGHT)
    assert_same_buffers(out)
    after = buffers(out["recompute"][0])
    assert after["2.num_batches_tracked"] == before["2.num_batches_tracked"] + 1
    assert not torch.equal(after["2.running_mean"], before["2.running_mean"])
    assert out["recompute"][0][2].track_running_stats  # the flag is restored


def test_batch_norm_in_heads_with_full_labels():
    trunk = conv_trunk(3, (nn.BatchNorm2d(C),)).double()
    heads = nn.ModuleDict(
        {t: nn.Sequential(nn.BatchNorm2d(C), Head(o)) for t, o in OUTS.items()}
    ).double()
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for(OUTS),
        loss_fns_for(OUTS),
    )
    assert_same_grads(out, **TIGHT)
    for name, b in out["naive"][1].named_buffers():
        assert torch.equal(dict(out["recompute"][1].named_buffers())[name], b)


def test_other_stateful_buffers_are_replayed_from_their_state_before_the_forward():
    # InstanceNorm's running statistics move on every train forward whatever the flag; spectral
    # norm's power iteration changes its vectors, and the weight it gives, on every forward
    trunk = conv_trunk(
        2,
        (
            nn.InstanceNorm2d(C, track_running_stats=True, affine=True),
            spectral_norm(nn.Conv2d(C, C, 3, padding=1)),
            nn.ReLU(),
        ),
    ).double()
    heads = nn.ModuleDict({t: Head(o) for t, o in OUTS.items()}).double()
    # three segments: both stateful modules in the middle one, which is recomputed
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for(OUTS),
        loss_fns_for(OUTS),
        segments=3,
    )
    assert_same_grads(out, **TIGHT)
    assert_same_buffers(out)


def test_dropout_in_trunk_draws_the_same_masks_and_rng_ends_in_the_same_state():
    trunk = conv_trunk(
        2,
        (
            nn.Dropout(0.5),
            nn.Conv2d(C, C, 3, padding=1),
            nn.Dropout2d(0.3),
            nn.ReLU(),
            nn.Conv2d(C, C, 1),
        ),
    ).double()
    heads = nn.ModuleDict({t: Head(o) for t, o in OUTS.items()}).double()
    images = torch.randn(N, 3, H, H, dtype=torch.float64)
    # four segments: both dropouts recomputed (the last segment, the 1x1 conv, is kept)
    out = run_both(trunk, heads, images, targets_for(OUTS), loss_fns_for(OUTS), segments=4, seed=7)
    assert_same_grads(out, **TIGHT)
    assert torch.equal(out["naive"][3], out["recompute"][3])
    # and the step did consume randomness (the masks are not a no-op)
    torch.manual_seed(7)
    assert not torch.equal(torch.get_rng_state(), out["recompute"][3])
    # a different seed gives a different gradient: the comparison above is not vacuous
    other = run_both(
        trunk, heads, images, targets_for(OUTS), loss_fns_for(OUTS), segments=4, seed=8
    )
    a = out["recompute"][0][0].weight.grad
    assert not torch.allclose(other["recompute"][0][0].weight.grad, a)


def test_dropout_in_heads_with_full_labels():
    trunk = conv_trunk(4).double()
    heads = nn.ModuleDict(
        {t: nn.Sequential(nn.Dropout(0.5), Head(o)) for t, o in OUTS.items()}
    ).double()
    out = run_both(
        trunk,
        heads,
        torch.randn(N, 3, H, H, dtype=torch.float64),
        targets_for(OUTS),
        loss_fns_for(OUTS),
    )
    assert_same_grads(out, **TIGHT)
    assert torch.equal(out["naive"][3], out["recompute"][3])


def test_autocast_bf16_on_cpu():
    trunk = conv_trunk(4, (nn.BatchNorm2d(C), nn.Dropout(0.2), nn.Conv2d(C, C, 1), nn.ReLU()))
    heads = nn.ModuleDict({t: Head(o) for t, o in OUTS.items()})
    images = torch.randn(N, 3, H, H)
    targets = {t: v.float() if v.is_floating_point() else v for t, v in targets_for(OUTS).items()}
    seen = []
    trunk[2].register_forward_hook(lambda m, i, o: seen.append((o.dtype, torch.is_grad_enabled())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # segments [0, 3), [3, 6), [6, 8): the hooked conv, batch norm and dropout recomputed
        out = run_both(trunk, heads, images, targets, loss_fns_for(OUTS), segments=3)
    # the recomputation ran in bf16 too (a float32 recompute would not match the forward)
    assert seen == [(torch.bfloat16, True), (torch.bfloat16, False), (torch.bfloat16, True)]
    assert_same_grads(out, rtol=2e-2, atol=2e-3)
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for p in out["recompute"][0].parameters()
    )
    assert torch.equal(out["naive"][3], out["recompute"][3])


def test_recomputation_restores_autocast_state_of_the_forward():
    # a backward run outside the caller's autocast (as here: every backward runs with autocast
    # off) must still recompute under the forward's state; checked through the dtypes it sees
    trunk = conv_trunk(4)
    heads = nn.ModuleDict({"depth": Head(1)})
    dtypes = []
    trunk[0].register_forward_pre_hook(  # in the first segment, which is recomputed
        lambda m, args: dtypes.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
    )
    targets = {"depth": torch.randn(N, 1, H, H)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        multi_branch_step(
            trunk, heads, torch.randn(N, 3, H, H), targets, loss_fns_for({"depth": 1}), segments=2
        )
    assert dtypes == [(True, False), (True, True)]
    assert not torch.is_autocast_enabled("cpu")
