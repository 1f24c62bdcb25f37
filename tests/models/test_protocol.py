"""Every registered model implements MultiTaskModel's protocol: one engine call trains any of them."""

import copy
from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mtlfast.models
from mtlfast.backbones import HRNet
from mtlfast.data import SyntheticScenes
from mtlfast.data.tasks import TASKS as DATA_TASKS
from mtlfast.engine import multi_branch_step
from mtlfast.models import (
    ASTMT,
    DEFAULT_OUT_CHANNELS,
    HRNetSingleTask,
    MTINet,
    MultiTaskModel,
    PADNet,
    SingleTask,
    UberNet,
    create,
    list_models,
)
from mtlfast.nn import TaskBatchNorm2d

from .helpers import TASKS, H, W


def tiny_hrnet():
    """HRNet with narrow branches and one module per stage: its segments() still make 6 trunk modules."""
    return HRNet(channels=(4, 8, 8, 8), modules=(1, 1, 1), blocks=1, stem_blocks=1)


#: (name, backbone (a name or a factory), options, tasks): every registered model, tiny.
CASES = [
    ("mtl_baseline", "resnet18", {"width": 0.125, "head_channels": 16}, TASKS),
    ("single_task", "resnet18", {"width": 0.125, "head_channels": 16}, TASKS[:1]),
    ("single_task", tiny_hrnet, {"like": "mtinet"}, TASKS[1:2]),
    ("ubernet", "resnet18", {"width": 0.125, "scales": (1.0, 0.5)}, TASKS),
    ("astmt", "se_resnet26", {"width": 0.125, "head_channels": 16, "adapters": True}, TASKS),
    ("mtinet", tiny_hrnet, {}, TASKS),
    ("padnet", tiny_hrnet, {"width": 16}, TASKS),
]
IDS = [
    f"{name}-{o.get('like', b if isinstance(b, str) else 'tiny_hrnet')}" for name, b, o, _ in CASES
]


def build(name, backbone, options, tasks, **extra):
    backbone = backbone() if callable(backbone) else backbone
    return create(name, tasks, backbone=backbone, **options, **extra)


def test_every_registered_model_is_covered():
    assert {name for name, *_ in CASES} == set(list_models())


def test_public_names():
    assert sorted(mtlfast.models.__all__) == sorted(
        [
            "ASTMT",
            "DEFAULT_OUT_CHANNELS",
            "GradientDiscriminator",
            "HRNetSingleTask",
            "MTINet",
            "MTLBaseline",
            "ModelSummary",
            "MultiTaskModel",
            "PADNet",
            "SingleTask",
            "UberNet",
            "create",
            "list_models",
            "load_release_checkpoint",
            "register",
            "release_options",
            "resolve_tasks",
            "scale_key",
            "summary",
        ]
    )


@pytest.mark.parametrize("name, backbone, options, tasks", CASES, ids=IDS)
def test_protocol(name, backbone, options, tasks):
    model = build(name, backbone, options, tasks)
    assert isinstance(model, MultiTaskModel)
    assert model.tasks == list(tasks) and list(model.out_channels) == list(tasks)
    assert isinstance(model.trunk, nn.Sequential) and isinstance(
        model.heads, (Mapping, nn.ModuleDict)
    )
    trunk, heads = model.engine_branches()
    assert isinstance(trunk, nn.Sequential) and isinstance(heads, (Mapping, nn.ModuleDict))
    assert model.expand(None) is None
    x = torch.randn(2, 3, H, W)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            out = model(x)
        values = {t: i for i, t in enumerate(model.tasks)}
        expanded = model.expand(values)
        assert expanded is not values and set(expanded) == set(out)  # a value for every prediction
        for key, pred in out.items():
            (task,) = [part for part in key.split("/") if part in values]
            assert expanded[key] == values[task]
            assert pred.shape == (2, model.out_channels[task], H, W), key
        if not training:
            assert expanded == values  # no deep supervision in eval mode
    # a task missing from the mapping stays missing, deep-supervision keys included
    assert all(tasks[0] in key.split("/") for key in model.train().expand({tasks[0]: 1}))


def _freeze_branch_norms(model):
    """Batch norms outside the trunk use running statistics: a branch then gives the same rows on any
    subset of the batch, as it must for the recompute strategy (it runs a branch on its labelled rows
    only) to equal plain autograd under partial labels. The modules stay in training mode, so deep
    supervision stays on; the trunk's batch norms keep batch statistics (the engine replays them)."""
    trunk, heads = model.engine_branches()
    in_trunk = {id(m) for m in trunk.modules()}
    for head in heads.values():
        for m in head.modules():
            if (
                isinstance(m, (nn.modules.batchnorm._BatchNorm, TaskBatchNorm2d))
                and id(m) not in in_trunk
            ):
                m.eval()
    return model


def _problem(model, n):
    targets, loss_fns = {}, {}
    for t, c in model.out_channels.items():
        if t == "semseg":
            targets[t], loss_fns[t] = torch.randint(0, c, (n, H, W)), F.cross_entropy
        else:
            targets[t], loss_fns[t] = torch.randn(n, c, H, W), F.mse_loss
    # partial labels: every task has some rows, no two tasks the same ones
    patterns = [[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]]
    labeled = {t: torch.tensor(patterns[i], dtype=torch.bool) for i, t in enumerate(model.tasks)}
    weights = {t: 0.5 + i for i, t in enumerate(model.tasks)}
    return targets, loss_fns, labeled, weights


def _plain_loss(model, x, targets, loss_fns, labeled, weights):
    """sum over the expanded keys k of w_k * loss_k(model(x)[k] on labelled rows), by plain autograd."""
    if isinstance(model, ASTMT):  # its T single-task passes from one pass of the shared stem
        shared = model.shared_part(x)
        out = {
            t: model.predict(model.task_part(shared, t)[1], t, x.shape[-2:]) for t in model.tasks
        }
    else:
        out = model(x)
    targets, loss_fns, labeled, weights = (
        model.expand(m) for m in (targets, loss_fns, labeled, weights)
    )
    assert set(out) == set(targets) == set(loss_fns) == set(labeled) == set(weights)
    terms = {k: loss_fns[k](out[k][labeled[k]], targets[k][labeled[k]]) for k in out}
    return sum(weights[k] * v for k, v in terms.items()), terms


@pytest.mark.parametrize("strategy", ["naive", "recompute"])
@pytest.mark.parametrize("name, backbone, options, tasks", CASES, ids=IDS)
def test_one_engine_call_trains_any_model(name, backbone, options, tasks, strategy):
    torch.manual_seed(0)
    model = _freeze_branch_norms(build(name, backbone, options, tasks).train())
    x = torch.randn(4, 3, H, W)
    targets, loss_fns, labeled, weights = _problem(model, 4)
    engine, plain = copy.deepcopy(model), copy.deepcopy(model)

    result = multi_branch_step(
        *engine.engine_branches(),
        x,
        engine.expand(targets),
        engine.expand(loss_fns),
        labeled=engine.expand(labeled),
        weights=engine.expand(weights),
        strategy=strategy,
    )
    total, terms = _plain_loss(plain, x, targets, loss_fns, labeled, weights)
    total.backward()

    assert set(result.ran) == set(terms) and result.skipped == []
    for k, loss in terms.items():
        torch.testing.assert_close(result.losses[k], loss.detach(), rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(result.total, total.detach(), rtol=1e-4, atol=1e-6)
    got = {n: p.grad for n, p in engine.named_parameters()}
    want = {n: p.grad for n, p in plain.named_parameters()}
    assert [n for n, g in got.items() if g is None] == [n for n, g in want.items() if g is None]
    for n, g in want.items():
        if g is not None:
            # MTI-Net's and PAD-Net's distillation keeps its maps under the naive strategy and
            # recomputes them outside the engine: the two backward sums round differently, by
            # float32 rounding relative to the largest entry
            atol = max(1e-5, 4e-6 * float(g.abs().max()))
            torch.testing.assert_close(got[n], g, rtol=1e-4, atol=atol, msg=n)
    # the trunk's batch norms saw the whole batch once, in both
    for (n, a), b in zip(engine.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


FAMILIES = [
    (None, "resnet18", {"width": 0.125, "head_channels": 16}, SingleTask),
    ("mtl_baseline", "resnet18", {"width": 0.125, "head_channels": 16}, SingleTask),
    ("ubernet", "resnet18", {"width": 0.125, "scales": (1.0, 0.5)}, UberNet),
    ("astmt", "se_resnet26", {"width": 0.125, "head_channels": 16}, ASTMT),
    ("mtinet", tiny_hrnet, {}, HRNetSingleTask),
    ("padnet", tiny_hrnet, {}, HRNetSingleTask),
]


@pytest.mark.parametrize(
    "like, backbone, options, cls", FAMILIES, ids=[str(f[0]) for f in FAMILIES]
)
def test_single_task_of_each_family(like, backbone, options, cls):
    model = build("single_task", backbone, options, "normals", like=like)
    assert type(model) is cls and isinstance(model, MultiTaskModel)
    assert model.tasks == ["normals"] and model.out_channels == {"normals": 3}
    x = torch.randn(2, 3, H, W)
    out = model(x)
    assert {k.split("/")[0] for k in out} == {"normals"} and out["normals"].shape == (2, 3, H, W)
    synthetic = build("single_task", backbone, options, ["semseg"], like=like, dataset="synthetic")
    assert synthetic.out_channels == {"semseg": 5}
    shared, per_task = model.parameter_split()
    assert shared + per_task["normals"] == sum(p.numel() for p in model.parameters())


def test_single_task_of_mtinet_is_the_release_network():
    model = create("single_task", ["semseg"], like="mtinet")
    assert isinstance(model.backbone, HRNet) and model.backbone.channels == [18, 36, 72, 144]
    layers = list(model.heads["semseg"].last_layer)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert (layers[0].in_channels, layers[0].out_channels, layers[0].kernel_size) == (
        270,
        270,
        (1, 1),
    )
    assert (layers[3].out_channels, layers[3].kernel_size) == (21, (1, 1))
    assert model.parameter_split()[1]["semseg"] == sum(p.numel() for p in model.heads.parameters())

    small = create("single_task", "edge", backbone=tiny_hrnet(), like="padnet").eval()
    x = torch.randn(1, 3, 29, 23)
    with torch.no_grad():
        out, via_trunk = small(x), small.heads["edge"](small.trunk(x))
    assert out["edge"].shape == (1, 1, 29, 23) and torch.equal(out["edge"], via_trunk)
    assert len(small.trunk) == len(small.backbone.segments())


def test_single_task_errors():
    with pytest.raises(ValueError, match="exactly one task"):
        create("single_task", ["semseg", "edge"], like="mtinet")
    with pytest.raises(ValueError, match="like must be one of"):
        create("single_task", "semseg", like="cross_stitch")


def test_synthetic_preset_matches_the_dataset():
    data = SyntheticScenes()
    preset = DEFAULT_OUT_CHANNELS["synthetic"]
    assert list(preset) == list(DATA_TASKS)
    assert preset["semseg"] == data.num_classes == 5 and preset["parts"] == data.num_parts == 7
    assert (preset["saliency"], preset["normals"], preset["edge"], preset["depth"]) == (1, 3, 1, 1)
    assert MTINet(dataset="synthetic", backbone=tiny_hrnet()).tasks == list(DATA_TASKS)
    assert PADNet(dataset="synthetic", backbone=tiny_hrnet(), width=16).out_channels == preset


@pytest.mark.parametrize("name, backbone, options, tasks", CASES, ids=IDS)
def test_every_model_takes_the_synthetic_dataset(name, backbone, options, tasks):
    tasks = ["semseg", "parts", "depth"][: len(tasks)]
    model = build(name, backbone, options, tasks, dataset="synthetic")
    assert model.out_channels == {t: DEFAULT_OUT_CHANNELS["synthetic"][t] for t in tasks}


def test_expand_keeps_given_keys_and_leaves_missing_tasks_out():
    model = UberNet(["semseg", "edge"], "resnet18", width=0.125, scales=(1.0, 0.5))
    got = model.expand({"semseg": 1, "semseg/scale_0.5": 2})
    assert got == {"semseg": 1, "semseg/scale_1": 1, "semseg/scale_0.5": 2}
    assert model.eval().expand({"semseg": 1, "edge": 2}) == {"semseg": 1, "edge": 2}
