"""The trainer's data: datasets from the config, a resumable data order, seeded augmentation.

The data order is a pure function of ``(seed, epoch)``: :class:`ResumableBatchSampler` draws a
permutation per epoch and can start at any batch, so a resumed run sees exactly the batches an
uninterrupted one would. Augmentation draws from a generator seeded by ``(seed, epoch, index)``
(:class:`SeededAugmentation`), not from a worker's state, so a sample looks the same whatever
``num_workers`` is and wherever the run was resumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import NYUD, PascalContext, SyntheticScenes, collate
from ..data import transforms as T
from .config import Config

__all__ = [
    "ResumableBatchSampler",
    "SeededAugmentation",
    "batch_to",
    "build_datasets",
    "eval_loader",
    "train_loader",
]


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of batches of ``(epoch, index)`` keys, a new permutation every epoch.

    Batch ``b`` (counted from the start of training) is batch ``b % per_epoch`` of epoch
    ``b // per_epoch``, whose order is ``randperm(n)`` seeded with ``(seed, epoch)``; incomplete
    batches are dropped. ``start`` is the first batch to yield. With ``world_size`` > 1 each rank
    takes every ``world_size``-th sample of each global batch (``batch_size`` per rank).

    Shapes: yields lists of ``batch_size`` (epoch, index) tuples.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.rank, self.world_size, self.shuffle = start, rank, world_size, shuffle
        self.per_epoch = num_samples // (batch_size * world_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        global_batch = self.batch_size * self.world_size
        while True:
            epoch, k = divmod(b, self.per_epoch)
            order = self._order(epoch)
            while k < self.per_epoch:
                rows = order[k * global_batch : (k + 1) * global_batch][
                    self.rank :: self.world_size
                ]
                yield [(epoch, int(i)) for i in rows]
                k += 1
                b += 1


class SeededAugmentation(Dataset):
    """``dataset[index]`` passed through ``transform`` under torch's generator seeded by
    ``(seed, epoch, index)``; the caller's generator state is left as it was.

    Indexed by ``(epoch, index)`` keys (:class:`ResumableBatchSampler`) or plain ints (epoch 0).
    """

    def __init__(self, dataset: Dataset, transform, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.dataset[index]
        if self.transform is None:
            return sample
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.transform(sample)


def _transforms(config: Config, train: bool):
    data = config.data
    normalize = T.Normalize()
    if data.dataset == "synthetic":
        # rendered at the training size already; flips keep the scene statistics
        steps = [T.RandomHorizontalFlip()] if (train and data.augment) else []
        return T.Compose([*steps, normalize])
    if not train:
        return T.Compose([T.Resize(data.size), normalize])
    steps = (
        [
            T.RandomScale((0.75, 1.25)),
            T.RandomRotation(20),
            T.RandomCrop(data.size),
            T.RandomHorizontalFlip(),
        ]
        if data.augment
        else [T.Resize(data.size)]
    )
    return T.Compose([*steps, normalize])


def build_datasets(config: Config) -> tuple[Dataset, Dataset]:
    """(training set, evaluation set) of ``config.data``, without augmentation (see the loaders).

    The real datasets need ``data.root``; a missing one is a FileNotFoundError naming the path and
    the expected layout.
    """
    data, tasks = config.data, [*config.tasks, *config.loss.auxiliary]  # auxiliary: trained too
    if data.dataset == "synthetic":
        labels = data.labels
        train = SyntheticScenes(
            data.train_samples,
            data.size,
            seed=config.seed,
            tasks=tasks,
            labels=labels,
            label_prob=data.label_prob,
        )
        # a disjoint seed: evaluation scenes never appear in training
        evaluation = SyntheticScenes(
            data.eval_samples or 200, data.size, seed=config.seed + 1_000_000, tasks=tasks
        )
        return train, evaluation
    if data.root is None:
        raise ValueError(
            f"data.root: the {data.dataset!r} dataset needs data.root, the directory holding it"
        )
    if not os.path.isdir(data.root):
        layout = (
            "the PASCAL-Context multi-task release of ASTMT / MTI-Net (JPEGImages/, ImageSets/Context/, "
            "semseg/, human_parts/, sal_distill/, normals_distill/, ...; see mtlfast.data.PascalContext)"
            if data.dataset == "pascal"
            else "NYUD-v2 in MTI-Net's, ATRC's or ASTMT's layout (images/, segmentation/, depth/, "
            "normals/, edge/, gt_sets/; see mtlfast.data.NYUD)"
        )
        raise FileNotFoundError(f"data.root: {data.root} does not exist; expected {layout}")
    cls = PascalContext if data.dataset == "pascal" else NYUD
    return cls(data.root, data.train_split, tasks), cls(data.root, data.eval_split, tasks)


def train_loader(
    config: Config, dataset: Dataset, start: int = 0, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Endless training batches from batch ``start`` on (see :class:`ResumableBatchSampler`)."""
    augmented = SeededAugmentation(dataset, _transforms(config, train=True), config.seed)
    sampler = ResumableBatchSampler(
        len(dataset), config.data.batch_size, config.seed, start, rank, world_size
    )
    return DataLoader(
        augmented,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=2 if config.data.num_workers else None,
    )


def eval_loader(
    config: Config,
    dataset: Dataset,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """The evaluation set in order (every ``world_size``-th sample on each rank), no augmentation."""
    indices: Sequence[int] = range(
        len(dataset) if max_samples is None else min(len(dataset), max_samples)
    )
    indices = list(indices)[rank::world_size]
    subset = torch.utils.data.Subset(
        SeededAugmentation(dataset, _transforms(config, train=False), config.seed), indices
    )
    return DataLoader(
        subset,
        batch_size=config.data.eval_batch_size or config.data.batch_size,
        shuffle=False,
        num_workers=config.data.num_workers,
        collate_fn=collate,
    )


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors (and its ``labeled`` flags) on ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif k == "labeled":
            out[k] = {t: m.to(device, non_blocking=True) for t, m in v.items()}
        else:
            out[k] = v
    return out
