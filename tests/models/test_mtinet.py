"""MTI-Net: outputs, deep supervision, which parameters each loss reaches, and the memory engine."""

import pytest
import torch
from torch import nn

from mtlfast.engine import multi_branch_step
from mtlfast.models import MTINet
from mtlfast.models.mtinet import FeaturePropagation

from .decoder_helpers import (
    H,
    N,
    TinyBackbone,
    W,
    all_params,
    grads_of,
    loss_fns_for,
    recompute_runs,
    targets_for,
    touched,
)

TASKS = ["semseg", "normals"]
DS = [f"deep_supervision/scale_{s}/{t}" for s in range(4) for t in TASKS]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MTINet(tasks=TASKS)


def test_train_outputs_and_backward(model):
    model.train()
    x = torch.randn(N, 3, H, W)
    out = model(x)
    assert list(out) == TASKS + DS
    assert model.decoder.tasks == TASKS + DS
    for key, y in out.items():
        assert y.shape == (N, model.decoder.out_channels[key.rsplit("/", 1)[-1]], H, W), key
    model.zero_grad(set_to_none=True)
    sum(y.square().mean() for y in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.zero_grad(set_to_none=True)


def test_eval_outputs_and_trunk_path(model):
    model.eval()
    x = torch.randn(1, 3, 29, 23)
    with torch.no_grad():
        out = model(x)
        via_trunk = model.heads["decoder"](model.trunk(x))
    model.train()
    assert list(out) == TASKS
    assert out["semseg"].shape == (1, 21, 29, 23) and out["normals"].shape == (1, 3, 29, 23)
    assert all(torch.equal(out[t], via_trunk[t]) for t in TASKS)
    # HRNet's 11 exchange segments become checkpoint boundaries
    assert len(model.trunk) == 11


def test_dataset_defaults_and_overrides():
    m = MTINet(dataset="nyud", out_channels={"semseg": 13}, deep_supervision=False)
    assert m.tasks == ["semseg", "depth", "normals", "edge"]
    assert m.decoder.out_channels == {"semseg": 13, "depth": 1, "normals": 3, "edge": 1}
    assert m.decoder.tasks == m.tasks  # no deep-supervision keys, even in training mode
    assert MTINet().tasks == ["semseg", "parts", "saliency", "normals", "edge"]
    with pytest.raises(ValueError, match="dataset"):
        MTINet(dataset="coco")
    with pytest.raises(ValueError, match="out_channels"):
        MTINet(tasks=["semseg", "albedo"])
    with pytest.raises(ValueError, match="two distinct tasks"):
        MTINet(tasks=["semseg"])


def test_other_backbone_three_tasks():
    m = MTINet(tasks=["semseg", "depth", "edge"], dataset="nyud", backbone=TinyBackbone())
    assert len(m.trunk) == 1
    out = m(torch.randn(N, 3, H, W))
    assert len(out) == 3 + 12 and all(y.shape[-2:] == (H, W) for y in out.values())


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def test_feature_propagation_softmax_is_over_tasks():
    """Attention logits favouring task 1 everywhere keep task 1's chunk and zero the others (the
    release's (N, C, T) view would mix the chunks)."""
    t, c = 3, 8
    fpm = FeaturePropagation(t, c)
    feats = [torch.randn(2, c, 5, 3) for _ in range(t)]
    logits = torch.zeros(2, t * c, 5, 3)
    logits[:, c : 2 * c] = 100.0
    fpm.non_linear = Constant(logits)
    seen = []
    fpm.dimensionality_reduction.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    out = fpm(feats)
    assert [o.shape for o in out] == [(2, c, 5, 3)] * t
    expected = torch.cat([torch.zeros_like(feats[0]), feats[1], torch.zeros_like(feats[2])], 1)
    torch.testing.assert_close(seen[0], expected)
    # refinement: task k's SE gate on the shared representation plus its own features
    shared = fpm.dimensionality_reduction(expected)
    for k in range(t):
        torch.testing.assert_close(out[k], fpm.se(shared, k, residual=feats[k]))


def test_coarsest_deep_supervision_reaches_only_its_own_head(model):
    """Task A's initial prediction at 1/32 depends on the backbone and A's scale-3 head alone."""
    model.train()
    out = model(torch.randn(N, 3, H, W))
    g = grads_of(out["deep_supervision/scale_3/semseg"].square().mean(), model)
    assert set(touched(g, "decoder.")) == set(
        all_params(model, "decoder.initial.3.refinement.semseg")
    ) | set(all_params(model, "decoder.initial.3.decoders.semseg"))
    assert touched(g, "backbone.")


def test_finer_deep_supervision_skips_distillation_and_other_heads_at_that_scale(model):
    model.train()
    out = model(torch.randn(N, 3, H, W))
    g = grads_of(out["deep_supervision/scale_0/semseg"].square().mean(), model)
    for prefix in (
        "decoder.distillation",
        "decoder.aggregation",
        "decoder.initial.0.refinement.normals",
        "decoder.initial.0.decoders.normals",
    ):
        assert touched(g, prefix) == [], prefix
    # the propagated features mix the tasks: B's coarser heads do receive A's gradient
    assert touched(g, "decoder.initial.1.refinement.normals")
    assert touched(g, "decoder.propagation.0")


def test_final_prediction_reaches_no_other_aggregation_and_no_initial_classifier(model):
    model.train()
    out = model(torch.randn(N, 3, H, W))
    g = grads_of(out["normals"].square().mean(), model)
    assert touched(g, "decoder.aggregation.semseg") == []
    assert [n for n in touched(g, "decoder.initial") if ".decoders." in n] == []
    # distillation mixes tasks: semseg's initial features feed the normals output
    assert touched(g, "decoder.initial.0.refinement.semseg")
    assert touched(g, "decoder.aggregation.normals")


@pytest.mark.parametrize("train", [True, False])
def test_multi_branch_step_matches_naive_and_plain_backward(model, train):
    model.train(train)
    outputs = model.decoder.out_channels
    x = torch.randn(N, 3, H, W)
    targets, loss_fns = targets_for(outputs), loss_fns_for(outputs)
    weights = {"semseg": 1.0, "normals": 0.5}
    grads = {}
    for strategy in ("naive", "recompute"):
        model.zero_grad(set_to_none=True)
        res = multi_branch_step(
            model.trunk,
            model.heads,
            x,
            model.expand(targets),
            model.expand(loss_fns),
            weights=model.expand(weights),
            strategy=strategy,
            segments=3,
        )
        assert sorted(res.ran) == sorted(model.decoder.tasks)
        grads[strategy] = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(x)
    expanded_loss, expanded_targets, expanded_weights = (
        model.expand(loss_fns),
        model.expand(targets),
        model.expand(weights),
    )
    sum(
        expanded_weights[k] * expanded_loss[k](y, expanded_targets[k]) for k, y in out.items()
    ).backward()
    plain = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.train()
    # in eval mode the initial classifiers only feed deep supervision: no gradient
    unused = [n for n, g in plain.items() if g is None]
    assert unused == ([] if train else [n for n in plain if ".decoders." in n])
    for name, grad in plain.items():
        if name in unused:
            assert grads["naive"][name] is None and grads["recompute"][name] is None
            continue
        # the naive strategy's distillation saves its maps and sums the backward in another
        # order than the recomputing one: float32 rounding relative to the largest entry
        atol = 4e-6 * max(1.0, float(grad.abs().max()))
        torch.testing.assert_close(
            grads["recompute"][name], grads["naive"][name], rtol=1e-4, atol=atol, msg=name
        )
        torch.testing.assert_close(grads["naive"][name], grad, rtol=1e-4, atol=atol, msg=name)


def test_channels_last_input_gives_the_same_predictions(model):
    model.eval()
    x = torch.randn(1, 3, 31, 27)
    with torch.no_grad():
        ref = model(x)
        out = model(x.to(memory_format=torch.channels_last))
    model.train()
    for t in TASKS:
        torch.testing.assert_close(out[t], ref[t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ("mtinet", "padnet"))
def test_registry_with_resnet_fpn_backbone(name):
    """create() builds both cross-task models on HRNet (default) or a ResNet-FPN by name."""
    from mtlfast.backbones import create_backbone
    from mtlfast.models import create

    model = create(
        name,
        ["semseg", "normals"],
        backbone=create_backbone("fpn_resnet18", width=0.125, fpn_channels=16),
    )
    out = model(torch.randn(N, 3, H, W))
    assert out["semseg"].shape == (N, 21, H, W) and out["normals"].shape == (N, 3, H, W)
    sum(v.mean() for v in out.values()).backward()
    assert isinstance(
        create(name, ["semseg", "normals"]).backbone, type(create_backbone("hrnet18"))
    )


def test_softmax_grouping_option():
    """``softmax_grouping`` reaches every feature propagation module; "release" changes the output."""
    torch.manual_seed(0)
    paper = MTINet(
        tasks=["semseg", "depth", "edge"], dataset="nyud", backbone=TinyBackbone()
    ).eval()
    release = MTINet(
        tasks=["semseg", "depth", "edge"],
        dataset="nyud",
        backbone=TinyBackbone(),
        softmax_grouping="release",
    ).eval()
    release.load_state_dict(paper.state_dict())
    assert [p.softmax_grouping for p in release.decoder.propagation] == ["release"] * 3
    assert "softmax_grouping='release'" in repr(release.decoder.propagation[0])
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        assert not torch.allclose(paper(x)["semseg"], release(x)["semseg"])
    with pytest.raises(ValueError, match="softmax_grouping must be one of"):
        MTINet(
            tasks=["semseg", "depth"],
            dataset="nyud",
            backbone=TinyBackbone(),
            softmax_grouping="tasks",
        )


def test_recompute_strategy_recomputes_aggregation_with_one_statistics_update(model, monkeypatch):
    """Under the engine's recompute strategy each task's aggregation keeps nothing for backward and
    runs again there, its batch norm updating its running statistics once, as under naive."""
    from mtlfast.models.mtinet import MTINetDecoder

    seen, states = recompute_runs(model, MTINetDecoder, "_aggregate", monkeypatch)
    assert seen == {"naive": ["naive"] * 2, "recompute": ["recompute"] * 4}  # 2 tasks
    for k, v in states["naive"].items():
        torch.testing.assert_close(states["recompute"][k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("balancer", [None, "pcgrad", "mgda", "uncertainty"])
def test_recomputed_aggregation_backward_more_than_once(model, balancer):
    """Per-task gradients (keep_task_grads, the gradient-based balancers) run the decoder's graph
    backward once a task: the recomputed aggregation must be re-enterable, and give naive's."""
    import copy

    from mtlfast import balancing

    x = torch.randn(N, 3, H, W)
    outputs = model.decoder.out_channels
    targets, loss_fns = targets_for(outputs), loss_fns_for(outputs)
    grads = {}
    for strategy in ("naive", "recompute"):
        m = copy.deepcopy(model).train()
        extra = {"balancer": balancing.create(balancer, m.tasks)} if balancer else {}
        res = multi_branch_step(
            m.trunk,
            m.heads,
            x,
            m.expand(targets),
            m.expand(loss_fns),
            strategy=strategy,
            keep_task_grads=balancer is None,
            **extra,
        )
        assert res.total is not None
        grads[strategy] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["naive"].keys() == grads["recompute"].keys()
    for n, g in grads["naive"].items():
        # the methods' task weights come from small solvers: rounding relative to the largest entry
        scale = float(g.abs().max())
        torch.testing.assert_close(grads["recompute"][n], g, rtol=1e-4, atol=1e-5 * scale, msg=n)
