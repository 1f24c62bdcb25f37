"""load_release_checkpoint: the authors' MTI-Net and PAD-Net, rebuilt in plain PyTorch the way
their release writes them (benchmarks/release_models.py: its module and key names, here at tiny
widths), converted, give the same outputs.

The release's HRNet backbone has the names of :class:`mtlfast.backbones.HRNet` (tests/backbones
checks them against the release's), so both networks here use an HRNet of the same widths.
"""

import pytest
import torch
from torch import nn

from benchmarks.release_models import FPM, ReleaseMTINet, ReleasePADNet
from mtlfast.backbones import HRNet
from mtlfast.models import MTINet, PADNet
from mtlfast.models.mtinet import FeaturePropagation
from mtlfast.models.release_mtinet import (
    RELEASE_TASK_NAMES,
    load_release_checkpoint,
    release_state_dict,
)

CHANNELS = (16, 16, 32, 32)  # the SE blocks need C >= 16 (the release's hidden width is C // 16)
TASKS = ["semseg", "parts", "normals"]
OUT = {"semseg": 21, "parts": 7, "normals": 3}
RELEASE = [RELEASE_TASK_NAMES.get(t, t) for t in TASKS]
RELEASE_OUT = {RELEASE_TASK_NAMES.get(t, t): c for t, c in OUT.items()}
SIZE = (64, 64)  # the release upsamples by factor 2 between scales: sizes must halve exactly


# ---- helpers -------------------------------------------------------------------------------------


def tiny_hrnet():
    return HRNet(channels=CHANNELS, modules=(1, 1, 1), blocks=1, stem_blocks=1)


def randomise(model):
    """Every parameter and batch-norm statistic random, so that a misplaced tensor shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(
                torch.randn_like(p) / fan_in**0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p)
            )
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model.eval()


@pytest.fixture(scope="module")
def release_mtinet():
    return randomise(ReleaseMTINet(RELEASE, tiny_hrnet(), CHANNELS, RELEASE_OUT))


@pytest.fixture(scope="module")
def release_padnet():
    return randomise(
        ReleasePADNet(RELEASE, tiny_hrnet(), CHANNELS, width=32, out_channels=RELEASE_OUT)
    )


def mtinet(tasks=TASKS):
    return MTINet(tasks, out_channels={t: OUT[t] for t in tasks}, backbone=tiny_hrnet()).eval()


def padnet(tasks=TASKS):
    return PADNet(
        tasks, out_channels={t: OUT[t] for t in tasks}, backbone=tiny_hrnet(), width=32
    ).eval()


def assert_same_outputs(ours, theirs):
    """Equal to 1e-5 in float64 (in float32 they differ by about 1e-6 of the outputs' scale)."""
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        got, expected = ours.double()(x), theirs.double()(x)
    ours.float(), theirs.float()
    assert sorted(got) == sorted(TASKS)
    for t, r in zip(TASKS, RELEASE):
        assert expected[r].abs().max() > 1e-2  # not a degenerate comparison
        torch.testing.assert_close(got[t], expected[r], rtol=1e-5, atol=1e-5, msg=t)


# ---- tests ---------------------------------------------------------------------------------------


def test_mtinet_outputs_equal_the_release(release_mtinet):
    model = load_release_checkpoint(mtinet(), release_mtinet.state_dict())
    assert all(
        m.softmax_grouping == "release"
        for m in model.modules()
        if isinstance(m, FeaturePropagation)
    )
    assert_same_outputs(model, release_mtinet)


def test_mtinet_paper_grouping_differs(release_mtinet):
    model = load_release_checkpoint(mtinet(), release_mtinet.state_dict(), softmax_grouping="paper")
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert not torch.allclose(model(x)["semseg"], release_mtinet(x)["semseg"], atol=1e-3)


def test_padnet_outputs_equal_the_release(release_padnet):
    assert_same_outputs(
        load_release_checkpoint(padnet(), release_padnet.state_dict()), release_padnet
    )


def test_padnet_any_task_order(release_padnet):
    """PAD-Net's layers are per task or per pair by name: the order of the tasks is free."""
    model = padnet(list(reversed(TASKS)))
    assert_same_outputs(load_release_checkpoint(model, release_padnet.state_dict()), release_padnet)


def test_one_to_one_mapping(release_mtinet):
    """Every model tensor comes from the checkpoint and every checkpoint tensor is used once."""
    state = release_mtinet.state_dict()
    model = mtinet()
    converted = release_state_dict(model, state)
    assert converted.keys() == model.state_dict().keys()
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in state.values())
    # a pair's weights land at [target, slot]: semseg (0) <- normals (2) is slot 1
    torch.testing.assert_close(
        converted["decoder.distillation.1.message_weight"][0, 1],
        state["distillation_scale_1.self_attention.semseg.normals.conv.weight"],
    )
    torch.testing.assert_close(
        converted["decoder.propagation.0.se.w2"][1],
        state["fpm_scale_1.se.human_parts.squeeze.2.weight"],
    )


def test_file_with_dataparallel_prefix_and_optimizer(release_padnet, tmp_path):
    """main.py's checkpoint.pth.tar: {"optimizer", "model" (DataParallel: "module." keys), "epoch"}."""
    state = {
        f"module.{k}": v
        for k, v in release_padnet.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    opt = torch.optim.Adam(release_padnet.parameters())
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"optimizer": opt.state_dict(), "model": state, "epoch": 3}, path)
    assert_same_outputs(load_release_checkpoint(padnet(), path), release_padnet)
    torch.save(state, tmp_path / "best_model.pth.tar")
    assert_same_outputs(
        load_release_checkpoint(padnet(), str(tmp_path / "best_model.pth.tar")), release_padnet
    )


def test_unknown_and_missing_keys_are_named(release_mtinet):
    state = dict(release_mtinet.state_dict())
    state["fpm_scale_1.extra.weight"] = torch.zeros(1)
    del state["distillation_scale_2.self_attention.normals.semseg.attention.0.weight"]
    model = mtinet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError) as err:
        load_release_checkpoint(model, state)
    message = str(err.value)
    assert (
        "missing 1: distillation_scale_2.self_attention.normals.semseg.attention.0.weight"
        in message
    )
    assert "unexpected 1: fpm_scale_1.extra.weight" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing copied


def test_auxiliary_task_checkpoint_is_refused():
    """A release trained with auxiliary tasks (front-end only) has no final layers for them."""
    release = ReleaseMTINet(RELEASE, tiny_hrnet(), CHANNELS, RELEASE_OUT)
    state = {k: v for k, v in release.state_dict().items() if not k.startswith("heads.normals.")}
    with pytest.raises(KeyError, match=r"missing \d+: heads\.normals\.last_layer"):
        load_release_checkpoint(mtinet(), state)


def test_wrong_shapes_task_order_and_types(release_mtinet, release_padnet, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"scale_0\.decoders\.semseg\.weight \(21, 16, 1, 1\) for decoder\.initial\.0\.decoders\.semseg\.weight",
    ):
        load_release_checkpoint(
            MTINet(TASKS, out_channels={"semseg": 5}, backbone=tiny_hrnet()),
            release_mtinet.state_dict(),
        )
    with pytest.raises(
        ValueError, match=r"build the MTINet with tasks=\['semseg', 'parts', 'normals'\]"
    ):
        load_release_checkpoint(mtinet(["normals", "semseg", "parts"]), release_mtinet.state_dict())
    with pytest.raises(KeyError, match="missing"):
        load_release_checkpoint(padnet(), release_mtinet.state_dict())
    with pytest.raises(TypeError, match="MTINet or a PADNet"):
        load_release_checkpoint(nn.Linear(1, 1), {})
    with pytest.raises(FileNotFoundError):
        load_release_checkpoint(padnet(), tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="softmax_grouping"):
        load_release_checkpoint(mtinet(), release_mtinet.state_dict(), softmax_grouping="tasks")


def test_task_names_option(release_padnet):
    state = {k.replace("human_parts", "body"): v for k, v in release_padnet.state_dict().items()}
    assert_same_outputs(
        load_release_checkpoint(padnet(), state, task_names={"parts": "body"}), release_padnet
    )


def test_feature_propagation_release_grouping_equals_the_release_fpm():
    t, c = 3, 16
    theirs = randomise(FPM(["a", "b", "c"], c))
    ours = FeaturePropagation(t, c, softmax_grouping="release").eval()
    ours.load_state_dict(
        {k: v for k, v in theirs.state_dict().items() if not k.startswith("se.")}, strict=False
    )
    with torch.no_grad():
        for i, name in enumerate("abc"):
            first, second = theirs.se[name].squeeze[0], theirs.se[name].squeeze[2]
            ours.se.w1[i], ours.se.b1[i] = first.weight, first.bias
            ours.se.w2[i], ours.se.b2[i] = second.weight, second.bias
    feats = [torch.randn(2, c, 5, 7) for _ in range(t)]
    with torch.no_grad():
        got = ours(feats)
        expected = theirs({f"features_{n}": f for n, f in zip("abc", feats)})
        ours.softmax_grouping = "paper"
        paper = ours(feats)
    for i, name in enumerate("abc"):
        torch.testing.assert_close(got[i], expected[name], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(paper[i], expected[name], atol=1e-4)
    with pytest.raises(ValueError, match="softmax_grouping"):
        FeaturePropagation(t, c, softmax_grouping="tasks")
