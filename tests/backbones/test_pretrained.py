"""load_pretrained: torchvision-named checkpoints round-trip into every backbone; errors are clear."""

import warnings

import pytest
import torch

from mtlfast.backbones import (
    CONVERTERS,
    FPN,
    VGG16,
    MobileNetV2,
    ResNet,
    create_backbone,
    load_pretrained,
    register_converter,
    to_torchvision,
)


def _randomised(state):
    return {k: (torch.randn_like(v) if v.is_floating_point() else v + 3) for k, v in state.items()}


def _save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ResNet(18, width=0.125),
        lambda: ResNet(50, width=0.125, output_stride=16),
        lambda: MobileNetV2(width=0.25),
        lambda: VGG16(width=1 / 16),
    ],
)
def test_round_trip(tmp_path, factory):
    source, target = factory(), factory()
    state = _randomised(to_torchvision(source))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean load warns about nothing
        result = load_pretrained(target, _save(tmp_path, state))
    assert not result.unexpected and not result.missing
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_known_torchvision_names():
    assert {
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.bias",
    } <= set(ResNet(50).state_dict())
    assert {"layer1.0.conv2.weight", "layer2.0.downsample.1.weight"} <= set(ResNet(18).state_dict())
    assert {
        "features.0.0.weight",
        "features.0.1.running_mean",
        "features.1.conv.0.0.weight",
        "features.1.conv.1.weight",
        "features.2.conv.0.0.weight",
        "features.2.conv.3.bias",
        "features.17.conv.2.weight",
    } <= set(MobileNetV2().state_dict())
    assert {"features.0.weight", "features.0.bias", "features.28.weight"} <= set(
        VGG16().state_dict()
    )


def test_classifier_and_vgg_fc_are_reported(tmp_path):
    model = ResNet(18, width=0.125)
    state = to_torchvision(model)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    result = load_pretrained(model, _save(tmp_path, {"state_dict": state}))
    assert result.ignored == ["fc.weight", "fc.bias"] and not result.missing
    vgg = VGG16(width=1 / 16)
    state = to_torchvision(vgg)
    state["fc6.weight"] = torch.zeros(8, 16, 7, 7)  # a layer of the wrong shape: not loaded
    state["classifier.0.weight"] = torch.zeros(10, 49)
    with pytest.warns(UserWarning, match="1 mismatched"):
        result = load_pretrained(vgg, _save(tmp_path, state))
    assert result.mismatched == ["fc6.weight"] and result.ignored == ["classifier.0.weight"]
    assert "fc6.weight" not in result.loaded and "fc6.weight" not in result.missing


def test_missing_and_unexpected(tmp_path):
    model = ResNet(18, width=0.125)
    state = to_torchvision(model)
    del state["conv1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="1 missing, 1 unexpected"):
        result = load_pretrained(model, _save(tmp_path, state))
    assert result.missing == ["conv1.weight"] and result.unexpected == ["layer9.weight"]
    with pytest.raises(RuntimeError, match="strict"):
        load_pretrained(model, _save(tmp_path, state), strict=True)


def test_task_specific_backbone_takes_shared_weights(tmp_path):
    plain = ResNet(26, width=0.125, output_stride=16)
    state = _randomised(to_torchvision(plain))
    model = ResNet(
        26,
        width=0.125,
        output_stride=16,
        se=True,
        num_tasks=3,
        task_se=True,
        adapters=True,
        task_bn=True,
    )
    with pytest.warns(UserWarning, match="missing"):  # SE blocks and adapters are new
        result = load_pretrained(model, _save(tmp_path, state))
    assert not result.unexpected and not result.mismatched
    assert all(".se." in k or k.endswith("adapter_weight") for k in result.missing)
    torch.testing.assert_close(model.layer1[0].conv2.conv.weight, state["layer1.0.conv2.weight"])
    assert model.layer1[0].bn1.weight.shape == (3, 8)
    for t in range(3):
        torch.testing.assert_close(
            model.layer1[0].bn1.running_mean[t], state["layer1.0.bn1.running_mean"]
        )
    assert "layer1.0.bn1.weight" in result.broadcast


def test_fpn_takes_a_resnet_checkpoint(tmp_path):
    state = _randomised(to_torchvision(ResNet(18, width=0.125)))
    model = FPN(ResNet(18, width=0.125), 8)
    with pytest.warns(UserWarning, match="missing"):
        result = load_pretrained(model, _save(tmp_path, state))
    assert not result.unexpected and all(k.startswith("fpn.") for k in result.missing)
    torch.testing.assert_close(model.body.conv1.weight, state["conv1.weight"])


def test_converter_hook(tmp_path):
    class Renamed(ResNet):
        pass

    def converter(state, model):
        return {k.replace("stem.", "conv1."): v for k, v in state.items()}

    register_converter(Renamed, converter)
    try:
        model = Renamed(18, width=0.125)
        state = to_torchvision(model)
        state["stem.weight"] = state.pop("conv1.weight")
        result = load_pretrained(model, _save(tmp_path, state))
        assert not result.missing and not result.unexpected
    finally:
        del CONVERTERS[Renamed]


def test_errors(tmp_path):
    model = create_backbone("resnet18", width=0.125)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_pretrained(model, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(model, bad)
    with pytest.raises(TypeError, match="state dict"):
        load_pretrained(model, _save(tmp_path, [torch.zeros(1)]))
    with pytest.raises(TypeError, match="nn.Module"):
        load_pretrained("resnet18", bad)


def test_a_model_loads_into_its_backbone(tmp_path):
    from mtlfast.models import create

    model = create("ubernet", ["edge"], backbone="resnet18", width=0.125, scales=(1.0,))
    state = _randomised(to_torchvision(ResNet(18, width=0.125)))
    result = load_pretrained(model, _save(tmp_path, state))
    assert not result.missing and not result.unexpected
    torch.testing.assert_close(
        model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"]
    )
