"""From a run's DataConfig to the dataset a stage reads (the batch contract: "image" in [-1, 1] CHW, "label" long;
or "latent" + "label" from a latent cache).

    data.source = fashion-mnist          -> ImageArrayDataset, in memory (demo; no Streaming state to resume)
    data.source = /dir or s3://...       -> ImageStreamDataset over shards from `dmvae-scale data shards`
    data.latents = /dir or s3://...      -> LatentStreamDataset over `dmvae-scale data cache-latents` output
Training crops randomly when data.random_crop, else takes the ADM center crop; evaluation always the ADM crop.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from dmvae_scale.config import DataConfig
from dmvae_scale.errors import UserError

from .sources import BUILTIN_SETS


def build_image_dataset(cfg: DataConfig, batch_size: int, seed: int, train: bool = True,
                        cache_dir: str | None = None) -> Dataset:
    """`batch_size` is the per-rank batch; `seed` fixes shuffling and augmentation."""
    hflip = cfg.hflip and train
    if cfg.source in BUILTIN_SETS:
        from .builtin import ImageArrayDataset, load_fashion_mnist
        images, labels = load_fashion_mnist(cfg.split)
        if cfg.limit is not None:
            images, labels = images[:cfg.limit], labels[:cfg.limit]
        return ImageArrayDataset(images, labels, cfg.image_size, hflip=hflip, seed=seed)
    if cfg.limit is not None:
        raise UserError(f"data.limit={cfg.limit} applies to built-in sets only; for shards at {cfg.source} "
                        f"convert fewer samples instead (`dmvae-scale data shards --limit N`)")
    from .stream import ImageStreamDataset
    crop = "random" if (cfg.random_crop and train) else "adm"
    return ImageStreamDataset(cfg.source, batch_size=batch_size, image_size=cfg.image_size, crop=crop, hflip=hflip,
                              seed=seed, shuffle=train, cache_dir=cache_dir)


def build_latent_dataset(cfg: DataConfig, batch_size: int, seed: int, cache_dir: str | None = None):
    if not cfg.latents:
        raise UserError("data.latents: not set; point it at the output of `dmvae-scale data cache-latents`")
    from .latents import LatentStreamDataset
    return LatentStreamDataset(cfg.latents, batch_size=batch_size, hflip=cfg.hflip, seed=seed, cache_dir=cache_dir)
