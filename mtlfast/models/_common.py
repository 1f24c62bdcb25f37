"""What MTI-Net and PAD-Net share: task output sizes, deep-supervision keys, the trunk seen by the engine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..backbones.hrnet import HRNet
from ..nn import TaskBatchNorm2d
from ..ops.resize import resize_bilinear
from ..ops.skip_fusion import skip_fusion
from .base import MultiTaskModel
from .tasks import DEFAULT_OUT_CHANNELS, resolve_tasks

__all__ = [
    "JointDecoderModel",
    "SizeCarry",
    "backbone_segments",
    "deep_supervision_key",
    "fuse_scales",
    "project_resized",
    "resize",
    "split_size",
    "task_outputs",
    "trunk_of",
]

DEEP_SUPERVISION = "deep_supervision"


def task_outputs(
    tasks: Sequence[str] | None, dataset: str, out_channels: Mapping[str, int] | None
) -> tuple[list[str], dict[str, int]]:
    """(tasks, task -> output channels): the dataset's defaults, overridden by ``out_channels``.

    ``tasks`` None means every task of the dataset (plus any extra task named in ``out_channels``).
    A cross-task decoder needs at least two tasks.
    """
    if dataset not in DEFAULT_OUT_CHANNELS:
        raise ValueError(f"dataset must be one of {sorted(DEFAULT_OUT_CHANNELS)}, got {dataset!r}")
    if tasks is None:
        defaults = DEFAULT_OUT_CHANNELS[dataset]
        tasks = list(defaults) + [t for t in (out_channels or {}) if t not in defaults]
    outputs = resolve_tasks(tasks, dataset, out_channels)
    if len(outputs) < 2:
        raise ValueError(f"expected at least two distinct tasks, got {list(outputs)}")
    return list(outputs), outputs


def deep_supervision_key(level: int | str, task: str) -> str:
    """Key of a deep-supervision prediction: ``"deep_supervision/scale_0/semseg"`` (int level) or
    ``"deep_supervision/initial/semseg"`` (str level)."""
    level = f"scale_{level}" if isinstance(level, int) else level
    return f"{DEEP_SUPERVISION}/{level}/{task}"


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resampling to ``size`` (align_corners=False), skipped when the size already matches
    (:func:`mtlfast.ops.resize_bilinear`: two matrix products on the CPU, aten elsewhere)."""
    return resize_bilinear(x, size)


def _is_pointwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def project_resized(
    conv: nn.Module, pieces: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """``conv(torch.cat([resize(p, size) for p in pieces], 1))`` for a 1x1 ``conv``, projecting first.

    A 1x1 convolution mixes channels pixel by pixel and bilinear resizing mixes pixels channel by
    channel, so the two commute: the convolution of the concatenation is the sum over the pieces
    of their weight blocks' products, each resized. MTI-Net's and PAD-Net's fusion of the HRNet
    scales (18, 36, 72, 144 channels at 1/4 to 1/32 of the image) then runs its 270 x 270
    products on each scale's own pixels, an eighth of the arithmetic; :func:`mtlfast.ops.skip_fusion`
    resizes and sums the coarse pieces' projections in one pass and the piece already at ``size``
    adds its product into that sum (``baddbmm``). Forward and backward of (4, 270, 64, 64) from
    the four scales, 2 threads, the 2-core Zen 4 EPYC (ad-hoc, median of 7 alternating):
    0.39x the concatenation's time NCHW, 0.57x channels-last. The same function up to rounding.

    Any other ``conv`` (a subclass, a kernel, stride or groups other than 1) runs on the
    concatenation.

    Shapes: pieces (N, C_k, H_k, W_k), any layout, with sum C_k = conv.in_channels; returns
    (N, conv.out_channels, *size), contiguous (NCHW) on the projected path.
    """
    size = tuple(int(d) for d in size)
    widths = [p.shape[1] for p in pieces]
    if not _is_pointwise(conv) or sum(widths) != conv.in_channels:
        return conv(torch.cat([resize(p, size) for p in pieces], 1))
    n, out_channels = pieces[0].shape[0], conv.out_channels
    blocks = torch.split(conv.weight.flatten(1), widths, 1)
    # flatten(2) is a view in either layout: (N, C, H*W) with the channels' or the pixels' stride 1
    coarse = [
        torch.matmul(w, p.flatten(2)).view(n, out_channels, *p.shape[-2:])
        for p, w in zip(pieces, blocks)
        if tuple(p.shape[-2:]) != size
    ]
    fine = [(p, w) for p, w in zip(pieces, blocks) if tuple(p.shape[-2:]) == size]
    out = None
    if coarse:
        ones = coarse[0].new_ones((len(coarse), out_channels))
        out = skip_fusion(coarse, ones, conv.bias, size).flatten(2)
    for p, w in fine:
        product = (w.expand(n, -1, -1), p.flatten(2))
        out = torch.bmm(*product) if out is None else torch.baddbmm(out, *product)
    if not coarse and conv.bias is not None:
        out = out + conv.bias.to(out.dtype)[:, None]
    return out.view(n, out_channels, *size)


def fuse_scales(
    layers: nn.Sequential, pieces: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """``layers(torch.cat([resize(p, size) for p in pieces], 1))`` with the first layer, a 1x1
    convolution, run by :func:`project_resized` (HRNet's heads: MTI-Net's aggregation, PAD-Net's
    scale fusion, :class:`mtlfast.models.HRNetSingleTask`'s heads).

    Shapes: as :func:`project_resized`, then ``layers[1:]``.
    """
    first, *rest = layers
    x = project_resized(first, pieces, size)
    for layer in rest:
        x = layer(x)
    return x


class _BatchNormFrozen:
    """Batch norms in ``module`` normalise with batch statistics but leave their running ones as
    they are (the first forward updated them): momentum 0 inside the block, the batch counter put
    back after. Not ``track_running_stats=False``, which would change what the op saves for
    backward, and the checkpoint checks that the recomputation saves the same tensors. Task batch
    norms (:class:`mtlfast.nn.TaskBatchNorm2d`, whose code path depends on its momentum) keep
    theirs: their running statistics and counters, (T, C) and (T,), are put back after instead.

    Re-enterable: a graph run backward more than once (the per-task gradients of the balancing
    methods, ``keep_task_grads``) recomputes the same checkpoint each time."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.frozen: list[tuple[_BatchNorm, Any, torch.Tensor | None]] = []
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        self.frozen = [
            (
                m,
                m.momentum,
                m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None,
            )
            for m in self.module.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        ]
        for m, _, _ in self.frozen:
            m.momentum = 0.0
        self.kept = [
            (b, b.clone())
            for m in self.module.modules()
            if isinstance(m, TaskBatchNorm2d) and m.training
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        ]

    def __exit__(self, *exc: object) -> None:
        for m, momentum, count in self.frozen:
            m.momentum = momentum
            if count is not None:
                with torch.no_grad():
                    m.num_batches_tracked.copy_(count)
        with torch.no_grad():
            for buffer, value in self.kept:
                buffer.copy_(value)
        self.frozen, self.kept = [], []


def recomputed(fn: Callable[..., Any], module: nn.Module, *args: Any) -> Any:
    """``fn(*args)`` keeping nothing of its inside for backward: torch's non-reentrant checkpoint,
    whose recomputation in backward runs the batch norms of ``module`` (the layers ``fn`` uses)
    without a second update of their running statistics."""
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _BatchNormFrozen(module)),
    )


def _is_size_token(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 4 and t.shape[1] == 0
    )


class SizeCarry(nn.Module):
    """Runs one trunk module and carries the image size to the trunk's end, for the decoder.

    A decoder run by :func:`mtlfast.engine.multi_branch_step` sees only the trunk output, yet must
    predict at input resolution. The first trunk module appends a *size token* to its output: an
    int64 tensor (N, 0, H, W) of the image's H, W. It holds no element, so it costs no memory,
    indexes by rows like the features and, being an integer tensor, gets no gradient. Later
    modules pass it along untouched.

    Shapes: first: image (N, 3, H, W) in; otherwise (*inputs, token) in; (*outputs, token) out.
    """

    def __init__(self, module: nn.Module, first: bool) -> None:
        super().__init__()
        self.module = module
        self.first = first

    def forward(self, x: Any) -> tuple[torch.Tensor, ...]:
        if self.first:
            token = torch.empty((x.shape[0], 0, *x.shape[-2:]), dtype=torch.int64, device=x.device)
            args = x
        else:
            *rest, token = x
            args = rest[0] if len(rest) == 1 else tuple(rest)
        out = self.module(args)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return (*out, token)


def split_size(
    features: Sequence[torch.Tensor], size: Sequence[int] | None
) -> tuple[list[torch.Tensor], Any]:
    """Features without the size token, and the output size: ``size``, else the token's, else None."""
    features = list(features) if isinstance(features, (tuple, list)) else [features]
    if features and _is_size_token(features[-1]):
        token = features.pop()
        if size is None:
            size = tuple(token.shape[-2:])
    return features, (tuple(size) if size is not None else None)


def trunk_of(modules: Sequence[nn.Module]) -> nn.Sequential:
    """nn.Sequential of ``modules`` carrying the size token (see :class:`SizeCarry`)."""
    return nn.Sequential(*(SizeCarry(m, first=i == 0) for i, m in enumerate(modules)))


def backbone_segments(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's ``segments()`` when it has them (checkpoint boundaries), else the backbone."""
    segments = getattr(backbone, "segments", None)
    return list(segments()) if callable(segments) else [backbone]


class JointDecoderModel(MultiTaskModel):
    """A backbone (HRNet-18 unless given) and one cross-task decoder (MTI-Net, PAD-Net), which the
    memory engine runs as its single branch.

    Subclasses build ``decoder`` (with ``task_names``, the final tasks, ``out_channels`` and
    ``tasks``, every key its forward returns in the current mode) and define ``trunk`` and
    ``forward``. The protocol of :class:`MultiTaskModel` follows: ``heads`` is
    ``{"decoder": decoder}``, :meth:`expand` maps each task's value onto its deep-supervision keys
    ``"deep_supervision/<level>/<task>"`` (the decoder lists them in training mode), and
    :meth:`parameter_split` gives each task the decoder's layers kept under its name.
    """

    decoder: nn.Module

    def __init__(self, backbone: nn.Module | None) -> None:
        super().__init__()
        self.backbone = HRNet() if backbone is None else backbone

    @property
    def tasks(self) -> list[str]:  # type: ignore[override]
        """The final tasks (without deep-supervision keys)."""
        return list(self.decoder.task_names)

    @property
    def out_channels(self) -> dict[str, int]:  # type: ignore[override]
        """task -> output channels C_t."""
        return dict(self.decoder.out_channels)

    @property
    def heads(self) -> dict[str, nn.Module]:  # type: ignore[override]
        """``{"decoder": decoder}``: one joint head whose ``tasks`` lists every key it returns."""
        return {"decoder": self.decoder}
