"""Batch-norm outputs rebuilt in backward (mtlfast.nn.rebuilt_norm) against the kept path.

The ResNet blocks under ``rebuild_norms()`` must give the kept path's outputs, gradients,
running statistics and second derivatives, while autograd keeps fewer bytes.
"""

import copy

import pytest
import torch
from torch import nn

import mtlfast.profiling
from mtlfast.backbones.resnet import BasicBlock, Bottleneck
from mtlfast.nn import BatchNorm2d, TaskBatchNorm2d
from mtlfast.nn.rebuilt_norm import norm_rebuilt, rebuild_norms, rebuilding_norms
from mtlfast.ops.batch_norm_train import batch_norm_with_stats


def _randomised(block: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "bn" in name or "downsample.1" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.3)
            elif p.dim() > 1 and "adapter" not in name:
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
            else:
                p.normal_(0, 0.1)
    return block


def _block(kind: str, task_bn: bool, dtype=torch.float64, se: bool = True) -> nn.Module:
    opts = {"se": se, "num_tasks": 3, "task_se": se, "task_bn": task_bn}
    if kind == "bottleneck":
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        block = Bottleneck(16, 8, stride=2, downsample=down, stride_in_1x1=True, **opts)
    else:
        block = BasicBlock(16, 16, **opts)
    return _randomised(block).to(dtype)


def _run(block, x, task, rebuild, grad_out):
    block = copy.deepcopy(block)
    x = x.detach().clone().requires_grad_()
    with rebuild_norms(rebuild):
        out = block(x, task)
    out.backward(grad_out)
    grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in block.named_buffers()}
    return out.detach(), x.grad, grads, buffers


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("task_bn", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_matches_kept_path(kind, task_bn, training, channels_last):
    block = _block(kind, task_bn).train(training)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = None
    results = []
    for rebuild in (False, True):
        if grad_out is None:
            with torch.no_grad():
                grad_out = torch.randn_like(copy.deepcopy(block)(x, 1))
        results.append(_run(block, x, 1, rebuild, grad_out))
    (out0, gx0, g0, b0), (out1, gx1, g1, b1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gx1, gx0)
    assert g1.keys() == g0.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)
    for name in b0:  # the running statistics move once, as on the kept path
        torch.testing.assert_close(b1[name], b0[name], msg=name)


def test_mtlfast_batch_norm_and_float32_kernel_path():
    """mtlfast's BatchNorm2d (its C++ statistics on a large enough map) in float32."""
    block = _block("bottleneck", task_bn=False, dtype=torch.float32)
    for module in block.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = BatchNorm2d
    x = torch.randn(4, 16, 64, 64)
    grad_out = torch.randn(4, 32, 32, 32)
    (out0, gx0, g0, _), (out1, gx1, g1, _) = (
        _run(block, x, 0, rebuild, grad_out) for rebuild in (False, True)
    )
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-4, msg=name)


def test_saves_less():
    block = _block("bottleneck", task_bn=True, dtype=torch.float32).train()
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    kept = {}
    for rebuild in (False, True):
        with mtlfast.profiling.memory("cpu") as m, rebuild_norms(rebuild):
            out = block(x, 2)
        kept[rebuild] = m.end_extra_bytes
        out.sum().backward()
    # the bottleneck keeps conv1/conv2/conv3 outputs, both ReLU outputs, bn3's output, the
    # block's output, the projection's output: 8 + 8 + 32 + 8 + 8 + 32 + 32 + 32 channels at
    # 16x16; rebuilt: the two ReLU outputs and bn3's output, 48 of the 160
    plane = 4 * 16 * 16 * 4
    assert kept[False] - kept[True] == pytest.approx(48 * plane, rel=0.05)


def test_second_derivatives():
    """A create_graph backward rebuilds through the batch norm's own graph (no SE: task_se has
    no second derivative)."""
    block = _block("bottleneck", task_bn=True, se=False).train()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    results = []
    for rebuild in (False, True):
        b = copy.deepcopy(block)
        xi = x.clone().requires_grad_()
        with rebuild_norms(rebuild):
            out = b(xi, 0)
        params = [p for p in b.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.square().sum(), [xi, *params], create_graph=True)
        sum(g.square().sum() for g in grads).backward()  # the weights' gradients read the maps
        results.append({n: p.grad for n, p in b.named_parameters() if p.grad is not None})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], msg=name)


def test_bfloat16_rebuild_rounds_like_the_kept_output():
    bn = nn.BatchNorm2d(8).to(torch.bfloat16)
    y = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    with rebuild_norms():
        out, keep = norm_rebuilt(bn, y, None, relu=True)
        with keep:
            z = out * 2.0  # mul saves its other operand: a scalar here, so out via relu only
    z.sum().backward()
    ref = torch.relu(nn.functional.batch_norm(y.detach().float(), None, None, None, None, True))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert y.grad is not None and y.grad.dtype == torch.bfloat16


def test_off_outside_the_context_and_without_autograd():
    bn = nn.BatchNorm2d(4)
    y = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert not rebuilding_norms()
    assert norm_rebuilt(bn, y, None, relu=False) is None
    with rebuild_norms():
        assert rebuilding_norms()
        with rebuild_norms(False):
            assert norm_rebuilt(bn, y, None, relu=False) is None
        with torch.no_grad():
            assert norm_rebuilt(bn, y, None, relu=False) is None
        assert norm_rebuilt(nn.SyncBatchNorm(4), y, None, relu=False) is None
        per_sample = torch.tensor([0, 1])
        assert norm_rebuilt(TaskBatchNorm2d(4, 2), y, per_sample, relu=False) is None
        assert norm_rebuilt(bn, y, None, relu=False) is not None
    assert not rebuilding_norms()


def test_task_out_of_range_is_an_error():
    y = torch.randn(2, 4, 3, 3, requires_grad=True)
    with rebuild_norms(), pytest.raises(ValueError, match="task"):
        norm_rebuilt(TaskBatchNorm2d(4, 2), y, 5, relu=False)


def test_with_stats_matches_batch_norm():
    x = torch.randn(3, 5, 7, 4, dtype=torch.float64)
    running = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    expected = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    out, mean, invstd = batch_norm_with_stats(x, *running, momentum=0.2)
    ref = nn.functional.batch_norm(x, *expected, training=True, momentum=0.2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(invstd, x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt())
    torch.testing.assert_close(running[0], expected[0])
    torch.testing.assert_close(running[1], expected[1])
    with pytest.raises(ValueError, match="more than 1 value"):
        batch_norm_with_stats(torch.randn(1, 3, 1, 1), None, None)


def test_inside_a_checkpoint_or_other_hooks_keeps_the_maps():
    """A non-reentrant checkpoint's recomputation must save what its forward saved: inside one
    (or under any saved-tensor hooks but mtlfast.profiling's) nothing is rebuilt."""
    from torch.utils.checkpoint import checkpoint

    block = _block("bottleneck", task_bn=True).train()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    grad_out = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    _, gx0, g0, _ = _run(block, x, 1, False, grad_out)
    b = copy.deepcopy(block)
    xi = x.clone().requires_grad_()
    with rebuild_norms():
        out = checkpoint(b, xi, 1, use_reentrant=False)
    out.backward(grad_out)
    torch.testing.assert_close(xi.grad, gx0)
    for name, p in b.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g0[name], msg=name)
    y = torch.randn(2, 4, 3, 3, requires_grad=True)
    with rebuild_norms(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert norm_rebuilt(nn.BatchNorm2d(4), y, None, relu=False) is None


def test_retained_graph_backward_twice():
    """A ReLU output saved twice is rebuilt once a backward (kept between its two unpacks);
    a second backward through the retained graph rebuilds it again."""
    block = _block("bottleneck", task_bn=True).train()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    grad_out = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    _, gx0, _, _ = _run(block, x, 2, False, grad_out)
    xi = x.clone().requires_grad_()
    with rebuild_norms():
        out = copy.deepcopy(block)(xi, 2)
    (first,) = torch.autograd.grad(out, xi, grad_out, retain_graph=True)
    (second,) = torch.autograd.grad(out, xi, grad_out)
    torch.testing.assert_close(first, gx0)
    torch.testing.assert_close(second, gx0)


@pytest.mark.parametrize("task_bn", [True, False])
def test_task_sequential_block(task_bn):
    """A decoder block (conv, batch norm, ReLU, task SE in a TaskSequential): the ReLU output
    that the SE saves is rebuilt; a block ending in its ReLU keeps it (nothing would read it
    in the block's context)."""
    from mtlfast.backbones._blocks import TaskSequential
    from mtlfast.nn import TaskSE

    torch.manual_seed(0)
    norm = TaskBatchNorm2d(8, 3) if task_bn else nn.BatchNorm2d(8)
    block = TaskSequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), norm, nn.ReLU(), TaskSE(8, 3))
    block = _randomised(block).double().train()
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    grad_out = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    results, kept = [], {}
    for rebuild in (False, True):
        b = copy.deepcopy(block)
        xi = x.clone().requires_grad_()
        with mtlfast.profiling.memory("cpu") as m, rebuild_norms(rebuild):
            out = b(xi, 1)
        kept[rebuild] = m.end_extra_bytes
        out.backward(grad_out)
        results.append(
            (xi.grad, {n: p.grad for n, p in b.named_parameters() if p.grad is not None})
        )
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, msg=name)
    assert kept[False] - kept[True] == pytest.approx(2 * 8 * 16 * 16 * 8, rel=0.05)
    short = TaskSequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).train()
    xs = torch.randn(2, 4, 8, 8, requires_grad=True)
    saved = {}
    for rebuild in (False, True):
        with mtlfast.profiling.memory("cpu") as m, rebuild_norms(rebuild):
            short(xs)
        saved[rebuild] = (m.saved_bytes, m.saved_tensors)
    assert saved[True] == saved[False]  # the ReLU output is kept and counted alike


@pytest.mark.parametrize("name", ["resnet18", "se_resnet26"])
def test_public_context_on_a_backbone(name):
    """``mtlfast.nn.rebuild_norms`` around a whole backbone's forward: the same gradients and
    running statistics (float64), less kept for backward."""
    import mtlfast.nn
    from mtlfast.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone(name, width=0.25, output_stride=16).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results, kept = [], {}
    for rebuild in (False, True):
        b = copy.deepcopy(net)
        with mtlfast.profiling.memory("cpu") as m, mtlfast.nn.rebuild_norms(rebuild):
            features = b(x)
        kept[rebuild] = m.end_extra_bytes
        sum(f.square().mean() for f in features).backward()
        grads = {n: p.grad for n, p in b.named_parameters()}
        results.append((grads, {n: t.clone() for n, t in b.named_buffers()}))
    for name_, g in results[0][0].items():
        torch.testing.assert_close(results[1][0][name_], g, msg=name_)
    for name_, t in results[0][1].items():
        torch.testing.assert_close(results[1][1][name_], t, msg=name_)
    assert kept[True] < 0.85 * kept[False]


def test_astmt_follows_the_callers_context_unless_told_not_to():
    """Under plain autograd ASTMT rebuilds inside a caller's rebuild_norms() (and not outside
    it); ``rebuild_norms=False`` keeps the maps even inside it."""
    from mtlfast.models import ASTMT

    torch.manual_seed(0)
    model = ASTMT(["semseg", "normals"], width=0.125, head_channels=16, adapters=True).train()
    x = torch.randn(2, 3, 64, 64)
    kept = {}
    for flag, context in ((True, False), (True, True), (False, True)):
        model.rebuild_norms = flag
        with mtlfast.profiling.memory("cpu") as m, rebuild_norms(context):
            out = model(x, 1)
        kept[flag, context] = m.end_extra_bytes, m.saved_bytes
        del out
    assert kept[True, True][0] < 0.9 * kept[True, False][0]
    assert kept[False, True][1] == kept[True, False][1]  # the same saved (end: a first call's)
