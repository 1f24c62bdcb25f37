"""A tiny run configuration: a narrow shared-encoder baseline on 32x32 synthetic scenes."""

from mtlfast.train import load_config

TASKS = ["semseg", "saliency", "normals", "depth"]


def tiny_config(*overrides: str, tasks=None):
    """A config that trains in a few seconds on one thread; ``overrides`` as ``--set``."""
    base = {
        "seed": 3,
        "tasks": list(tasks or TASKS),
        "model": {
            "name": "mtl_baseline",
            "backbone": "resnet18",
            "options": {"width": 0.125, "head": "simple", "head_channels": 8},
        },
        "data": {
            "size": 32,
            "batch_size": 4,
            "train_samples": 64,
            "eval_samples": 8,
            "num_workers": 0,
        },
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {
            "max_steps": 6,
            "eval_every": 3,
            "checkpoint_every": 2,
            "log_every": 1,
            "threads": 1,
            "progress": False,
            "plots": False,
            "tensorboard": False,
        },
        "eval": {"edge_thresholds": 5, "bn_recalibration": 2},
    }
    return load_config(base, list(overrides))
