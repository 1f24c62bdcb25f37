"""summary: parameter attribution adds up, sizes match known networks."""

import pytest
from torch import nn

from mtlfast._extension import has_extension
from mtlfast.backbones import HRNet, ResNet
from mtlfast.models import MTINet, PADNet, create, summary
from mtlfast.nn import use_winograd


def test_resnet50_baseline_shares_the_encoder():
    model = create(
        "mtl_baseline", ["semseg", "normals"], backbone="resnet50", head="simple", head_channels=16
    )
    s = summary(model, (33, 47))
    assert abs(s.params_shared - 23.5e6) < 0.05e6  # ResNet-50 without fc
    assert s.params_shared + sum(s.params_per_task.values()) == s.params_total
    assert s.params_per_task["semseg"] > s.params_per_task["normals"]  # 21 vs 3 output channels
    assert s.macs > 0 and model.training and "GMACs" in str(s)


def test_resnet50_multiply_adds():
    s = summary(ResNet(50), (1, 3, 224, 224))
    assert (
        abs(s.macs / 1e9 - 4.09) < 0.03
    )  # torchvision's 4.09 GMACs, less the 2M of the classifier
    assert s.params_shared == s.params_total == 23_508_032


def test_astmt_counts_task_rows_and_all_tasks():
    model = create("astmt", ["semseg", "edge"], width=0.125, head_channels=16, adapters=True)
    s = summary(model, (33, 47))
    assert s.params_shared + sum(s.params_per_task.values()) == s.params_total
    heads = {t: sum(p.numel() for p in model.heads[t].parameters()) for t in model.tasks}
    assert all(
        s.params_per_task[t] > heads[t] for t in model.tasks
    )  # adapters, task SE and BN rows
    one = create("astmt", ["semseg"], width=0.125, head_channels=16, adapters=True)
    assert summary(one, (33, 47)).macs < s.macs  # forward_all runs every task


def _count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def _tiny_hrnet():
    return HRNet(channels=(4, 8, 8, 8), modules=(1, 1, 1), blocks=1, stem_blocks=1)


def test_mtinet_counts_its_decoder_per_task():
    model = MTINet(["semseg", "normals", "edge"], backbone=_tiny_hrnet())
    s = summary(model, (33, 47))
    assert s.params_shared + sum(s.params_per_task.values()) == s.params_total
    d, t = model.decoder, 3
    for task in model.tasks:
        own = _count(
            *(d.initial[i].refinement[task] for i in range(4)),
            *(d.initial[i].decoders[task] for i in range(4)),
            d.aggregation[task],
        )
        rows = _count(*(p.se for p in d.propagation), *d.distillation)  # one row per task, stacked
        assert rows % t == 0
        assert s.params_per_task[task] == own + rows // t, task
    harmonisation = _count(
        *(nn.ModuleList([p.non_linear, p.dimensionality_reduction]) for p in d.propagation)
    )
    assert s.params_shared == _count(model.backbone) + harmonisation


def test_padnet_counts_its_decoder_per_task():
    model = PADNet(["semseg", "depth"], dataset="nyud", backbone=_tiny_hrnet(), width=16)
    s = summary(model, (33, 47))
    assert s.params_shared + sum(s.params_per_task.values()) == s.params_total
    d = model.decoder
    for task in model.tasks:
        own = _count(d.initial[task], d.initial_out[task], d.final[task])
        assert s.params_per_task[task] == own + _count(d.distillation) // 2, task
    assert s.params_shared == _count(model.backbone, model.fuse)


@pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")
def test_multiply_adds_do_not_change_when_convolutions_go_winograd():
    # the trainer's default conv_algorithm switches eligible layers in place: a summary taken
    # after building a trainer must still count them (a dispatch mode sees the custom op whole)
    model = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.Conv2d(128, 128, 3, padding=1))
    before = summary(model, (1, 3, 32, 32)).macs
    assert use_winograd(model) == 1
    assert summary(model, (1, 3, 32, 32)).macs == before == (3 + 128) * 128 * 9 * 32 * 32
