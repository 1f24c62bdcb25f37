"""Loading the MTI-Net authors' trained MTI-Net and PAD-Net weights into :class:`MTINet` / :class:`PADNet`.

The release (github.com/SimonVandenhende/Multi-Task-Learning-PyTorch, ``models/mti_net.py`` and
``models/padnet.py`` on the HRNet-18 backbone of ``models/seg_hrnet.py``) names its layers per
task (``scale_0.refinement.semseg.0.conv1.weight``) and its distillation per pair
(``distillation_scale_0.self_attention.semseg.normals.attention.0.weight``); mtlfast stacks the
per-pair and per-task SE tensors. :func:`load_release_checkpoint` maps one onto the other, one
to one: every tensor of the model comes from exactly one tensor of the checkpoint (the stacked
ones from one per task or pair), and every tensor of the checkpoint is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .mtinet import FeaturePropagation, MTINet
from .padnet import PADNet

__all__ = ["RELEASE_TASK_NAMES", "load_release_checkpoint", "release_state_dict"]

#: mtlfast task name -> the release's (``utils/config.py``); the others are spelled alike.
RELEASE_TASK_NAMES = {"parts": "human_parts", "saliency": "sal"}


@dataclass(frozen=True)
class _Source:
    """Where one model tensor comes from: these checkpoint keys, each of shape ``part``, stacked
    in order and reshaped to the model's shape (one key: copied as is)."""

    keys: list[str]
    part: tuple[int, ...] | None = None  # None: the model tensor's own shape

    def build(self, state: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        if len(self.keys) == 1 and self.part is None:
            return state[self.keys[0]]
        return torch.stack([state[k] for k in self.keys]).reshape(shape)


def _copy(key: str) -> _Source:
    return _Source([key])


def _stack(keys: list[str], shape: Sequence[int], lead: int) -> _Source:
    """``lead`` leading dims of ``shape`` index the keys, row-major."""
    return _Source(keys, tuple(shape[lead:]))


def _rename(prefix_map: Sequence[tuple[str, str]], key: str) -> str | None:
    for ours, theirs in prefix_map:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


def _distillation_sources(
    ours: str, theirs: str, layer: nn.Module, tasks: Sequence[str]
) -> dict[str, _Source]:
    """``<ours>.mask_weight`` [k, s] <- ``<theirs>.self_attention.<task k>.<source>.attention.0.weight``."""
    t = len(tasks)
    out = {}
    for name, leaf in (("mask_weight", "attention.0.weight"), ("message_weight", "conv.weight")):
        keys = [
            f"{theirs}.self_attention.{tasks[k]}.{tasks[l]}.{leaf}"
            for k in range(t)
            for l in range(t)
            if l != k
        ]
        out[f"{ours}.{name}"] = _stack(keys, getattr(layer, name).shape, 2)
    return out


def _se_sources(ours: str, theirs: str, se: nn.Module, tasks: Sequence[str]) -> dict[str, _Source]:
    """TaskSE's stacked ``w1, b1, w2, b2`` <- the release's ``SEBlock`` per task (``squeeze.0``, ``squeeze.2``)."""
    leaves = {
        "w1": "squeeze.0.weight",
        "b1": "squeeze.0.bias",
        "w2": "squeeze.2.weight",
        "b2": "squeeze.2.bias",
    }
    return {
        f"{ours}.{name}": _stack(
            [f"{theirs}.se.{task}.{leaf}" for task in tasks], getattr(se, name).shape, 1
        )
        for name, leaf in leaves.items()
    }


def _mtinet_sources(model: MTINet, tasks: list[str]) -> dict[str, _Source]:
    prefixes: list[tuple[str, str]] = [("backbone.", "backbone.")]
    for s in range(4):
        for ours, theirs in zip(model.decoder.task_names, tasks):
            prefixes += [
                (f"decoder.initial.{s}.refinement.{ours}.", f"scale_{s}.refinement.{theirs}."),
                (f"decoder.initial.{s}.decoders.{ours}.", f"scale_{s}.decoders.{theirs}."),
            ]
    for s in (1, 2, 3):
        for part in ("non_linear", "dimensionality_reduction"):
            prefixes.append((f"decoder.propagation.{s - 1}.{part}.", f"fpm_scale_{s}.{part}."))
    for ours, theirs in zip(model.decoder.task_names, tasks):
        prefixes.append((f"decoder.aggregation.{ours}.", f"heads.{theirs}.last_layer."))
    special: dict[str, _Source] = {}
    for s in range(4):
        special.update(
            _distillation_sources(
                f"decoder.distillation.{s}",
                f"distillation_scale_{s}",
                model.decoder.distillation[s],
                tasks,
            )
        )
    for s in (1, 2, 3):
        special.update(
            _se_sources(
                f"decoder.propagation.{s - 1}.se",
                f"fpm_scale_{s}",
                model.decoder.propagation[s - 1].se,
                tasks,
            )
        )
    return _sources(model, prefixes, special)


def _padnet_sources(model: PADNet, tasks: list[str]) -> dict[str, _Source]:
    # The release's backbone is nn.Sequential(HRNet, HighResolutionFuse) (``fuse_hrnet: True``).
    prefixes: list[tuple[str, str]] = [("backbone.", "backbone.0."), ("fuse.", "backbone.1.")]
    for ours, theirs in zip(model.decoder.task_names, tasks):
        prefixes += [
            (f"decoder.initial.{ours}.", f"initial_task_prediction_heads.layers.{theirs}."),
            (f"decoder.initial_out.{ours}.", f"initial_task_prediction_heads.conv_out.{theirs}."),
            (f"decoder.final.{ours}.", f"heads.{theirs}."),
        ]
    special = _distillation_sources(
        "decoder.distillation", "multi_modal_distillation", model.decoder.distillation, tasks
    )
    return _sources(model, prefixes, special)


def _sources(
    model: nn.Module, prefixes: list[tuple[str, str]], special: dict[str, _Source]
) -> dict[str, _Source]:
    out = {}
    for key in model.state_dict():
        if key in special:
            out[key] = special[key]
            continue
        theirs = _rename(prefixes, key)
        if theirs is None:
            raise TypeError(
                f"load_release_checkpoint: no release name for {type(model).__name__}'s {key!r}"
            )
        out[key] = _copy(theirs)
    return out


def _release_tasks(model: nn.Module, task_names: Mapping[str, str] | None) -> list[str]:
    names = {**RELEASE_TASK_NAMES, **dict(task_names or {})}
    return [names.get(t, t) for t in model.decoder.task_names]


def _read(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_release_checkpoint: no checkpoint file at {path!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    # main.py saves the DataParallel model's state dict (best_model.pth.tar), or it under "model"
    # beside the optimizer's (checkpoint.pth.tar).
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise TypeError(
            f"load_release_checkpoint: expected a state dict (str -> tensor), got {type(state).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _checkpoint_order(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The release's task order (its ``AUXILARY_TASKS``), as its ModuleDicts stored them."""
    seen: list[str] = []
    for key in state:
        m = re.match(r"scale_0\.decoders\.([^.]+)\.", key)
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def _short(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def release_state_dict(
    model: MTINet | PADNet,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    task_names: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The release checkpoint under ``model``'s names, checked; see :func:`load_release_checkpoint`."""
    if not isinstance(model, (MTINet, PADNet)):
        raise TypeError(
            f"load_release_checkpoint: expected an MTINet or a PADNet, got {type(model).__name__}"
        )
    state = _read(path_or_state_dict)
    tasks = _release_tasks(model, task_names)
    if isinstance(model, MTINet):
        order = _checkpoint_order(state)
        if order and sorted(order) == sorted(tasks) and order != tasks:
            # The feature propagation concatenates the tasks in this order: its weights fix it.
            wanted = [model.decoder.task_names[tasks.index(r)] for r in order]
            raise ValueError(
                f"load_release_checkpoint: the checkpoint's tasks are in the order {order}, the model's "
                f"in {tasks} (release names); build the MTINet with tasks={wanted}"
            )
        sources = _mtinet_sources(model, tasks)
    else:
        sources = _padnet_sources(model, tasks)
    target = model.state_dict()
    # Checkpoints without num_batches_tracked (torch < 0.4) leave the model's: eval ignores them.
    optional = {k for k in target if k.endswith("num_batches_tracked")}
    missing = sorted(
        k for key, src in sources.items() if key not in optional for k in src.keys if k not in state
    )
    used = {k for src in sources.values() for k in src.keys}
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        raise KeyError(
            f"load_release_checkpoint: the checkpoint does not match this {type(model).__name__} "
            f"(release tasks {tasks}): "
            + "; ".join(
                f"{what} {len(keys)}: {_short(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
        )
    out = {}
    mismatched = []
    for key, src in sources.items():
        if not all(k in state for k in src.keys):
            continue  # an optional buffer the checkpoint lacks
        expected = tuple(target[key].shape)
        part = expected if src.part is None else src.part
        bad = [k for k in src.keys if tuple(state[k].shape) != part]
        if bad:
            mismatched.append(f"{bad[0]} {tuple(state[bad[0]].shape)} for {key} (needs {part})")
            continue
        out[key] = src.build(state, expected)
    if mismatched:
        raise ValueError(
            "load_release_checkpoint: shapes differ: "
            + "; ".join(mismatched[:8])
            + (f" and {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        )
    return out


def load_release_checkpoint(
    model: MTINet | PADNet,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    task_names: Mapping[str, str] | None = None,
    softmax_grouping: str = "release",
) -> MTINet | PADNet:
    """Loads a checkpoint of the authors' MTI-Net or PAD-Net (HRNet-18) into ``model``, in place.

    Args:
        model: an :class:`MTINet` or a :class:`PADNet` with the checkpoint's tasks, output
            channels, backbone (:class:`mtlfast.backbones.HRNet` of the same widths) and, for
            PAD-Net, ``width`` (256 in the release). An MTINet's tasks must be in the
            checkpoint's order (the release's ``utils/config.py`` order: semseg, human_parts,
            sal, normals, edge, depth), which fixes the feature propagation's channels.
        path_or_state_dict: a file written by the release's ``main.py`` (``best_model.pth.tar``,
            the state dict, or ``checkpoint.pth.tar``, which holds it under ``"model"``), read
            with ``torch.load(weights_only=True)``, or such a dict. A DataParallel ``module.``
            prefix is dropped.
        task_names: mtlfast task name -> release name, for names beyond
            :data:`RELEASE_TASK_NAMES` (parts -> human_parts, saliency -> sal).
        softmax_grouping: what the MTINet's feature propagation modules are set to: "release"
            (default; the release's softmax over consecutive channels, which its weights were
            trained with, so the outputs equal the release's) or "paper" (keep the paper's
            grouping, e.g. to fine-tune; the outputs then differ). The setting is an attribute,
            not in the state dict: a model saved after this and rebuilt later needs
            ``MTINet(..., softmax_grouping="release")``.

    Returns: ``model``.

    Raises: KeyError naming the checkpoint keys the model needs and the checkpoint lacks, and
    those it has and the model does not use (e.g. a release trained with auxiliary tasks, which
    it predicts in the front-end only: its checkpoint has no distillation or head for them, while
    every mtlfast task is final); ValueError naming tensors whose shapes differ (another width,
    other output channels, an SE block narrower than 16 channels) or an MTINet whose tasks are
    in another order; TypeError for another model or a file that holds no state dict.
    ``num_batches_tracked`` buffers may be absent. Nothing is copied unless everything matches.
    """
    if softmax_grouping not in ("paper", "release"):
        raise ValueError(
            f"load_release_checkpoint: softmax_grouping must be 'paper' or 'release', got {softmax_grouping!r}"
        )
    state = release_state_dict(model, path_or_state_dict, task_names)
    model.load_state_dict(state, strict=False)
    for module in model.modules():
        if isinstance(module, FeaturePropagation):
            module.softmax_grouping = softmax_grouping
    return model
