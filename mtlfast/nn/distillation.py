"""MTI-Net's multi-modal distillation unit (Sec. 2.3, Eq. 1), also PAD-Net's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..engine import current_strategy
from ..ops._dispatch import choose
from ..ops.winograd_conv import conv3x3_backward, winograd_conv3x3

__all__ = ["MultiModalDistillation"]


class MultiModalDistillation(nn.Module):
    """Refines each task's features with spatially gated messages from the other tasks.

    For target k and source l != k (the authors' ``SABlock``): ``mask = sigmoid(conv3x3(F_l))``,
    ``message = conv3x3(F_l)``, both 3x3 convolutions without bias, and
    ``out_k = F_k + sum_{l != k} mask * message`` (MTI-Net Eq. 1).

    Memory grows linearly in T, not with the T*(T-1) pairs: the sources run one after the
    other, each source's T-1 pairs as few convolutions as possible, each several kernels wide
    (mask logits, and messages), their gated messages added to the targets' outputs at once; a
    chunk of pairs is bounded to 16 MiB of maps (at least one pair), so inference holds the T
    outputs and two such chunks (at most the authors' two maps of one pair where maps are large).
    In training a custom autograd function saves only the inputs and the weights (the authors'
    per-pair modules save two maps per pair) and its backward recomputes each chunk's two
    convolutions before back-propagating through them, for a peak that no longer grows with the
    pairs. Wide convolutions where the maps are small keep the GEMMs large enough to run fast on
    a CPU.
    Under ``torch.compile``, functorch transforms, dispatch modes and tensor subclasses the same
    loop runs in plain differentiable ops, and autograd (or the compiler) decides what to save.
    There is no double backward. ``recompute=False`` trades the memory back for the time: the
    loop then runs in differentiable ops under autograd too, which saves each pair's maps. By
    default the layer follows the memory engine (:func:`mtlfast.engine.current_strategy`):
    inside a ``strategy="naive"`` step it saves the maps, as the authors' modules and plain
    autograd do (at PAD-Net's size, 256x256 batch 4, 40 maps of 16 MiB against a forward of 40
    convolutions of 256 channels at 64x64 that backward would otherwise run again); under
    ``strategy="recompute"`` and outside the engine it recomputes them.

    ``winograd`` (False; :func:`mtlfast.nn.use_winograd` sets it, as the trainer does by default)
    runs the convolutions by :func:`mtlfast.ops.winograd_conv3x3`: on CPU in fp32/fp64 with at
    least 128 channels, a quarter of the multiplications, at about 1e-5 relative rounding.

    The fused :func:`mtlfast.ops.attention_distill` is not used: its inputs are all pairs' maps
    at once, which is what this loop avoids.

    Args:
        num_tasks: T >= 2.
        channels: C, the channels of every task's features.
        recompute: in training, True saves only the inputs and recomputes the pairs' maps in
            backward; False saves the maps (two per pair), as the authors' modules do; None
            (default): False inside the memory engine's naive strategy, True otherwise.

    Shapes:
        input: a list of T tensors (N, C, H, W), or one tensor (N, T, C, H, W).
        output: the same form as the input.

    Parameters ``mask_weight`` and ``message_weight`` are (T, T-1, C, C, 3, 3): ``[k, s]`` is the
    convolution of target k applied to its s-th source, the s-th task other than k in increasing
    order. :meth:`pair_weights` gives them by task indices.
    """

    def __init__(self, num_tasks: int, channels: int, recompute: bool | None = None) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"MultiModalDistillation: num_tasks must be >= 2, got {num_tasks}")
        if channels < 1:
            raise ValueError(f"MultiModalDistillation: channels must be >= 1, got {channels}")
        if recompute not in (True, False, None):
            raise TypeError(
                f"MultiModalDistillation: recompute must be True, False or None, got {recompute!r}"
            )
        self.num_tasks = num_tasks
        self.channels = channels
        self.recompute = recompute
        self.winograd = False
        shape = (num_tasks, num_tasks - 1, channels, channels, 3, 3)
        self.mask_weight = nn.Parameter(torch.empty(shape))
        self.message_weight = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default initialisation, per pair: U(-1/sqrt(9C), 1/sqrt(9C))."""
        bound = 1.0 / math.sqrt(self.channels * 9)
        nn.init.uniform_(self.mask_weight, -bound, bound)
        nn.init.uniform_(self.message_weight, -bound, bound)

    def source_slot(self, target: int, source: int) -> int:
        """Slot s of ``source`` among the sources of ``target``."""
        if target == source or not (0 <= target < self.num_tasks and 0 <= source < self.num_tasks):
            raise ValueError(
                f"no distillation pair (target={target}, source={source}) for {self.num_tasks} tasks"
            )
        return source if source < target else source - 1

    def pair_weights(self, target: int, source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, message) convolution weights (C, C, 3, 3) of the pair target <- source."""
        s = self.source_slot(target, source)
        return self.mask_weight[target, s], self.message_weight[target, s]

    def forward(
        self, features: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor | list[torch.Tensor]:
        stacked = not isinstance(features, (list, tuple))
        inputs = self._check(features)
        weights = (self.mask_weight, self.message_weight)
        recompute = self.recompute
        if recompute is None:  # (compiled, the loop runs in differentiable ops either way)
            recompute = torch.compiler.is_compiling() or current_strategy() != "naive"
        function = _Distill.apply if recompute else _differentiable
        run = choose(_inference, function, _differentiable, *weights, *inputs)
        out = run(stacked, self.winograd, *weights, *inputs)
        return out if stacked else list(out)

    def _check(self, features: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The input as given: (stacked,) or the T task tensors, checked."""
        if isinstance(features, (list, tuple)):
            if len(features) != self.num_tasks:
                raise ValueError(
                    f"MultiModalDistillation: expected a list of {self.num_tasks} task features, got {len(features)}"
                )
            if not all(isinstance(f, torch.Tensor) for f in features):
                raise ValueError("MultiModalDistillation: features must be tensors")
            shapes = {tuple(f.shape) for f in features}
            if len(shapes) != 1 or features[0].dim() != 4:
                raise ValueError(
                    "MultiModalDistillation: features must be T tensors of one shape (N, C, H, W), "
                    f"got shapes {[tuple(f.shape) for f in features]}"
                )
            shape = (features[0].shape[0], self.num_tasks, *features[0].shape[1:])
            inputs = tuple(features)
        else:
            if not isinstance(features, torch.Tensor) or features.dim() != 5:
                got = (
                    tuple(features.shape)
                    if isinstance(features, torch.Tensor)
                    else type(features).__name__
                )
                raise ValueError(
                    f"MultiModalDistillation: features must be (N, T, C, H, W) or a list of T (N, C, H, W), got {got}"
                )
            shape = tuple(features.shape)
            inputs = (features,)
        if shape[1] != self.num_tasks or shape[2] != self.channels:
            raise ValueError(
                f"MultiModalDistillation: features must have T={self.num_tasks} tasks of C={self.channels} "
                f"channels, got {shape}"
            )
        return inputs

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, channels={self.channels}, recompute={self.recompute}, "
            f"winograd={self.winograd}"
        )


# ---- the loop over pairs ---------------------------------------------------------------------
# ``inputs`` is (stacked,), one (N, T, C, H, W) tensor, or the T task tensors (N, C, H, W).


def _tasks(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(inputs[0].unbind(1)) if len(inputs) == 1 else list(inputs)


# The pairs of one source run in chunks whose maps (N, m, C, H, W) hold at most this many bytes
# (and at least one pair): wide convolutions where maps are small (MTI-Net's coarse scales run all
# T-1 pairs at once), and where they are large (PAD-Net at 1/4 of 256x256: 16 MiB a map) no more
# than one pair's maps at a time, as the authors' per-pair modules hold. The backward holds about
# five maps of a chunk at once (grads, sigmoid, messages), so this bounds its transient memory too.
_CHUNK_BYTES = 16 << 20


def _sources(t: int, map_bytes: int = 0):
    """(source l, [(target k, slot s), ...]) for every task l and every chunk of the T-1 pairs that
    read F_l, a chunk's maps at most :data:`_CHUNK_BYTES` (``map_bytes``: one pair's map)."""
    per_chunk = max(1, _CHUNK_BYTES // map_bytes) if map_bytes > 0 else t
    for l in range(t):
        pairs = [(k, l if l < k else l - 1) for k in range(t) if k != l]
        for i in range(0, len(pairs), per_chunk):
            yield l, pairs[i : i + per_chunk]


def _map_bytes(f: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return f.numel() * (dtype or f.dtype).itemsize


def _source_weights(weight: torch.Tensor, pairs, f: torch.Tensor) -> torch.Tensor:
    """The pairs' kernels stacked along output channels: ((T-1) C, C, 3, 3), in f's dtype and,
    for a channels-last f, channels-last (gathered so in one copy: a contiguous kernel would be
    converted by the convolution, forward and backward, for every chunk)."""
    if f.is_contiguous() or not f.is_contiguous(memory_format=torch.channels_last):
        return torch.cat([weight[k, s] for k, s in pairs], 0).to(f.dtype)
    nhwc = torch.stack([weight[k, s].permute(0, 2, 3, 1) for k, s in pairs]).to(f.dtype)
    return nhwc.flatten(0, 1).permute(0, 3, 1, 2)


def _joint_weights(
    first: torch.Tensor, second: torch.Tensor, pairs, f: torch.Tensor
) -> torch.Tensor:
    """The pairs' kernels of ``first`` then those of ``second``: (2 (T-1) C, C, 3, 3)."""
    return torch.cat([_source_weights(first, pairs, f), _source_weights(second, pairs, f)], 0)


def _halves(both: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two (N, m, C, H, W) views of a joint map (N, 2 m C, H, W)."""
    n, mc2, h, w = both.shape
    c = mc2 // (2 * m)
    return both[:, : m * c].view(n, m, c, h, w), both[:, m * c :].view(n, m, c, h, w)


def _conv(f: torch.Tensor, weight: torch.Tensor, winograd: bool) -> torch.Tensor:
    return winograd_conv3x3(f, weight) if winograd else F.conv2d(f, weight, padding=1)


def _maps(
    f: torch.Tensor, mask_weight: torch.Tensor, message_weight: torch.Tensor, pairs, winograd: bool
):
    """Mask logits and messages (N, T-1, C, H, W) of every pair reading the source ``f``, as
    views of one convolution 2 (T-1) kernels wide, rather than 2 (T-1) narrow ones (the same
    products; with ``winograd``, by F(4x4, 3x3) where that pays, one input transform serving the
    mask and the message kernels)."""
    both = _conv(f, _joint_weights(mask_weight, message_weight, pairs, f), winograd)
    return _halves(both, len(pairs))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives convolutions on ``x``'s device now, None when it is off."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _inference(stacked: bool, winograd: bool, mask_weight, message_weight, *inputs):
    """Eq. 1 without autograd: the outputs start as the inputs; each source's gated messages
    are added to their targets as soon as they are computed, so at most one source's T-1 pairs'
    maps exist at a time (memory linear in T)."""
    features = _tasks(inputs)
    out = inputs[0].clone() if stacked else [f.clone() for f in features]
    targets = _tasks((out,)) if stacked else out
    for l, pairs in _sources(len(features), _map_bytes(features[0], _autocast_dtype(features[0]))):
        logits, messages = _maps(features[l], mask_weight, message_weight, pairs, winograd)
        gated = messages.mul_(logits.sigmoid_())
        del logits
        for j, (k, _) in enumerate(pairs):
            targets[k].add_(gated[:, j])
        del gated, messages
    return out if stacked else tuple(out)


def _differentiable(stacked: bool, winograd: bool, mask_weight, message_weight, *inputs):
    """The same loop in out-of-place differentiable ops, for torch.compile, functorch and modes."""
    features = _tasks(inputs)
    out = list(features)
    for l, pairs in _sources(len(features), _map_bytes(features[0], _autocast_dtype(features[0]))):
        logits, messages = _maps(features[l], mask_weight, message_weight, pairs, winograd)
        gated = torch.sigmoid(logits) * messages
        for j, (k, _) in enumerate(pairs):
            out[k] = out[k] + gated[:, j]
    return torch.stack(out, 1) if stacked else tuple(out)


class _Distill(torch.autograd.Function):
    """The loop under autograd: saves the inputs and weights, recomputes the maps in backward."""

    @staticmethod
    def forward(ctx, stacked, winograd, mask_weight, message_weight, *inputs):
        ctx.save_for_backward(mask_weight, message_weight, *inputs)
        ctx.winograd = winograd
        # backward runs with autocast off (as the memory engine runs it), so the forward's
        # casts are replayed by hand there: the same products in the same precision
        ctx.cast = _autocast_dtype(inputs[0])
        return _inference(stacked, winograd, mask_weight, message_weight, *inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        mask_weight, message_weight, *inputs = ctx.saved_tensors
        _, _, need_mask, need_message, *need_inputs = ctx.needs_input_grad
        need_x = any(need_inputs)
        features = _tasks(inputs)
        grad_out = _tasks(grad_outputs)
        # The residual: dL/dF_k starts at dL/dout_k; each pair adds its source's term.
        grad_inputs = tuple(g.clone() for g in grad_outputs) if need_x else (None,) * len(inputs)
        grad_features = _tasks(grad_inputs) if need_x else None
        grad_mask = torch.empty_like(mask_weight) if need_mask else None
        grad_message = torch.empty_like(message_weight) if need_message else None
        f, f_source = None, None
        for l, pairs in _sources(len(features), _map_bytes(features[0], ctx.cast)):
            if f_source != l:  # a source is cast once for all its chunks
                f = features[l] if ctx.cast is None else features[l].to(ctx.cast)
                f_source = l
            m = len(pairs)
            both = _conv(f, _joint_weights(mask_weight, message_weight, pairs, f), ctx.winograd)
            logits, messages = _halves(both, m)
            sig = logits.sigmoid_()
            # (N, T-1, C, H, W) in the maps' layout, so that channels-last maps stay so
            go = torch.empty_like(sig)
            for j, (k, _) in enumerate(pairs):
                go[:, j].copy_(grad_out[k])
            # d/dmessages = go * sigmoid; d/dlogits = go * messages * sigmoid * (1 - sigmoid),
            # the latter in the messages' half, the former then copied into the logits' half:
            # both's halves become (d/dmessages, d/dlogits), one map for one backward.
            grad_messages = go.mul_(sig)
            messages.mul_(grad_messages).mul_(sig.neg_().add_(1))
            logits.copy_(grad_messages)
            del sig, go, grad_messages, logits, messages
            gx, gw = conv3x3_backward(
                both,
                f,
                _joint_weights(message_weight, mask_weight, pairs, f),
                need_x,
                need_mask or need_message,
                winograd=ctx.winograd,
            )
            del both
            if gw is not None:  # every pair is in exactly one chunk: each slot written once
                halves = gw.chunk(2, 0)  # the message kernels', then the mask kernels'
                for need_w, grad_w, half in (
                    (need_message, grad_message, halves[0]),
                    (need_mask, grad_mask, halves[1]),
                ):
                    if need_w:
                        for (k, s), g in zip(pairs, half.chunk(m, 0)):
                            grad_w[k, s].copy_(g)
            if need_x:
                grad_features[l].add_(gx)
            del gx, gw
        return (None, None, grad_mask, grad_message, *grad_inputs)
