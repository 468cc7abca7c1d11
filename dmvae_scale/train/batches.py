"""Where a run's batches come from, by global stream position, the same for any number of workers.

The datasets come from data/datasets.py (config -> dataset); this module only batches them. In memory, position p of
the stream is image perm_e[p mod N] of epoch e = p div N, so a run restarted at images_seen, with any number of
workers, continues the same sequence; a streaming dataset's reader carries its own position.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..log import progress
from ..config import RunConfig, pin_memory
from ..data.builtin import ImageArrayDataset
from ..data.datasets import in_memory_dataset, is_shard_dataset, latent_dataset, shard_dataset
from ..errors import UserError
from ..seeds import epoch_seed, stats_seed
from .checkpoint.store import CheckpointError
from .loop import LoopHook


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}


def stream_batches(dataset: ImageArrayDataset, batch_size: int, seed: int, start_images: int = 0,
                   rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches; global batch b covers stream positions [start + b*B*W, ...), rank r takes its B of them."""
    n = len(dataset)
    perms: dict[int, torch.Tensor] = {}

    def index_at(pos: int) -> tuple[int, int]:
        epoch = pos // n
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        return epoch, int(perms[epoch][pos % n])

    pos = start_images
    while True:
        items = []
        for p in range(pos + rank * batch_size, pos + (rank + 1) * batch_size):
            epoch, idx = index_at(p)
            dataset.set_epoch(epoch)
            items.append(dataset[idx])
        pos += batch_size * world_size
        yield _collate(items)


def stats_batches(dataset: ImageArrayDataset, batch_size: int, images: int, seed: int | None = None
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """`images` images (no flip) chosen by stats_indices: a seeded random sample that covers the classes, identical on
    every rank and every run. seed defaults to the data set's own seed.

    Works for the in-memory data set and for shard readers (ImageStreamDataset: indices are global sample ids, the flip
    lives in its transform)."""
    seed = int(getattr(dataset, "seed", 0)) if seed is None else int(seed)
    if hasattr(dataset, "transform"):  # shard reader: its transform is a frozen dataclass
        saved = dataset.transform
        dataset.transform = dataclasses.replace(saved, hflip=False)
        try:
            yield from _indexed_images(dataset, batch_size, images, seed)
        finally:
            dataset.transform = saved
        return
    hflip, dataset.hflip = dataset.hflip, False
    try:
        yield from _indexed_images(dataset, batch_size, images, seed)
    finally:
        dataset.hflip = hflip


def stats_indices(total: int, images: int, seed: int, labels: np.ndarray | None = None) -> list[int]:
    """Which images the latent statistics are measured on: shards and folders are sorted by class, so the first N
    would be a few classes only (docs/method.md, "Latent normalisation").

    With labels: a random permutation within each class, dealt round-robin across the classes (classes in random
    order), so any prefix is class-balanced. Without: a uniform random sample without replacement."""
    count = min(images, total)
    g = torch.Generator().manual_seed(stats_seed(seed))
    if labels is None:
        return torch.randperm(total, generator=g)[:count].tolist()
    labels = np.asarray(labels)
    classes = np.unique(labels)
    order = [int(classes[i]) for i in torch.randperm(len(classes), generator=g)]
    members = {c: np.flatnonzero(labels == c) for c in order}
    queues = {c: members[c][torch.randperm(len(members[c]), generator=g).numpy()].tolist() for c in order}
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        for c in order:
            if depth < len(queues[c]) and len(picked) < count:
                picked.append(queues[c][depth])
        depth += 1
    return picked


def _indexed_images(dataset, batch_size: int, images: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    total = getattr(dataset, "num_samples", None) or len(dataset)
    labels = getattr(dataset, "labels", None)
    indices = stats_indices(total, images, seed, labels if labels is not None and len(labels) == total else None)
    for start in progress(range(0, len(indices), batch_size), desc="latent statistics", unit="batch", leave=False):
        yield _collate([{k: v for k, v in dataset[i].items() if k in ("image", "label")}
                        for i in indices[start:start + batch_size]])


class _TrackedBatches(LoopHook):
    """A batch source that is a part of a checkpoint: its state is the reader's position after the batches the loop
    has CONSUMED, not after those handed out (a prefetching feature source takes the next batch before the loop
    steps on this one). It records the position after each batch it hands out, and the loop's after_micro_batch
    (one per batch taken) moves the consumed mark forward."""

    def __init__(self):
        self._pending: deque = deque()
        self._consumed: Optional[dict] = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._pending.clear()
        for batch in self._batches():
            self._pending.append(self._position())
            yield batch

    def after_micro_batch(self, loop) -> None:
        if self._pending:
            self._consumed = self._pending.popleft()

    def state_dict(self) -> dict:
        if self._consumed is None:
            raise CheckpointError("the data reader has no position to save yet (no batch was consumed)")
        return self._consumed


class PositionalBatches(_TrackedBatches):
    """Batches of a map-style dataset by global stream position (stream_batches): resuming at the saved position
    with any number of workers continues the same global order."""

    def __init__(self, dataset, per_rank_batch: int, seed: int, rank: int, world: int):
        super().__init__()
        self.dataset, self.batch, self.seed, self.rank, self.world = dataset, per_rank_batch, seed, rank, world
        self.start = self._at = 0
        self._consumed = {"position": 0}

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        self._at = self.start
        for batch in stream_batches(self.dataset, self.batch, self.seed, self.start, self.rank, self.world):
            self._at += self.batch * self.world
            yield batch

    def _position(self) -> dict:
        return {"position": self._at}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state["position"])
        self._consumed = {"position": self.start}


class StreamingBatches(_TrackedBatches):
    """A streaming dataset (image shards, or a latent cache of {"latent", "label"}; local or s3://) through a
    loader; the reader's own state carries the position (exact mid-epoch resume, any number of workers)."""

    def __init__(self, dataset, num_workers: int, pin_memory: bool = False):
        from ..data.stream import make_loader
        super().__init__()
        self.dataset = dataset
        self.loader = make_loader(self.dataset, num_workers=num_workers, pin_memory=pin_memory)

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # epochs repeat; the reader advances its epoch itself
            yield from self.loader

    def _position(self) -> dict:
        return {"reader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("reader") is None:
            raise CheckpointError("the checkpoint holds no data-reader state for this shard dataset")
        self.loader.load_state_dict(state["reader"])
        self._consumed = dict(state)


def make_batches(cfg: RunConfig, per_rank_batch: int, rank: int, world: int,
                 dataset_factory: Optional[Callable] = None):
    """The batch source of one worker: a caller's map-style dataset, shards, or an in-memory set."""
    if dataset_factory is not None:
        return PositionalBatches(dataset_factory(cfg), per_rank_batch, cfg.seed, rank, world)
    if cfg.data.latents is not None:
        return StreamingBatches(latent_dataset(cfg, per_rank_batch), cfg.data.num_workers, pin_memory(cfg))
    if is_shard_dataset(cfg.data.source):
        return StreamingBatches(shard_dataset(cfg, per_rank_batch), cfg.data.num_workers, pin_memory(cfg))
    return PositionalBatches(in_memory_dataset(cfg), per_rank_batch, cfg.seed, rank, world)


def statistics_batches(batches, per_rank_batch: int, images: int) -> Iterator[dict[str, torch.Tensor]]:
    """stats_batches over a worker's batch source (in memory or shards)."""
    dataset = getattr(batches, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise UserError("this stage measures latent statistics first, which needs a map-style data source "
                        "(fashion-mnist, a local image folder or image shards)")
    return stats_batches(dataset, per_rank_batch, images)
