"""summary: parameter attribution adds up, sizes match known networks."""

from mtlfast.backbones import ResNet
from mtlfast.models import create, summary


def test_resnet50_baseline_shares_the_encoder():
    model = create("mtl_baseline", ["semseg", "normals"], backbone="resnet50", head="simple", head_channels=16)
    s = summary(model, (33, 47))
    assert abs(s.params_shared - 23.5e6) < 0.05e6  # ResNet-50 without fc
    assert s.params_shared + sum(s.params_per_task.values()) == s.params_total
    assert s.params_per_task["semseg"] > s.params_per_task["normals"]  # 21 vs 3 output channels
    assert s.macs > 0 and model.training and "GMACs" in str(s)


def test_resnet50_multiply_adds():
    s = summary(ResNet(50), (1, 3, 224, 224))
    assert abs(s.macs / 1e9 - 4.09) < 0.03  # torchvision's 4.09 GMACs, less the 2M of the classifier
    assert s.params_shared == s.params_total == 23_508_032


def test_astmt_counts_task_rows_and_all_tasks():
    model = create("astmt", ["semseg", "edge"], width=0.125, head_channels=16, adapters=True)
    s = summary(model, (33, 47))
    assert s.params_shared + sum(s.params_per_task.values()) == s.params_total
    heads = {t: sum(p.numel() for p in model.heads[t].parameters()) for t in model.tasks}
    assert all(s.params_per_task[t] > heads[t] for t in model.tasks)  # adapters, task SE and BN rows
    one = create("astmt", ["semseg"], width=0.125, head_channels=16, adapters=True)
    assert summary(one, (33, 47)).macs < s.macs  # forward_all runs every task
