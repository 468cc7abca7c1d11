"""From a run's config to the dataset its stage reads (the batch contract: "image" in [-1, 1] CHW, "label" long; or
"latent" + "label" from a latent cache). train/batches.py only batches what this returns.

    data.source = fashion-mnist          -> ImageArrayDataset, in memory (no Streaming state to resume)
    data.source = an image folder        -> ImageArrayDataset: decoded once, short side resized, centre-cropped
    data.source = /dir or s3://...       -> ImageStreamDataset over shards from `dmvae-scale data shards`
    data.latents = /dir or s3://...      -> LatentStreamDataset over `dmvae-scale data cache-latents` output
Training crops randomly when data.random_crop (shards only), else takes the centre crop; evaluation always takes the
ADM crop (eval/sources.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..log import progress, say
from ..config import RunConfig
from ..errors import UserError
from . import storage
from .builtin import ImageArrayDataset, load_fashion_mnist
from .shard_sources import open_source
from .transforms import decode_image, resize_short_side


def is_shard_dataset(source: str) -> bool:
    return storage.is_remote(source) or os.path.isfile(os.path.join(source, "index.json"))


def load_image_folder(root: str, split: str, image_size: int, limit: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode a folder tree into uint8 (N, S, S, 3) and labels; undecodable files are skipped and counted.
    Returns (images, labels, number of classes)."""
    source = open_source(root, split)
    samples = source.samples[:limit] if limit else source.samples
    images, labels, corrupt = [], [], 0
    for s in progress(samples, desc=f"decode {root}", unit="img", leave=False):
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
        say("data", f"skipped {corrupt} undecodable files under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64), len(source.classes)


def in_memory_dataset(cfg: RunConfig) -> ImageArrayDataset:
    """A built-in set or an image folder, decoded once into memory (centre crop at data.image_size)."""
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


def shard_dataset(cfg: RunConfig, per_rank_batch: int):
    """Image shards (local or s3://) through the streaming reader, which keeps its own position."""
    from .stream import ImageStreamDataset
    d = cfg.data
    return ImageStreamDataset(d.source, batch_size=per_rank_batch, image_size=d.image_size,
                              crop="random" if d.random_crop else "center", hflip=d.hflip, seed=cfg.seed,
                              **loading_kwargs(cfg))


def loading_kwargs(cfg: RunConfig) -> dict:
    """Streaming's cache bound and read-ahead from data.cache_limit / data.predownload (unset: Streaming's own)."""
    out = {"cache_limit": cfg.data.cache_limit}
    if cfg.data.predownload is not None:
        out["predownload"] = cfg.data.predownload
    return out


def latent_dataset(cfg: RunConfig, per_rank_batch: int):
    """A latent cache (data.latents) through the same streaming reader; the flip is the cache's stored mirror."""
    if not cfg.data.latents:
        raise UserError("data.latents: not set; point it at the output of `dmvae-scale data cache-latents`")
    from .latents import LatentStreamDataset
    return LatentStreamDataset(cfg.data.latents, batch_size=per_rank_batch, hflip=cfg.data.hflip, seed=cfg.seed,
                               **loading_kwargs(cfg))
