"""The ASTMT release's checkpoints in mtlfast's ASTMT: same outputs, clear errors, inferred options.

The real weights are not needed: ``benchmarks.release_models.ReleaseNet`` rebuilds, in plain
PyTorch, the network of github.com/facebookresearch/astmt under the module names its state dict
has, at any width. Its random, perturbed weights stand in for a released checkpoint.
"""

import pytest
import torch
from torch import nn

from benchmarks.release_models import RELEASE_TASKS, ReleaseNet
from mtlfast.models import ASTMT, load_release_checkpoint, release_options, summary
from mtlfast.models.release import RELEASE_TASK_NAMES

OURS = {RELEASE_TASK_NAMES.get(t, t): n for t, n in RELEASE_TASKS.items()}


def _perturbed(net):
    """Random weights everywhere (adapters, BN statistics, per-task entries all distinct), as after training."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
        for m in net.decoder.conv_predict.values():
            m.weight.mul_(0.05)  # predictions of order 1, so that 1e-5 is float32 rounding's scale
    return net.eval()


def _converted(net, output_stride=16):
    """mtlfast's ASTMT built from the release net's state dict alone, and loaded from it."""
    state = net.state_dict()
    model = ASTMT(**{**release_options(state), "output_stride": output_stride})
    result = load_release_checkpoint(model, state)
    return model.eval(), result


# (release network options, output stride): its PASCAL configuration and the ablations' switches
RELEASES = [
    ({}, 16),  # train.sh: seenc, sedec, adapt, trNorm
    ({"adapt": False}, 16),  # SE modulation only (paper's SEA)
    (
        {"seenc": False, "sedec": False, "adapt": False, "dscr": False},
        16,
    ),  # the release's multi-task baseline
    ({"seenc": False, "trNorm": False}, 16),  # decoder-only modulation
    ({"layers": (3, 4, 6, 3), "width": 0.0625}, 8),  # SE-ResNet-50, output stride 8
    ({"tasks": {"sal": 1}, "adapt": True}, 16),  # one task
]


@pytest.mark.parametrize(
    "options, output_stride",
    RELEASES,
    ids=["pascal", "se-only", "baseline", "decoder-only", "r50-os8", "one-task"],
)
def test_release_outputs_are_reproduced(options, output_stride):
    options = {"width": 0.125, "dec_w": 32, **options}
    net = _perturbed(ReleaseNet(output_stride=output_stride, **options))
    model, result = _converted(net, output_stride)
    assert len(result.loaded) == len(model.state_dict())
    assert result.ignored == [k for k in net.state_dict() if k.startswith("discriminator.")]
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        together = model.forward_all(x)
        for task in net.decoder.conv_predict:
            theirs = net(x, task)
            ours = RELEASE_TASK_NAMES.get(task, task)
            scale = float(theirs.abs().max())
            assert 0.01 < scale < 10  # a signal of order 1
            # float32: 1e-5 of the predictions' scale (the two sum in different orders)
            torch.testing.assert_close(
                model(x, ours), theirs, rtol=1e-5, atol=1e-5 * max(scale, 1.0)
            )
            torch.testing.assert_close(
                together[ours], theirs, rtol=1e-5, atol=1e-5 * max(scale, 1.0)
            )
        # in float64 the two agree to rounding: the mapping is exact, not merely close
        net.double(), model.double()
        for task in net.decoder.conv_predict:
            torch.testing.assert_close(
                model(x.double(), RELEASE_TASK_NAMES.get(task, task)),
                net(x.double(), task),
                rtol=1e-10,
                atol=1e-10,
            )


def test_release_options():
    net = ReleaseNet(width=0.125, dec_w=32, seenc=False, sedec=False, adapt=True)
    options = release_options(net.state_dict())
    assert options == {
        "tasks": ["edge", "semseg", "parts", "normals", "saliency"],
        "out_channels": OURS,
        "backbone": "se_resnet26",
        "width": 0.125,
        "output_stride": 16,
        "head_channels": 32,
        "low_channels": 6,
        "se_encoder": False,
        "se_decoder": False,
        "decoder_se": False,
        "adapters": True,
        "decoder_adapters": True,
        "task_bn": (True, False),
    }
    assert (
        release_options(ReleaseNet(layers=(3, 4, 23, 3), width=0.0625).state_dict())["backbone"]
        == "se_resnet101"
    )


@pytest.mark.parametrize("adapt, count", [(True, 31_274_956), (False, 25_009_356)])
def test_parameter_counts_match_the_release(adapt, count):
    """The release's PASCAL network (SE-ResNet-26, five tasks, decoder 64 wide): 31.28M parameters
    with its discriminator's 4,421, 31,274,956 without; ASTMT's defaults are it without adapters."""
    release = ReleaseNet(adapt=adapt, dscr=False)
    ours = summary(ASTMT(list(OURS), adapters=adapt), (1, 3, 33, 33))
    assert sum(p.numel() for p in release.parameters()) == count
    assert ours.params_total == count


def test_checkpoint_file(tmp_path):
    net = _perturbed(ReleaseNet(width=0.125, dec_w=32))
    path = tmp_path / "model_epoch-59.pth"
    torch.save(
        {f"module.{k}": v for k, v in net.state_dict().items()}, path
    )  # as DataParallel saves it
    model = ASTMT(**release_options(path))
    load_release_checkpoint(model, path)
    x = torch.randn(1, 3, 29, 31)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x, "parts"), net(x, "human_parts"), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_release_checkpoint(model, tmp_path / "absent.pth")


def test_errors_name_the_keys():
    state = _perturbed(ReleaseNet(width=0.125, dec_w=32)).state_dict()
    model = ASTMT(**release_options(state))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fails(bad, *patterns):
        with pytest.raises(ValueError) as info:
            load_release_checkpoint(model, bad)
        for pattern in patterns:
            assert pattern in str(info.value)
        for k, v in model.state_dict().items():  # nothing copied
            assert torch.equal(v, before[k]), k

    fails(
        {k: v for k, v in state.items() if k != "layer2.1.se.fc.normals.2.bias"},
        "missing from the checkpoint: layer2.1.se.fc.normals.2.bias",
    )
    fails(
        {**state, "layer5.0.conv1.weight": torch.zeros(1)},
        "unexpected in the checkpoint: layer5.0.conv1.weight",
    )
    fails(
        {**state, "decoder.conv_predict.semseg.weight": torch.zeros(40, 32, 1, 1)},
        "shapes that disagree: decoder.conv_predict.semseg.weight (40, 32, 1, 1) -> heads.semseg.weight",
    )
    no_adapters = ASTMT(**{**release_options(state), "adapters": False})
    with pytest.raises(
        ValueError, match=r"unexpected in the checkpoint: layer1\.0\.adapt\.edge\.weight"
    ):
        load_release_checkpoint(no_adapters, state)
    # a model whose backbone has the torchvision layout holds the same shapes but computes otherwise
    from mtlfast.backbones import ResNet

    tv = ResNet(
        26,
        output_stride=16,
        width=0.125,
        se=True,
        num_tasks=5,
        task_se=True,
        adapters=True,
        task_bn=True,
        stem_task_bn=False,
    )
    with pytest.raises(ValueError, match="stride_in_1x1"):
        load_release_checkpoint(ASTMT(**{**release_options(state), "backbone": tv}), state)
    with pytest.raises(TypeError, match="SE-ResNet"):
        load_release_checkpoint(
            ASTMT(["semseg"], "se_mobilenet_v2", width=0.25, head_channels=16), state
        )
    with pytest.raises(TypeError, match="state dict"):
        load_release_checkpoint(model, [1, 2])
