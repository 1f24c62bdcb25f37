"""Every model with every backbone it supports: forward and backward, train and eval, input resolution."""

import pytest
import torch

from mtlfast.models import MTLBaseline, UberNet, create, list_models, scale_key

from .helpers import CASES, TASKS, H, W, build


@pytest.mark.parametrize("name, backbone, options", CASES, ids=[f"{m}-{b}" for m, b, _ in CASES])
def test_forward_backward(name, backbone, options):
    model = build(name, backbone, options)
    x = torch.randn(2, 3, H, W)
    out = model(x)
    tasks = list(model.out_channels)
    scales = getattr(model, "scales", (1.0,))
    expected = set(tasks)
    if name == "ubernet" and len(scales) > 1:
        expected |= {scale_key(t, s) for t in tasks for s in scales}
    assert set(out) == expected
    for key, pred in out.items():
        assert pred.shape == (2, model.out_channels[key.split("/")[0]], H, W), key
    sum(p.square().mean() for p in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if name in (
        "mtl_baseline",
        "single_task",
    ):  # DeepLab heads read P2 and P5 only, not P3, P4's outputs
        missing = [
            n
            for n in missing
            if not n.startswith(("backbone.fpn.layer_blocks.1.", "backbone.fpn.layer_blocks.2."))
        ]
    assert not missing, missing[:5]

    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, H, W))
    assert set(out) == set(tasks)
    assert all(out[t].shape == (1, model.out_channels[t], H, W) for t in tasks)


def test_registry():
    assert {"astmt", "mtl_baseline", "single_task", "ubernet"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create("overnet", TASKS)
    with pytest.raises(ValueError, match="exactly one task"):
        create("single_task", TASKS, backbone="resnet18", width=0.125)


def test_output_channels_per_dataset():
    model = UberNet(
        ["semseg", "depth", "normals", "edge"],
        "resnet18",
        dataset="nyud",
        width=0.125,
        scales=(1.0,),
    )
    assert model.out_channels == {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
    model = MTLBaseline(TASKS + ["parts", "saliency"], "resnet18", width=0.125, head_channels=8)
    assert model.out_channels == {"semseg": 21, "normals": 3, "edge": 1, "parts": 7, "saliency": 1}
    model = MTLBaseline(
        ["semseg"], "resnet18", width=0.125, head_channels=8, out_channels={"semseg": 5}
    )
    assert model.heads["semseg"].classifier.out_channels == 5
    with pytest.raises(ValueError, match="no default output channels"):
        MTLBaseline(["depth"], "resnet18", width=0.125)
    with pytest.raises(ValueError, match="not in tasks"):
        MTLBaseline(["semseg"], "resnet18", width=0.125, out_channels={"depth": 1})


def test_defaults_are_the_papers():
    ubernet = UberNet(["edge"], width=1 / 32)
    assert type(ubernet.backbone).__name__ == "VGG16" and ubernet.scales == (1.0, 0.75, 0.5)
    ubernet = UberNet(["edge"], "resnet18", width=0.125)
    assert ubernet.backbone.strides[-1] == 8
    astmt = create("astmt", ["semseg", "edge"], width=0.125)
    assert astmt.backbone.depth == 26 and astmt.backbone.strides[-1] == 16
    aspp = astmt.decoder.aspp
    assert [b[0].dilation[0] for b in aspp.branches[1:]] == [6, 12, 18]
    assert (
        astmt.decoder.reduce[0].out_channels == 12
    )  # the release's 64-wide decoder: 48 x 64 / 256
    assert astmt.decoder.fuse2[0].out_channels == 64
    astmt = create("astmt", ["semseg", "edge"], width=0.125, output_stride=8)
    assert [b[0].dilation[0] for b in astmt.decoder.aspp.branches[1:]] == [12, 24, 36]


def test_ubernet_skip_layers_and_trunk():
    model = UberNet(["semseg", "edge"], "vgg16", width=1 / 32, scales=(1.0, 0.5))
    fusion = model.heads["edge"].fusion
    assert len(fusion.in_channels) == 6 and len(fusion.norms) == 5  # BN on every skip but fc7
    rep = model.trunk(torch.randn(2, 3, H, W))
    assert len(rep) == 1 + 2 * 6 and rep[0].shape == (2, 3, H, W)
    assert rep[1].shape[-2:] == (H, W) and rep[7].shape[-2:] == (round(H / 2), round(W / 2))
    # the trunk is a view: no duplicated parameters or state-dict keys
    assert not any(k.startswith("trunk") for k in model.state_dict())


def test_ubernet_fused_starts_as_the_scale_average():
    model = UberNet(["normals"], "resnet18", width=0.125, scales=(1.0, 0.5))
    out = model(torch.randn(2, 3, H, W))
    mean = (out[scale_key("normals", 1.0)] + out[scale_key("normals", 0.5)]) / 2
    torch.testing.assert_close(out["normals"], mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, backbone, options",
    [
        ("mtl_baseline", "resnet18", {"width": 0.125, "head_channels": 16}),
        ("ubernet", "resnet18", {"width": 0.125, "scales": (1.0, 0.5)}),
    ],
)
def test_heads_learn_from_their_task_only(name, backbone, options):
    model = build(name, backbone, options)
    out = model(torch.randn(2, 3, H, W))
    out["normals"].square().mean().backward()
    for task, head in model.heads.items():
        grads = [p.grad for p in head.parameters()]
        if task == "normals":
            assert all(g is not None for g in grads)
        else:
            assert all(g is None for g in grads), task
    assert all(p.grad is not None for p in model.backbone.parameters())


@pytest.mark.parametrize(
    "name, backbone, options",
    [
        ("ubernet", "resnet18", {"width": 0.125, "scales": (1.0, 0.5)}),
        ("astmt", "se_resnet26", {"width": 0.125, "head_channels": 16, "adapters": True}),
    ],
)
def test_channels_last_input(name, backbone, options):
    model = build(name, backbone, options).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        plain, last = model(x), model(x.to(memory_format=torch.channels_last))
    for task in plain:
        torch.testing.assert_close(last[task], plain[task], rtol=1e-4, atol=1e-4)
