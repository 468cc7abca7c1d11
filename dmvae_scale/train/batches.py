"""Where a run's batches come from, by global stream position, the same for any number of workers.

Data: Fashion-MNIST from Debian's package, or an ImageNet-style folder (`root/<split>/<class>/<image>` or
`root/<class>/<image>`) decoded once into memory, resized by the short side and centre-cropped to data.image_size;
or MDS shards (a local directory with index.json, or s3://) through the streaming reader, whose own state carries the
position. In memory, position p of the stream is image perm_e[p mod N] of epoch e = p div N, so a run restarted at
images_seen, with any number of workers, continues the same sequence.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..config import RunConfig
from ..data import storage
from ..data.builtin import ImageArrayDataset, load_fashion_mnist
from ..errors import UserError
from .checkpoint import CheckpointError

def load_image_folder(root: str, split: str, image_size: int, limit: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode a folder tree into uint8 (N, S, S, 3) and labels; undecodable files are skipped and counted.
    Returns (images, labels, number of classes)."""
    from ..data.sources import open_source
    from ..data.transforms import decode_image, resize_short_side
    source = open_source(root, split)
    samples = source.samples[:limit] if limit else source.samples
    images, labels, corrupt = [], [], 0
    for s in tqdm(samples, desc=f"decode {root}", unit="img", leave=False):
        try:
            with open(s.locator, "rb") as f:
                img = resize_short_side(decode_image(f.read()), image_size)
        except Exception:  # a truncated or foreign file: count it, keep going
            corrupt += 1
            continue
        left, top = (img.size[0] - image_size) // 2, (img.size[1] - image_size) // 2
        images.append(np.asarray(img.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8))
        labels.append(s.label)
    if not images:
        raise UserError(f"data.source: no decodable images under {root}")
    if corrupt:
        print(f"data: skipped {corrupt} undecodable files under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), len(source.classes)


def build_dataset(cfg: RunConfig) -> ImageArrayDataset:
    d = cfg.data
    if d.random_crop:
        raise UserError(f"data.random_crop: {d.source!r} is decoded once into memory, centre-cropped; set it false "
                        f"or train from shards (dmvae-scale data shards)")
    if d.source == "fashion-mnist":
        images, labels = load_fashion_mnist(d.split)
        num_classes = 10
        if d.limit:
            images, labels = images[:d.limit], labels[:d.limit]
    elif Path(d.source).is_dir():
        images, labels, num_classes = load_image_folder(d.source, d.split, d.image_size, d.limit)
    else:
        raise UserError(f"data.source: {d.source!r} is neither 'fashion-mnist', a local image folder, nor a shard "
                        f"dataset (a directory with index.json, or s3://...)")
    if cfg.stage in ("reference", "dmd", "generator") and num_classes > cfg.score.num_classes:
        raise UserError(f"score.num_classes={cfg.score.num_classes} but data.source {d.source!r} has "
                        f"{num_classes} classes; set score.num_classes={num_classes}")
    return ImageArrayDataset(images, labels, d.image_size, hflip=d.hflip, seed=cfg.seed)


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
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
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
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
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
    for start in tqdm(range(0, len(indices), batch_size), desc="latent statistics", unit="batch", leave=False):
        yield _collate([{k: v for k, v in dataset[i].items() if k in ("image", "label")}
                        for i in indices[start:start + batch_size]])


class PositionalBatches:
    """Batches of a map-style dataset by global stream position (stream_batches): resuming at images_seen with any
    number of workers continues the same global order. Its state is the position."""

    def __init__(self, dataset, per_rank_batch: int, seed: int, rank: int, world: int):
        self.dataset, self.batch, self.seed, self.rank, self.world = dataset, per_rank_batch, seed, rank, world
        self.start = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return stream_batches(self.dataset, self.batch, self.seed, self.start, self.rank, self.world)

    def state_dict(self) -> None:
        return None

    def resume_at(self, images_seen: int, state: Optional[dict]) -> None:
        self.start = images_seen


class StreamingBatches:
    """Shard datasets (local or s3://) through the streaming reader; its own state carries the position."""

    def __init__(self, cfg: RunConfig, per_rank_batch: int):
        from ..data.stream import ImageStreamDataset, make_loader
        d = cfg.data
        self.dataset = ImageStreamDataset(d.source, batch_size=per_rank_batch, image_size=d.image_size,
                                          crop="random" if d.random_crop else "center", hflip=d.hflip, seed=cfg.seed)
        self.loader = make_loader(self.dataset, num_workers=d.num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # epochs repeat; the reader advances its epoch itself
            yield from self.loader

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def resume_at(self, images_seen: int, state: Optional[dict]) -> None:
        if state is None:
            raise CheckpointError(f"the checkpoint at {images_seen} images holds no data-reader state")
        self.loader.load_state_dict(state)


class LatentBatches(StreamingBatches):
    """A latent cache (data.latents, written by `data cache-latents`): {"latent", "label"} batches through the same
    streaming reader, with the same exact mid-epoch resume; the flip is the cache's stored latent of the mirror."""

    def __init__(self, cfg: RunConfig, per_rank_batch: int):
        from ..data.latents import LatentStreamDataset
        from ..data.stream import make_loader
        self.dataset = LatentStreamDataset(cfg.data.latents, batch_size=per_rank_batch, hflip=cfg.data.hflip,
                                           seed=cfg.seed)
        self.loader = make_loader(self.dataset, num_workers=cfg.data.num_workers)


def is_shard_dataset(source: str) -> bool:
    return storage.is_remote(source) or os.path.isfile(os.path.join(source, "index.json"))


def make_batches(cfg: RunConfig, per_rank_batch: int, rank: int, world: int,
                 dataset_factory: Optional[Callable] = None):
    """The batch source of one worker: a caller's map-style dataset, shards, or an in-memory set."""
    if dataset_factory is not None:
        return PositionalBatches(dataset_factory(cfg), per_rank_batch, cfg.seed, rank, world)
    if cfg.data.latents is not None:
        return LatentBatches(cfg, per_rank_batch)
    if is_shard_dataset(cfg.data.source):
        return StreamingBatches(cfg, per_rank_batch)
    return PositionalBatches(build_dataset(cfg), per_rank_batch, cfg.seed, rank, world)


def statistics_batches(batches, per_rank_batch: int, images: int) -> Iterator[dict[str, torch.Tensor]]:
    """stats_batches over a worker's batch source (in memory or shards)."""
    dataset = getattr(batches, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise UserError("this stage measures latent statistics first, which needs a map-style data source "
                        "(fashion-mnist, a local image folder or image shards)")
    return stats_batches(dataset, per_rank_batch, images)
