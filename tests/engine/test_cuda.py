"""The engine on CUDA tensors: CUDA RNG (dropout), batch norm and fp16/bf16 autocast replayed."""

import copy

import pytest
import torch
from torch import nn

from mtlfast.engine import multi_branch_step

from .models import C, H, Head, N, conv_trunk, loss_fns_for, targets_for

pytestmark = pytest.mark.gpu
OUTS = {"seg": 3, "depth": 1}


@pytest.mark.parametrize(
    "dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_cuda_matches_naive(dtype):
    dev = torch.device("cuda")
    trunk = conv_trunk(
        2, (nn.BatchNorm2d(C), nn.Dropout(0.3), nn.Conv2d(C, C, 3, padding=1), nn.ReLU())
    ).to(dev)
    heads = nn.ModuleDict({t: Head(o) for t, o in OUTS.items()}).to(dev)
    images = torch.randn(N, 3, H, H, device=dev)
    targets = {
        t: (v.float() if v.is_floating_point() else v).to(dev) for t, v in targets_for(OUTS).items()
    }
    labeled = {"depth": torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=dev)}
    out = {}
    for strategy in ("naive", "recompute"):
        t, h = copy.deepcopy(trunk), copy.deepcopy(heads)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            r = multi_branch_step(
                t,
                h,
                images,
                targets,
                loss_fns_for(OUTS),
                labeled=labeled,
                strategy=strategy,
                segments=3,
                keep_task_grads=True,
            )
        out[strategy] = (t, h, r, torch.get_rng_state(), torch.cuda.get_rng_state())
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype is None else {"rtol": 2e-2, "atol": 2e-3}
    (ta, ha, ra, cpu_a, cuda_a), (tb, hb, rb, cpu_b, cuda_b) = out["naive"], out["recompute"]
    for (name, a), b in zip(
        [*ta.named_parameters(), *ha.named_parameters()], [*tb.parameters(), *hb.parameters()]
    ):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda m, n=name: f"{n}: {m}", **tol)
    for (name, a), b in zip(ta.named_buffers(), tb.buffers()):
        torch.testing.assert_close(b, a, msg=lambda m, n=name: f"{n}: {m}", **tol)
    for task in OUTS:
        torch.testing.assert_close(rb.task_grads[task], ra.task_grads[task], **tol)
    assert torch.equal(cpu_a, cpu_b) and torch.equal(cuda_a, cuda_b)
