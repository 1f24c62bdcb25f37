"""Data-parallel training on ``torch.distributed``, launched by ``torchrun`` (one node or many).

``torchrun --nproc_per_node=K -m mtlfast train CONFIG`` starts K processes; each joins the
process group (:func:`init_distributed`: nccl on CUDA, gloo on CPU), trains on every K-th
sample of each global batch (``data.batch_size`` is per rank: the global batch is K times it)
and averages its gradients with the others. What a step adds to the memory engine's
(:class:`DistributedStep`):

1. one all-reduce of a few numbers per task (labelled samples, loss denominators): each rank's
   loss is weighted by its share of the global batch, so the averaged gradient is the gradient
   of the loss over the K-times batch, however unevenly the ranks are labelled; with
   synchronised batch norm, a head labelled on any rank runs on every rank (on no sample where
   it has none) so that its collectives pair up;
2. the gradients, in buckets sent by :class:`GradientSync` while the backward still runs;
3. one all-reduce of the step's losses (logs, and the non-finite decision every rank must share);
4. without synchronised batch norm, one broadcast of rank 0's buffers (running statistics), as
   ``DistributedDataParallel`` does.

Rank 0 alone prints, draws progress bars, logs and writes checkpoints (``Runtime``); every rank
reads the same checkpoint on ``--resume``. Evaluation runs each rank on its shard of the
validation set and pools the meters (:func:`reduce_meters`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..balancing import Fixed
from . import _dist_losses as losses
from ._dist_balancing import GlobalBalancer
from ._dist_meters import merge_meters
from ._grad_sync import DEFAULT_BUCKET_BYTES, GradientSync, parameters_in_gradient_order
from ._sync_bn import SyncBatchNorm, convert_sync_batchnorm, is_sync_batchnorm

__all__ = [
    "DistributedStep",
    "GradientSync",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "init_distributed",
    "launched_distributed",
    "local_device",
    "reduce_meters",
    "shutdown",
    "threads_per_rank",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def init_distributed(timeout_s: float = 600.0, backend: str = "auto", device: str = "auto") -> bool:
    """Joins the process group that torchrun's variables describe (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); returns whether this process is part of one.

    ``backend`` "auto": nccl when training on CUDA (``device`` "auto" with CUDA available, or a
    CUDA device), else gloo. ``timeout_s``: how long a collective waits for a missing rank
    before it fails (a killed rank then ends the job rather than hanging it). Already
    initialised: nothing is done. Not launched by torchrun: False.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_distributed():
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leaves the process group (when one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``device`` with this process's GPU (LOCAL_RANK) when it is an unnumbered CUDA device of a
    distributed run."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def threads_per_rank(threads: int) -> int:
    """``threads`` (the cores this process would take alone) shared by the processes of this node
    (LOCAL_WORLD_SIZE), at least 1."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1
    return max(1, threads // max(local, 1))


def reduce_meters(meters: dict[str, Any], seen: dict[str, int], images: int, group=None) -> int:
    """Pools every rank's evaluation meters and counts into each rank's, in place; returns the
    number of images all ranks saw. See :mod:`mtlfast.train._dist_meters`."""
    return merge_meters(meters, seen, images, group)


def _broadcast(tensors: list[torch.Tensor], group=None) -> None:
    """Rank 0's values into ``tensors`` on every rank, one broadcast per dtype and device."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for same in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.broadcast(flat, src, group=group)
        with torch.no_grad():
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(part.view_as(t))


def _rows(tree: Any, mask: torch.Tensor) -> Any:
    """The rows of every tensor in ``tree`` where ``mask`` is True. Shapes: (N, ...) -> (K, ...)."""
    return tree_map(lambda x: x[mask.to(x.device)] if isinstance(x, torch.Tensor) else x, tree)


class _NoRows:
    """A head run on none of its input rows, each prediction padded with one zero row: the one
    row the engine was told is labelled. Its collectives (synchronised batch norm, forward and
    backward) then pair up with the ranks where the head has samples, at no cost in samples."""

    def __init__(self, head) -> None:
        self.head = head
        if getattr(head, "tasks", None) is not None:
            self.tasks = head.tasks

    def __call__(self, x: Any) -> Any:
        out = self.head(tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, x))
        return tree_map(
            lambda t: (
                torch.cat([t, t.new_zeros((1, *t.shape[1:]))]) if isinstance(t, torch.Tensor) else t
            ),
            out,
        )


class DistributedStep:
    """What a data-parallel step adds around :func:`mtlfast.engine.multi_branch_step`.

    ``before(...)`` takes the engine's inputs of this rank's batch and returns them adjusted
    (loss weights scaled to the rank's share of the global batch, the saliency loss's balance
    made global, heads labelled only elsewhere run on no sample when batch norm is
    synchronised) and arms the gradient hooks; run the engine; ``after(result)`` waits for the
    averaged gradients and rewrites ``result`` as the global step's: ``losses`` (each task's
    loss over the global batch; an entry that is no loss key, a procedure's own such as ASTMT's
    ``"discriminator"``, is kept as the procedure made it global), ``total``, ``ran`` and
    ``skipped``. ``task_grads`` stay this rank's. Parameters and buffers are broadcast from
    rank 0 when it is built.

    Args:
        model: a ``mtlfast.models.MultiTaskModel`` (after :func:`convert_sync_batchnorm`, if wanted).
        tasks: the trained tasks (the keys of the trainer's loss functions before expansion).
        strategy: the engine's "recompute" or "naive" (how a head labelled only elsewhere runs).
        group: the process group (default the world).
        bucket_bytes: :class:`GradientSync`'s bucket size.
        extra_params: other parameters the step's backward reaches, averaged too.
        balancer: the run's ``mtlfast.balancing`` method: :attr:`balancer` is what to hand the
            engine (the method itself when its weights are fixed, else a
            :class:`~mtlfast.train._dist_balancing.GlobalBalancer` feeding it the global
            batch's losses and gradients; every task labelled on any rank then runs on all).

    Attributes: ``timings`` of the last step: ``agree_s`` (the first all-reduce), ``grads`` (the
    GradientSync's ``stats``) and ``after_s`` (the rest of :meth:`after`). After :meth:`before`,
    for a procedure running its own engine step: ``inputs`` (what it returned), ``labelled``
    (task -> labelled samples on all ranks) and ``global_batch`` (samples on all ranks).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: list[str],
        *,
        strategy: str = "recompute",
        group=None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        extra_params: list[torch.Tensor] | tuple = (),
        balancer: Any = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "DistributedStep: torch.distributed is not initialised (init_distributed)"
            )
        self.model, self.tasks, self.strategy, self.group = model, list(tasks), strategy, group
        self.world = dist.get_world_size(group)
        trunk, heads = model.engine_branches()
        self.trunk = list(trunk)
        self.heads = dict(heads.items())
        self.synced = any(is_sync_batchnorm(m) for m in model.modules())
        self.balancer = balancer
        if balancer is not None and not isinstance(balancer, Fixed):
            device = next(model.parameters()).device
            self.balancer = GlobalBalancer(balancer, device, group)
        # collectives inside the step (batch norm statistics, a balancer's reductions) must pair
        # up: every task labelled on some rank then runs on every rank
        self.force = self.synced or isinstance(self.balancer, GlobalBalancer)
        names = {id(p): n for n, p in model.named_parameters()}
        rest = [*model.parameters(), *extra_params]
        modules = [h for h in self.heads.values() if isinstance(h, nn.Module)]
        order = parameters_in_gradient_order(modules, self.trunk, rest)
        self.grads = GradientSync(order, group, bucket_bytes, names)
        self._head_params = {
            name: list(h.parameters()) if isinstance(h, nn.Module) else []
            for name, h in self.heads.items()
        }
        self._trunk_params = [p for m in self.trunk for p in m.parameters()]
        # running statistics of norms that do not synchronise them: rank 0's, after every step
        self._buffers = [
            b
            for m in model.modules()
            if not is_sync_batchnorm(m)
            for b in m.buffers(recurse=False)
            if b is not None
        ]
        _broadcast([*model.parameters(), *model.buffers(), *extra_params], group)
        self.timings: dict[str, Any] = {}
        self._step: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ before

    def _key_tasks(self, keys: list[str]) -> dict[str, str]:
        tasks = set(self.tasks)
        out = {}
        for k in keys:
            owner = [part for part in k.split("/") if part in tasks]
            if len(owner) == 1:
                out[k] = owner[0]
        return out

    def before(
        self,
        heads: Mapping[str, Any],
        images: Any,
        targets: Mapping[str, Any],
        loss_fns: Mapping[str, Any],
        labeled: Mapping[str, torch.Tensor],
        weights: Mapping[str, Any],
        *,
        arm: bool = True,
    ) -> tuple[dict, dict, dict, dict]:
        """(heads, loss_fns, labeled, weights) for this rank's engine step; see the class.

        ``arm`` False: the gradient hooks are left unarmed, for a procedure that runs several
        backward passes in one step (ASTMT's): it calls ``grads.start(...)`` before each pass
        whose gradients are to be averaged (``grads.finish()`` after it), and leaves the last
        one armed for :meth:`after`.
        """
        tick = time.perf_counter()
        heads, loss_fns, labeled, weights = (
            dict(heads),
            dict(loss_fns),
            dict(labeled),
            dict(weights),
        )
        n = next(t for t in tree_flatten(images)[0] if isinstance(t, torch.Tensor)).shape[0]
        device = next(t for t in tree_flatten(images)[0] if isinstance(t, torch.Tensor)).device
        local = []
        masks = {}
        for t in self.tasks:
            mask = labeled.get(t)
            rows = n if mask is None else int(mask.sum())
            target = targets[t] if mask is None or rows == n else _rows(targets[t], mask)
            masks[t] = mask
            fn = loss_fns[t]
            neg, valid = (
                losses.saliency_counts(target) if losses.is_saliency(fn) and rows else (0.0, 0.0)
            )
            local += [float(rows), losses.denominator(fn, target, rows), neg, valid]
        counts = torch.tensor(local, dtype=torch.float64, device=device)
        dist.all_reduce(counts, group=self.group)
        every = counts.view(len(self.tasks), 4).tolist()
        mine = torch.tensor(local, dtype=torch.float64).view(len(self.tasks), 4).tolist()
        stats = {t: (mine[i], every[i]) for i, t in enumerate(self.tasks)}
        keys = list(loss_fns)
        key_task = self._key_tasks(keys)
        for k, t in key_task.items():
            (rows, d, _, _), (_, d_all, neg_all, valid_all) = stats[t]
            if rows and d_all:
                weights[k] = weights.get(k, 1.0) * (self.world * d / d_all)
            if rows and losses.is_saliency(loss_fns[k]):
                loss_fns[k] = losses.global_saliency(loss_fns[k], neg_all, valid_all)
        fake = self._force_heads(
            heads, loss_fns, labeled, weights, key_task, stats, masks, n, device
        )
        self._step = {"keys": keys, "key_task": key_task, "stats": stats, "fake": fake}
        self.inputs = (heads, loss_fns, labeled, weights)
        self.labelled = {t: int(stats[t][1][0]) for t in self.tasks}
        self.global_batch = n * self.world  # the sampler gives every rank the same batch size
        if arm:
            self.grads.start(self._absent(heads, labeled, key_task, stats, fake))
        self.timings = {"agree_s": time.perf_counter() - tick}
        return heads, loss_fns, labeled, weights

    def _head_keys(self, name: str, head: Any) -> list[str]:
        return list(getattr(head, "tasks", None) or (name,))

    def _force_heads(
        self, heads, loss_fns, labeled, weights, key_task, stats, masks, n, device
    ) -> set[str]:
        """With synchronised batch norm or a balancer: a head whose tasks are labelled on another
        rank but not here runs anyway, on no sample (recompute) or on the batch (naive), with a
        zero loss."""
        fake: set[str] = set()
        if not self.force:
            return fake
        for name, head in list(heads.items()):
            keys = [k for k in self._head_keys(name, head) if k in key_task]
            here = [k for k in keys if stats[key_task[k]][0][0] > 0]
            elsewhere = [
                k for k in keys if stats[key_task[k]][0][0] == 0 and stats[key_task[k]][1][0] > 0
            ]
            if not elsewhere:
                continue
            row = 0
            if here and self.strategy == "recompute":
                union = torch.zeros(n, dtype=torch.bool, device=device)
                for k in here:
                    m = masks[key_task[k]]
                    union |= torch.ones_like(union) if m is None else m.to(device)
                row = int(union.nonzero()[0])
            elif not here and self.strategy == "recompute":
                heads[name] = _NoRows(head)
            one = torch.zeros(n, dtype=torch.bool, device=device)
            one[row] = True
            for k in elsewhere:
                labeled[k], loss_fns[k], weights[k] = one, losses.zero_loss, 1.0
                fake.add(k)
        return fake

    def _absent(self, heads, labeled, key_task, stats, fake) -> list[torch.Tensor]:
        """Parameters whose gradient will not come on this rank: heads that do not run here, and
        the trunk too when none does (nothing is labelled here)."""
        absent: list[torch.Tensor] = []
        used: set[int] = set()  # a parameter shared with a head that runs (ASTMT's) still comes
        running = 0
        for name, head in heads.items():
            keys = self._head_keys(name, head)
            declared = getattr(head, "tasks", None) is not None or name in key_task
            runs = not declared or any(
                k in fake or (k in key_task and stats[key_task[k]][0][0] > 0) for k in keys
            )
            running += runs
            if runs:
                used.update(id(p) for p in self._head_params.get(name, []))
            else:
                absent += self._head_params.get(name, [])
        if not running:
            absent += self._trunk_params
        return [p for p in absent if id(p) not in used]

    # ------------------------------------------------------------------------------ after

    def after(self, result) -> None:
        """Waits for the averaged gradients; makes ``result`` the global step's (see the class)."""
        self.grads.finish()
        tick = time.perf_counter()
        keys, key_task, stats, fake = (self._step[k] for k in ("keys", "key_task", "stats", "fake"))
        # a procedure's own entries (ASTMT's "discriminator") come already global
        own = {k: v for k, v in result.losses.items() if k not in keys}
        values = [float(result.total)]
        for k in keys:
            real = k in result.losses and k not in fake
            loss = float(result.losses[k]) if real else 0.0
            d = stats[key_task[k]][0][1] if k in key_task else 1.0
            finite = math.isfinite(loss)
            values += [
                d * loss if finite else 0.0,
                float(real),
                d if real else 0.0,
                0.0 if finite else 1.0,
            ]
        vec = torch.tensor(values, dtype=torch.float64, device=result.total.device)
        dist.all_reduce(vec, group=self.group)
        total, per_key = vec[0].item(), vec[1:].view(len(keys), 4).tolist()
        dtype = result.total.dtype
        result.total = torch.tensor(total / self.world, dtype=dtype, device=vec.device)
        result.losses, result.ran, result.skipped = {}, [], []
        for k, (weighted, ran, d_all, bad) in zip(keys, per_key):
            if not ran:
                result.skipped.append(k)
                continue
            value = float("nan") if bad else (weighted / d_all if d_all else 0.0)
            result.losses[k] = torch.tensor(value, dtype=torch.float32, device=vec.device)
            result.ran.append(k)
        result.losses.update(own)
        result.ran += list(own)
        if self._buffers:
            _broadcast(self._buffers, self.group)
        self.timings["grads"] = dict(self.grads.stats)
        self.timings["after_s"] = time.perf_counter() - tick

    def sync_buffers(self) -> None:
        """Rank 0's buffers on every rank (after a precise-BN recalibration, say)."""
        if self._buffers:
            _broadcast(self._buffers, self.group)

    def close(self) -> None:
        self.grads.close()
