"""Loading local torchvision-named checkpoints into mtlfast backbones, by name; never downloads."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import ResidualAdapter, TaskBatchNorm2d
from .base import Backbone
from .fpn import FPN

__all__ = ["CONVERTERS", "LoadResult", "load_pretrained", "register_converter", "to_torchvision"]

log = logging.getLogger(__name__)

#: backbone class -> ``fn(state_dict, model) -> state_dict`` mapping checkpoint keys onto the
#: model's own names, looked up along the class's MRO; the default handles every backbone here.
CONVERTERS: dict[type, Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]] = {}


def register_converter(
    cls: type, fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
) -> None:
    """Makes ``fn`` the key mapping used for ``cls`` and its subclasses (e.g. an HRNet converter)."""
    CONVERTERS[cls] = fn


@dataclass
class LoadResult:
    """What :func:`load_pretrained` did, key by key (model names unless said otherwise).

    Attributes:
        loaded: keys copied from the checkpoint.
        broadcast: task-specific keys ((T, ...) in the model) filled from a shared (...) tensor,
            every task starting from the same pretrained value (task batch norm).
        missing: model keys the checkpoint does not provide (they keep their initialisation).
        unexpected: checkpoint keys (after mapping) the model does not have.
        mismatched: keys both have, with shapes that disagree (not loaded).
        ignored: checkpoint keys of the dropped classifier (e.g. ``fc.weight``), checkpoint names.
    """

    loaded: list[str] = field(default_factory=list)
    broadcast: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _adapter_prefixes(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ResidualAdapter)]


def default_converter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision names -> ours: identical but for a residual adapter's shared 3x3 convolution
    (``<p>.weight`` -> ``<p>.conv.weight``) and a ``module.`` prefix (DataParallel), which is dropped."""
    out = {k.removeprefix("module."): v for k, v in state.items()}
    for p in _adapter_prefixes(model):
        if f"{p}.weight" in out:
            out[f"{p}.conv.weight"] = out.pop(f"{p}.weight")
    return out


def _fpn_converter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain ResNet checkpoint goes under ``body.``; an FPN one (``body.*``, ``fpn.*``) as is."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(("body.", "fpn.")) for k in state):
        state = {f"body.{k}": v for k, v in state.items()}
    return default_converter(state, model)


register_converter(FPN, _fpn_converter)


def _converter(model: nn.Module):
    for cls in type(model).__mro__:
        if cls in CONVERTERS:
            return CONVERTERS[cls]
    return default_converter


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    prefixes = tuple(getattr(model, "classifier_prefixes", ()))
    if isinstance(model, FPN):
        prefixes += tuple(f"body.{p}" for p in model.body.classifier_prefixes)
    return prefixes


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = False
) -> LoadResult:
    """Loads the local checkpoint at ``path`` into ``model`` (a backbone, or a model with ``.backbone``).

    The checkpoint is read with ``torch.load(weights_only=True)``: a state dict with torchvision's
    ResNet / MobileNetV2 / VGG names, or a dict holding one under ``"state_dict"`` or ``"model"``.
    Its keys go through the converter registered for the backbone's class (:data:`CONVERTERS`),
    the classifier's keys are ignored, and every tensor whose shape matches is copied; a
    task-specific (T, ...) tensor takes a shared (...) one for every task. Nothing is downloaded.

    Returns a :class:`LoadResult`; logs a summary, and warns when keys are missing, unexpected or
    mismatched. With ``strict`` those raise a ``RuntimeError`` instead (after nothing was copied).

    Raises: FileNotFoundError (no such file), TypeError (model not an nn.Module, or the file not
    holding a state dict of tensors), ValueError (the file cannot be read as a checkpoint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(model, Backbone) and isinstance(getattr(model, "backbone", None), nn.Module):
        model = model.backbone
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_pretrained: no checkpoint file at {path!r} (mtlfast never downloads weights)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-checkpoint files
        raise ValueError(f"load_pretrained: cannot read {path!r} as a torch checkpoint: {e}") from e
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise TypeError(
            f"load_pretrained: {path!r} must hold a state dict (str -> tensor), got {type(state).__name__}"
        )
    result = LoadResult()
    prefixes = _classifier_prefixes(model)
    kept = {}
    for k, v in state.items():
        if k.removeprefix("module.").startswith(prefixes):
            result.ignored.append(k)
        else:
            kept[k] = v
    mapped = _converter(model)(kept, model)
    target = model.state_dict()
    copies = []
    for k, v in mapped.items():
        if k not in target:
            result.unexpected.append(k)
        elif target[k].shape == v.shape:
            copies.append((k, v))
            result.loaded.append(k)
        elif target[k].shape[1:] == v.shape and target[k].dim() == v.dim() + 1:
            copies.append((k, v.expand_as(target[k])))
            result.broadcast.append(k)
        else:
            result.mismatched.append(k)
    done = set(result.loaded) | set(result.broadcast) | set(result.mismatched)
    # Checkpoints older than torch 0.4 (torchvision's first zoo, HRNet's release) have no
    # num_batches_tracked buffers; only the momentum-free BN mode reads them.
    result.missing = [k for k in target if k not in done and not k.endswith("num_batches_tracked")]
    problems = {name: getattr(result, name) for name in ("missing", "unexpected", "mismatched")}
    if strict and any(problems.values()):
        raise RuntimeError(
            f"load_pretrained(strict=True) into {type(model).__name__}: "
            + "; ".join(
                f"{n}: {v[:5]}{'...' if len(v) > 5 else ''}" for n, v in problems.items() if v
            )
        )
    with torch.no_grad():
        for k, v in copies:
            target[k].copy_(v)
    summary = (
        f"load_pretrained {path}: {len(result.loaded)} loaded, {len(result.broadcast)} broadcast to tasks, "
        + ", ".join(f"{len(v)} {n}" for n, v in problems.items())
        + f", {len(result.ignored)} classifier keys ignored"
    )
    log.info(summary)
    if any(problems.values()):
        warnings.warn(
            summary + "; first: " + "; ".join(f"{n} {v[:3]}" for n, v in problems.items() if v),
            stacklevel=2,
        )
    return result


def to_torchvision(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse mapping: ``model``'s state dict under torchvision's names (for tests and export).

    Adapters' shared convolutions go back to ``<p>.weight``, adapters themselves, SE blocks and
    FPN's own layers are left out (torchvision has none), task-specific tensors give task 0's row.
    """
    if not isinstance(model, Backbone) and isinstance(getattr(model, "backbone", None), nn.Module):
        model = model.backbone
    adapters = set(_adapter_prefixes(model))
    out = {}
    for key, v in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in adapters or ".se." in f".{key}" or key.startswith("fpn."):
            continue  # adapter weights, SE blocks, FPN layers: torchvision has none
        if owner.endswith(".conv") and owner[: -len(".conv")] in adapters:
            key = f"{owner[: -len('.conv')]}.{leaf}"
        if isinstance(model.get_submodule(owner), TaskBatchNorm2d):
            v = v[0]
        out[key.removeprefix("body.")] = v.detach().clone()
    return out
