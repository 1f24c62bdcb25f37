"""Small model configurations shared by the model tests: narrow widths, odd-sized inputs."""

from mtlfast.models import create

H, W = 33, 47
TASKS = ["semseg", "normals", "edge"]

#: (model, backbone, options): every model with every backbone it supports, at test widths.
CASES = [
    ("mtl_baseline", "resnet18", {"width": 0.125, "head_channels": 16}),
    ("mtl_baseline", "se_resnet26", {"width": 0.125, "head_channels": 16}),
    ("mtl_baseline", "resnet50", {"width": 0.0625, "head_channels": 16, "head": "simple"}),
    ("mtl_baseline", "mobilenet_v2", {"width": 0.25, "head_channels": 16}),
    ("mtl_baseline", "se_mobilenet_v2", {"width": 0.25, "head_channels": 16, "head": "simple"}),
    ("mtl_baseline", "fpn_resnet18", {"width": 0.125, "head_channels": 16, "fpn_channels": 16}),
    ("mtl_baseline", "vgg16", {"width": 1 / 32, "head_channels": 16}),
    ("mtl_baseline", "se_resnet101", {"width": 0.0625, "head_channels": 16, "head": "simple"}),
    ("single_task", "resnet18", {"width": 0.125, "head_channels": 16}),
    ("ubernet", "vgg16", {"width": 1 / 32, "scales": (1.0, 0.5)}),
    ("ubernet", "resnet18", {"width": 0.125}),
    ("ubernet", "se_resnet26", {"width": 0.125, "scales": (1.0,)}),
    ("ubernet", "fpn_resnet18", {"width": 0.125, "scales": (1.0, 0.5), "fpn_channels": 16}),
    ("ubernet", "se_mobilenet_v2", {"width": 0.25, "scales": (1.0, 0.5)}),
    ("astmt", "se_resnet26", {"width": 0.125, "head_channels": 16, "adapters": True}),
    ("astmt", "se_resnet50", {"width": 0.0625, "head_channels": 16, "se_encoder": False}),
    ("astmt", "se_resnet101", {"width": 0.0625, "head_channels": 16, "output_stride": 8}),
    ("astmt", "se_mobilenet_v2", {"width": 0.25, "head_channels": 16}),
]


def build(name, backbone, options, tasks=None):
    options = dict(options)
    tasks = tasks or (TASKS[:1] if name == "single_task" else TASKS)
    return create(name, tasks, backbone=backbone, **options)
