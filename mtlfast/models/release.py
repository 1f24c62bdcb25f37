"""The ASTMT release's checkpoints (github.com/facebookresearch/astmt) in mtlfast's :class:`ASTMT`.

``ASTMT(**release_options(path))`` builds the network a released state dict was trained as, and
``load_release_checkpoint(model, path)`` copies it in under mtlfast's names, so that each task's
eval-mode output is the release's. Only the SE-ResNet networks
(``fblib/networks/deeplab_multi_task/deeplab_se_resnet_multitask.py`` with the ``atrous-v3``
decoder) are covered; the release's SE-MobileNetV2 is a different network (see :class:`ASTMT`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from ..backbones import ResNet
from ..backbones.pretrained import LoadResult
from ..backbones.resnet import Bottleneck
from ..nn import ResidualAdapter, TaskBatchNorm2d, TaskSE
from .astmt import ASTMT

__all__ = ["RELEASE_TASK_NAMES", "load_release_checkpoint", "release_options"]

#: The release's task names that mtlfast spells otherwise (release -> mtlfast); the rest agree.
RELEASE_TASK_NAMES = {"human_parts": "parts", "sal": "saliency"}
_OUR_TO_RELEASE = {v: k for k, v in RELEASE_TASK_NAMES.items()}

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_DEPTH_OF_LAYER3 = {2: 26, 6: 50, 23: 101}
_PREDICT = "decoder.conv_predict."


def _read(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], who: str
) -> dict[str, torch.Tensor]:
    """The release's state dict from a path (``torch.load(weights_only=True)``) or a mapping; ``module.`` dropped."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{who}: no checkpoint file at {path!r} (mtlfast never downloads weights)"
            )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncated files, non-checkpoint files
            raise ValueError(f"{who}: cannot read {path!r} as a torch checkpoint: {e}") from e
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()
    ):
        raise TypeError(
            f"{who}: expected a state dict (str -> tensor), got {type(checkpoint).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _release_tasks(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The release's task names, in its order: the keys of ``decoder.conv_predict``."""
    names = [
        k[len(_PREDICT) :].rsplit(".", 1)[0]
        for k in state
        if k.startswith(_PREDICT) and k.endswith(".weight")
    ]
    if not names:
        raise ValueError(
            "not an ASTMT release checkpoint: no 'decoder.conv_predict.<task>.weight' keys "
            f"(first keys: {list(state)[:5]})"
        )
    return names


def release_options(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict:
    """The :class:`ASTMT` keyword arguments that rebuild a release checkpoint's network.

    Read from the state dict: the tasks (the release's ``human_parts`` and ``sal`` renamed
    ``parts`` and ``saliency``) and their output channels, the depth (SE-ResNet-26/50/101) and
    width, the decoder's widths, and which of task SE, adapters and task batch norm the encoder
    and the decoder have. The output stride leaves no trace in the weights: the release's
    default, 16, is returned; pass ``output_stride=8`` for a model trained so.

    Shapes: ``ASTMT(**release_options(path))`` then :func:`load_release_checkpoint`.
    """
    state = _read(checkpoint, "release_options")
    tasks = _release_tasks(state)
    blocks = {
        i: len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4)
    }
    if "conv1.weight" not in state or blocks[3] not in _DEPTH_OF_LAYER3:
        raise ValueError(
            f"release_options: not an SE-ResNet-26/50/101 release checkpoint (blocks per stage {blocks})"
        )
    first = tasks[0]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    return {
        "tasks": [RELEASE_TASK_NAMES.get(t, t) for t in tasks],
        "out_channels": {
            RELEASE_TASK_NAMES.get(t, t): state[f"{_PREDICT}{t}.weight"].shape[0] for t in tasks
        },
        "backbone": f"se_resnet{_DEPTH_OF_LAYER3[blocks[3]]}",
        "width": state["conv1.weight"].shape[0] / 64,
        "output_stride": 16,
        "head_channels": state["decoder.conv_process.process.0.weight"].shape[0],
        "low_channels": state["decoder.low_level_reduce.process.0.weight"].shape[0],
        "se_encoder": has(f"layer1.0.se.fc.{first}."),
        "se_decoder": has("decoder.conv_process.se."),
        "decoder_se": has("decoder.conv_process.se."),
        "adapters": has("layer1.0.adapt."),
        "decoder_adapters": has("decoder.conv_process.adapt."),
        "task_bn": (has(f"layer1.0.bn1.{first}."), has(f"decoder.conv_process.norm.{first}.")),
    }


class _Plan:
    """Where each of the model's tensors comes from: (release key, task row or None) per model key."""

    def __init__(self, model: ASTMT, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state
        self.tasks = [_OUR_TO_RELEASE.get(t, t) for t in model.tasks]
        self.sources: dict[str, list[tuple[str, int | None]]] = {}

    def _keyed(self, theirs: str, leaf: str, stacked: bool) -> list[tuple[str, int | None]]:
        """Per-task rows ``<theirs>.<task>.<leaf>``, or the shared ``<theirs>.<leaf>``.

        A one-task model's shared layer is its task's layer: it takes either spelling.
        """
        if stacked:
            return [(f"{theirs}.{t}.{leaf}", i) for i, t in enumerate(self.tasks)]
        shared = f"{theirs}.{leaf}"
        if len(self.tasks) == 1 and shared not in self.state:
            return [(f"{theirs}.{self.tasks[0]}.{leaf}", None)]
        return [(shared, None)]

    def tensor(self, ours: str, theirs: str) -> None:
        self.sources[ours] = [(theirs, None)]

    def norm(self, ours: str, module: nn.Module, theirs: str) -> None:
        stacked = isinstance(module, TaskBatchNorm2d) and module.num_tasks > 1
        if isinstance(module, TaskBatchNorm2d) and not stacked:
            # (1, C) rows: one task's norm, under either spelling
            for leaf in _BN:
                self.sources[f"{ours}.{leaf}"] = [
                    (k, 0) for k, _ in self._keyed(theirs, leaf, False)
                ]
            return
        for leaf in _BN:
            self.sources[f"{ours}.{leaf}"] = self._keyed(theirs, leaf, stacked)

    def se(self, ours: str, module: TaskSE, theirs: str) -> None:
        stacked = module.num_tasks > 1
        for mine, (layer, leaf) in {
            "w1": (0, "weight"),
            "b1": (0, "bias"),
            "w2": (2, "weight"),
            "b2": (2, "bias"),
        }.items():
            keys = self._keyed(f"{theirs}.fc", f"{layer}.{leaf}", stacked)
            self.sources[f"{ours}.{mine}"] = keys if stacked else [(keys[0][0], 0)]

    def conv(self, ours: str, module: nn.Module, theirs: str, adapt: str) -> None:
        if isinstance(module, ResidualAdapter):
            self.tensor(f"{ours}.conv.weight", f"{theirs}.weight")
            self.sources[f"{ours}.adapter_weight"] = [
                (f"{adapt}.{t}.weight", i) for i, t in enumerate(self.tasks)
            ]
            return
        self.tensor(f"{ours}.weight", f"{theirs}.weight")
        if getattr(module, "bias", None) is not None:
            self.tensor(f"{ours}.bias", f"{theirs}.bias")

    def block(self, ours: str, module: nn.Sequential, theirs: str, conv_index: int = 0) -> None:
        """A decoder block (conv, norm, ReLU[, SE]) <- the release's ``ConvCoupledSE``."""
        self.conv(f"{ours}.0", module[0], f"{theirs}.process.{conv_index}", f"{theirs}.adapt")
        self.norm(f"{ours}.1", module[1], f"{theirs}.norm")
        if len(module) > 3:
            self.se(f"{ours}.3", module[3], f"{theirs}.se")


def _check_layout(model: ASTMT) -> ResNet:
    """The model's backbone must compute what the release's does (not only hold the same shapes)."""
    backbone = model.backbone
    if not isinstance(backbone, ResNet) or not isinstance(backbone.layer1[0], Bottleneck):
        raise TypeError(
            "load_release_checkpoint: only SE-ResNet-26/50/101 ASTMT models have release checkpoints, "
            f"got a {type(backbone).__name__} backbone"
        )
    if any(isinstance(m, nn.ReLU6) for m in model.decoder.modules()):
        raise TypeError(
            "load_release_checkpoint: the release's ResNet decoder is not depthwise separable"
        )
    first = backbone.layer2[0]
    conv2 = first.conv2.conv if isinstance(first.conv2, ResidualAdapter) else first.conv2
    last = backbone.layer4
    dilations = [
        (b.conv2.conv if isinstance(b.conv2, ResidualAdapter) else b.conv2).dilation for b in last
    ]
    if first.conv1.stride != (2, 2) or conv2.stride != (1, 1) or len(set(dilations)) != 1:
        raise ValueError(
            "load_release_checkpoint: the backbone must stride in its 1x1 convolutions and dilate the "
            "first block of a dilated stage (ResNet(stride_in_1x1=True, dilate_first_block=True)), "
            "as ASTMT builds it"
        )
    return backbone


def _plan(model: ASTMT, state: Mapping[str, torch.Tensor]) -> _Plan:
    backbone = _check_layout(model)
    plan = _Plan(model, state)
    plan.tensor("backbone.conv1.weight", "conv1.weight")
    plan.norm("backbone.bn1", backbone.bn1, "bn1")
    for i in (1, 2, 3, 4):
        for j, block in enumerate(getattr(backbone, f"layer{i}")):
            ours, theirs = f"backbone.layer{i}.{j}", f"layer{i}.{j}"
            for c in (1, 2, 3):
                plan.conv(
                    f"{ours}.conv{c}",
                    getattr(block, f"conv{c}"),
                    f"{theirs}.conv{c}",
                    f"{theirs}.adapt",
                )
                plan.norm(f"{ours}.bn{c}", getattr(block, f"bn{c}"), f"{theirs}.bn{c}")
            if block.se is not None:
                plan.se(f"{ours}.se", block.se, f"{theirs}.se")
            if block.downsample is not None:
                plan.conv(
                    f"{ours}.downsample.0", block.downsample[0], f"{theirs}.downsample.process", ""
                )
                plan.norm(f"{ours}.downsample.1", block.downsample[1], f"{theirs}.downsample.norm")
    aspp, decoder = model.decoder.aspp, model.decoder
    for k, branch in enumerate(aspp.branches):
        plan.block(f"decoder.aspp.branches.{k}", branch, f"decoder.layer5.conv2d_list.{k}")
    plan.block(
        "decoder.aspp.pool",
        aspp.pool,
        f"decoder.layer5.conv2d_list.{len(aspp.branches)}",
        conv_index=1,
    )
    plan.block("decoder.aspp.project", aspp.project, "decoder.layer5.conv2d_final")
    plan.block("decoder.reduce", decoder.reduce, "decoder.low_level_reduce")
    plan.block("decoder.fuse1", decoder.fuse1, "decoder.conv_concat")
    plan.block("decoder.fuse2", decoder.fuse2, "decoder.conv_process")
    for name, theirs in zip(model.tasks, plan.tasks):
        plan.conv(f"heads.{name}", model.heads[name], f"{_PREDICT}{theirs}", "")
    return plan


def _listing(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_release_checkpoint(
    model: ASTMT, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadResult:
    """Loads a state dict of the ASTMT release (its ``model_epoch-*.pth``) into ``model``.

    ``checkpoint``: a path, read with ``torch.load(weights_only=True)``, or the state dict itself
    (a ``module.`` prefix, from DataParallel, is dropped). The release's names are mapped onto
    mtlfast's: its per-task ``ModuleDict`` entries (``<layer>.<task>.*``, tasks ``human_parts``
    and ``sal`` being mtlfast's ``parts`` and ``saliency``) become the rows of mtlfast's stacked
    per-task layers (task SE, task batch norm, adapters), ``decoder.conv_predict.<task>`` the
    ``heads``. The gradient discriminator (``discriminator.*``), used only in training, is not
    part of the network: its keys are listed in the result's ``ignored``. Checkpoints without
    ``num_batches_tracked`` buffers (older torch) leave the model's.

    Build ``model`` as the checkpoint was trained: ``ASTMT(**release_options(checkpoint))``.
    Every tensor is checked before anything is copied: keys the model needs and the checkpoint
    lacks, checkpoint keys nothing maps to, and shapes that disagree raise a ``ValueError``
    naming them; the model is then unchanged.

    Returns a :class:`mtlfast.backbones.LoadResult` (model keys in ``loaded``, the release's
    discriminator keys in ``ignored``).

    Raises: FileNotFoundError, TypeError (not an ASTMT over an SE-ResNet built as the release's,
    or not a state dict), ValueError (unreadable file, missing/unexpected/mismatched keys).
    """
    if not isinstance(model, ASTMT):
        raise TypeError(
            f"load_release_checkpoint: model must be an ASTMT, got {type(model).__name__}"
        )
    state = _read(checkpoint, "load_release_checkpoint")
    plan = _plan(model, state)
    target = model.state_dict()
    unplanned = [k for k in target if k not in plan.sources]
    if unplanned:  # a module this converter does not know; never load half a model
        raise TypeError(
            f"load_release_checkpoint: no release counterpart for model keys {_listing(unplanned)}"
        )
    result = LoadResult(ignored=[k for k in state if k.startswith("discriminator.")])
    missing, mismatched, used = [], [], set(result.ignored)
    new = {}
    for ours, sources in plan.sources.items():
        absent = [k for k, _ in sources if k not in state]
        optional = ours.endswith("num_batches_tracked")
        used.update(k for k, _ in sources if k in state)
        if absent:
            if not optional:
                missing += absent
            continue
        value = target[ours].detach().clone()
        for key, row in sources:
            dest = value if row is None else value[row]
            if dest.shape != state[key].shape:
                mismatched.append(f"{key} {tuple(state[key].shape)} -> {ours} {tuple(dest.shape)}")
            else:
                dest.copy_(state[key])
        new[ours] = value
    unexpected = [k for k in state if k not in used]
    if missing or unexpected or mismatched:
        problems = [
            f"{name}: {_listing(keys)}"
            for name, keys in (
                ("missing from the checkpoint", missing),
                ("unexpected in the checkpoint", unexpected),
                ("shapes that disagree", mismatched),
            )
            if keys
        ]
        raise ValueError(
            "load_release_checkpoint: the checkpoint does not fit this model (build it with "
            "ASTMT(**release_options(checkpoint))); " + "; ".join(problems)
        )
    with torch.no_grad():
        for ours, value in new.items():
            target[ours].copy_(value)
    result.loaded = list(new)
    return result
