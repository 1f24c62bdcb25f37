"""Models by name: ``create("astmt", ["semseg", "normals"], backbone="se_resnet26")``; one line per model.

``create("single_task", "semseg", like="mtinet")`` is the single-task network of a model family, the
reference of its Delta_m (see :func:`mtlfast.models.single_task.single_task`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ._build import make_backbone
from .astmt import ASTMT
from .baseline import MTLBaseline
from .mtinet import MTINet
from .padnet import PADNet
from .single_task import single_task
from .ubernet import UberNet

__all__ = ["create", "list_models", "register"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Adds ``factory(tasks, backbone=..., **options) -> nn.Module`` under ``name`` (replacing any)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create(name: str, tasks: Sequence[str], backbone=None, **options) -> nn.Module:
    """The model ``name`` for ``tasks``; ``backbone`` (a name or instance; None: the model's default)
    and ``options`` (dataset, out_channels, width, ...) go to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if backbone is not None:
        options["backbone"] = backbone
    return _REGISTRY[name](tasks, **options)


register("mtl_baseline", MTLBaseline)
register("single_task", single_task)
register("ubernet", UberNet)
register("astmt", ASTMT)


def _cross_task(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    """MTI-Net / PAD-Net from a backbone name (default HRNet-18) or instance."""

    def factory(
        tasks: Sequence[str], backbone: str | nn.Module = "hrnet18", **options
    ) -> nn.Module:
        return cls(tasks, backbone=make_backbone(backbone), **options)

    factory.__doc__ = cls.__doc__
    return factory


register("mtinet", _cross_task(MTINet))
register("padnet", _cross_task(PADNet))
