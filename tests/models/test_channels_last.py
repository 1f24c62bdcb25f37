"""Channels-last networks: the same outputs and gradients as NCHW, and no layout flip inside."""

import pytest
import torch

from mtlfast.models import MTINet, PADNet
from mtlfast.models.mtinet import FeaturePropagation

from .decoder_helpers import H, N, TinyBackbone, W, loss_fns_for, targets_for

CL = torch.channels_last


@pytest.mark.parametrize("grouping", ["paper", "release"])
def test_feature_propagation_in_channels_last(grouping):
    """The softmax over tasks runs on the NHWC storage: the same result as NCHW, channels-last
    out, and the same gradients."""
    torch.manual_seed(0)
    t, c = 3, 16
    fpm = FeaturePropagation(t, c, softmax_grouping=grouping)
    feats = [torch.randn(2, c, 5, 7, dtype=torch.float64) for _ in range(t)]
    fpm = fpm.double()
    ref_in = [f.clone().requires_grad_() for f in feats]
    ref = fpm(ref_in)
    sum((o * o).sum() for o in ref).backward()
    ref_grads = {k: p.grad.clone() for k, p in fpm.named_parameters()}
    fpm.zero_grad()
    fpm.to(memory_format=CL)
    cl_in = [f.contiguous(memory_format=CL).requires_grad_() for f in feats]
    seen = []
    fpm.dimensionality_reduction.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    out = fpm(cl_in)
    assert seen[0].is_contiguous(memory_format=CL) and not seen[0].is_contiguous()
    for o, r in zip(out, ref):
        assert o.is_contiguous(memory_format=CL)
        torch.testing.assert_close(o, r)
    sum((o * o).sum() for o in out).backward()
    for a, b in zip(cl_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad)
    for k, p in fpm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], msg=k)


@pytest.mark.parametrize("cls", [MTINet, PADNet])
def test_model_in_channels_last_trains_like_nchw(cls):
    """Whole model, channels-last weights and images: train-mode outputs (deep supervision
    included) and every parameter's gradient equal the NCHW model's; the predictions at image
    size are NCHW (:func:`mtlfast.models.heads.resize_prediction`)."""
    torch.manual_seed(0)
    tasks = ["semseg", "normals", "edge"]
    model = cls(tasks=tasks, backbone=TinyBackbone()).double().train()
    x = torch.randn(N, 3, H, W, dtype=torch.float64)
    targets = model.expand(targets_for(model.out_channels))
    loss_fns = model.expand(loss_fns_for(tasks))

    def run(m, image):
        m.zero_grad(set_to_none=True)
        out = m(image)
        sum(loss_fns[k](y, targets[k]) for k, y in out.items()).backward()
        return out, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref, ref_grads = run(model, x)
    model.load_state_dict(state)  # the batch norms' statistics as before
    model.to(memory_format=CL)
    out, grads = run(model, x.contiguous(memory_format=CL))
    assert out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], msg=k)
        assert out[k].is_contiguous(), k  # predictions at image size: NCHW, as the losses take
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], msg=k)


def test_aspp_keeps_channels_last_through_its_pooling_branch():
    """The image-pooling branch's mean and its broadcast back: the projection's input, the
    output and x's gradient stay channels-last (autograd would otherwise sum the branches'
    gradients across layouts); values and gradients as NCHW's; the mean differentiable twice."""
    from mtlfast.models.heads import ASPP, _SpatialMean

    torch.manual_seed(0)
    aspp = ASPP(8, 4, rates=(1, 2)).double()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    ref_in = x.clone().requires_grad_()
    ref = aspp(ref_in)
    ref.square().sum().backward()
    aspp.to(memory_format=CL)
    cl_in = x.contiguous(memory_format=CL).requires_grad_()
    seen = []
    aspp.project.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    out = aspp(cl_in)
    assert seen[0].is_contiguous(memory_format=CL) and not seen[0].is_contiguous()
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    assert cl_in.grad.is_contiguous(memory_format=CL) and not cl_in.grad.is_contiguous()
    torch.testing.assert_close(cl_in.grad, ref_in.grad)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=CL)
    assert torch.autograd.gradgradcheck(_SpatialMean.apply, (y.requires_grad_(),))
