"""HRNet-W18-small-v2: shapes, strides, size, segments, and loading release checkpoints."""

import math

import pytest
import torch
from torch import nn

from mtlfast.backbones import HRNet, hrnet_state_dict_from_release, load_hrnet_pretrained
from mtlfast.backbones.hrnet import HighResolutionModule

# hrnet_w18_small_model_v2.pth without its classification head; counted once from this module
W18_SMALL_V2_PARAMS = 3_860_720


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return HRNet()


def test_channels_strides_and_odd_sizes(net):
    assert net.channels == [18, 36, 72, 144]
    assert net.strides == [4, 8, 16, 32]
    x = torch.randn(1, 3, 37, 45)
    out = net(x)
    assert isinstance(out, tuple) and len(out) == 4
    for f, c, s in zip(out, net.channels, net.strides):
        # every stride-2 conv (padding 1) rounds up
        assert f.shape == (1, c, math.ceil(37 / s), math.ceil(45 / s))


def test_parameter_count_and_config(net):
    assert sum(p.numel() for p in net.parameters()) == W18_SMALL_V2_PARAMS
    assert len(net.layer1) == 2
    assert [len(net.stage2), len(net.stage3), len(net.stage4)] == [1, 3, 2]
    assert all(len(branch) == 2 for branch in net.stage4[0].branches)
    assert all(m.momentum == 0.01 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_segments_chain_is_the_forward(net):
    net.eval()
    x = torch.randn(1, 3, 33, 29)
    with torch.no_grad():
        y = x
        for m in net.segments():
            y = m(y)
        ref = net(x)
    net.train()
    assert len(net.segments()) == 2 + 3 + 1 + 3 + 2
    assert all(torch.equal(a, b) for a, b in zip(y, ref))


def test_backward_reaches_every_parameter():
    net = HRNet()
    out = net(torch.randn(2, 3, 37, 45))
    sum(f.square().mean() for f in out).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_module_rejects_nothing_and_keeps_shapes():
    m = HighResolutionModule([4, 8, 16], blocks=1)
    xs = (torch.randn(2, 4, 9, 7), torch.randn(2, 8, 5, 4), torch.randn(2, 16, 3, 2))
    out = m(xs)
    assert [o.shape for o in out] == [x.shape for x in xs]


# Names as they appear in the official HRNet-Image-Classification checkpoints, with their shapes.
RELEASE_KEYS = {
    "conv1.weight": (64, 3, 3, 3),
    "bn2.running_var": (64,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.1.conv3.weight": (256, 64, 1, 1),
    "transition1.0.0.weight": (18, 256, 3, 3),
    "transition1.1.0.0.weight": (36, 256, 3, 3),
    "transition2.2.0.0.weight": (72, 36, 3, 3),
    "transition3.3.0.1.bias": (144,),
    "stage2.0.branches.1.1.conv2.weight": (36, 36, 3, 3),
    "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
    "stage2.0.fuse_layers.1.0.0.0.weight": (36, 18, 3, 3),
    "stage3.2.fuse_layers.2.0.1.0.weight": (72, 18, 3, 3),
    "stage4.1.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3),
    "stage4.1.fuse_layers.3.0.2.0.weight": (144, 18, 3, 3),
    "stage4.1.fuse_layers.0.3.1.running_mean": (18,),
    "stage4.1.branches.3.1.bn2.weight": (144,),
}
HEAD_KEYS = {
    "incre_modules.0.0.conv1.weight": (32, 18, 1, 1),
    "downsamp_modules.0.0.weight": (256, 128, 3, 3),
    "final_layer.0.weight": (2048, 1024, 1, 1),
    "classifier.weight": (1000, 2048),
    "classifier.bias": (1000,),
}


def test_release_key_names(net):
    state = net.state_dict()
    for key, shape in RELEASE_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


def _release_checkpoint(net, prefix=""):
    """A checkpoint as the release ships it: the backbone, a classification head, no
    num_batches_tracked (the release predates them)."""
    state = {
        prefix + k: v.clone()
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    state.update({prefix + k: torch.randn(s) for k, s in HEAD_KEYS.items()})
    return state


@pytest.mark.parametrize("prefix", ["", "module."])
def test_converter_round_trip(net, prefix):
    converted = hrnet_state_dict_from_release(_release_checkpoint(net, prefix))
    expected = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert list(converted) == list(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert hrnet_state_dict_from_release({"state_dict": dict(converted)}).keys() == converted.keys()


def test_load_pretrained(net, tmp_path):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "hrnet_w18_small_model_v2.pth"
    torch.save(_release_checkpoint(net), path)
    fresh = HRNet()
    result = load_hrnet_pretrained(fresh, str(path))
    assert result.missing == [] and result.unexpected == []
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name

    partial = _release_checkpoint(net)
    del partial["conv1.weight"]
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    result = load_hrnet_pretrained(HRNet(), str(path))
    assert result.missing == ["conv1.weight"] and result.unexpected == ["extra.weight"]


def test_load_pretrained_into_a_model_with_hrnet_backbone_and_errors(net, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_release_checkpoint(net), path)
    holder = nn.Module()
    holder.backbone = HRNet()
    assert load_hrnet_pretrained(holder, str(path)).missing == []
    with pytest.raises(TypeError, match="HRNet"):
        load_hrnet_pretrained(nn.Linear(1, 1), str(path))
    wrong = HRNet(channels=(8, 16, 32, 64))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_hrnet_pretrained(wrong, str(path))
