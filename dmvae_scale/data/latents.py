"""Latent cache: image shards encoded once by a trained tokenizer, so the generator stage trains without the encoder.

`dmvae-scale data cache-latents SRC DEST --tokenizer ARTIFACT` writes MDS shards with
    {"key": str, "label": int, "latent": (C, h, w), "latent_flip": (C, h, w)}
(latent_flip encodes the mirrored image: a flip of the image is not a flip of the latent) and latents.json with
the tokenizer artifact id, its LatentSpec (the normalisation every score/generator model uses), and the statistics
measured over the cache (mean of batch means, mean of 1/std, METHOD.md) for when the artifact carries none.
Images are prepared like evaluation images: the ADM center crop at the tokenizer's resolution.

With `attach` (train/teacher_features.py's cache_latents_with_teacher passes it), the frozen encoder's features come
from a teacher (the TeacherService, or the same network in-process): each batch is sent with its mirror as one request
and only the bottleneck runs here.

LatentStreamDataset serves the cache as {"latent": raw float32 (C, h, w), "label": long}: the stage normalises with
`dataset.latent_spec`, exactly as it would normalise latents it encoded itself. The image or its flip is chosen per
(seed, epoch, sample id), like the image reader's flip.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from dmvae_scale.log import progress as show_progress
from dmvae_scale.artifacts import LatentSpec
from dmvae_scale.batch_keys import FEATURES_KEY
from dmvae_scale.errors import UserError

from . import storage
from .artifact_store import open_tokenizer
from .shards import SHARD_HASH
from .stream import ImageStreamDataset, _EpochAware, streaming_locations
from .transforms import sample_rng

LATENT_COLUMNS = {"key": "str", "label": "int", "latent": "ndarray", "latent_flip": "ndarray"}


@dataclass
class LatentSummary:
    images: int
    bytes: int
    shards: int
    shape: tuple[int, int, int]
    measured_mean: float
    measured_scale: float
    seconds: float

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (f"cached latents of {self.images} images (and their flips), shape {self.shape}, "
                f"{self.bytes / 2**20:.1f} MiB in {self.shards} shards, {self.seconds:.1f} s ({rate:.1f} img/s); "
                f"measured mean {self.measured_mean:.4f}, scale {self.measured_scale:.4f}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here; use --device cpu")
    return torch.device(device)


def _encode(tokenizer, x: torch.Tensor) -> torch.Tensor:
    if tokenizer.cfg.in_channels == 1:
        x = x.mean(dim=1, keepdim=True)  # grayscale sets arrive replicated to RGB
    return tokenizer.encode(x)


def _with_mirrors(batches: Iterable[dict]) -> Iterator[dict]:
    """Each batch's images followed by their mirrors: one teacher request gives the features of both."""
    for batch in batches:
        x = batch["image"]
        yield {**batch, "image": torch.cat([x, x.flip(-1)])}


def cache_latents(src: str, dest: str, tokenizer_dir: str, *, weights: str = "ema", image_size: int | None = None,
                  batch_size: int = 64, workers: int = 2, device: str = "auto", dtype: str = "float16",
                  limit: int | None = None, progress: bool = True,
                  attach: Optional[Callable[[Iterable[dict]], Iterator[dict]]] = None) -> LatentSummary:
    """Encode the images of `src` with the tokenizer of `tokenizer_dir` into a latent cache at `dest`.

    attach: a feature source's `attach` (in-process or the TeacherService) whose teacher is this tokenizer's frozen
    encoder; the encoder then does not run here."""
    from streaming import MDSWriter
    from torch.utils.data import DataLoader
    started = time.perf_counter()
    dev = resolve_device(device)
    tokenizer, artifact = open_tokenizer(tokenizer_dir, weights)
    info = artifact.info
    tokenizer.to(dev)
    size = image_size or tokenizer.cfg.image_size
    storage.check_reachable(dest)
    if storage.exists(storage.join(dest, "index.json")):
        raise UserError(f"{dest} already holds a dataset (index.json); choose an empty destination")
    src_cache = tempfile.mkdtemp(prefix="dmvae-latents-src-")  # remote sources only; removed at the end
    images = ImageStreamDataset(src, batch_size=batch_size, image_size=size, crop="adm", hflip=False, shuffle=False,
                                with_keys=True, cache_dir=src_cache)
    total = images.num_samples if limit is None else min(limit, images.num_samples)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers)
    np_dtype = np.dtype(dtype)

    staging = tempfile.mkdtemp(prefix="dmvae-latents-") if storage.is_remote(dest) else None
    out_dir = os.path.join(staging, "latents") if staging else dest
    if not staging and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{dest} is not empty; choose an empty destination for the latent cache")
    batch_means, inv_stds, count, shape = [], [], 0, None
    try:
        with MDSWriter(out=out_dir, columns=LATENT_COLUMNS, hashes=[SHARD_HASH]) as writer, \
                show_progress(total=total, unit="img", desc=f"cache-latents {dest}", enabled=progress) as bar, \
                torch.inference_mode():
            for batch in (loader if attach is None else attach(_with_mirrors(loader))):
                n = len(batch["label"])
                take = min(n, total - count)
                if FEATURES_KEY in batch:
                    both = tokenizer.encode_from_features(batch[FEATURES_KEY].to(dev)).float()
                    z, z_flip = both[:take], both[n:n + take]
                else:
                    x = batch["image"][:take].to(dev)
                    z = _encode(tokenizer, x).float()
                    z_flip = _encode(tokenizer, x.flip(-1)).float()
                batch_means.append(z.mean().item())
                inv_stds.append(1.0 / z.std().item())
                z_np, zf_np = z.cpu().numpy().astype(np_dtype), z_flip.cpu().numpy().astype(np_dtype)
                for i in range(take):
                    writer.write({"key": batch["key"][i], "label": int(batch["label"][i]),
                                  "latent": z_np[i], "latent_flip": zf_np[i]})
                count += take
                shape = tuple(z.shape[1:])
                bar.update(take)
                if count >= total:
                    break
        index = json.loads(Path(out_dir, "index.json").read_text())
        measured = LatentSpec(*shape, mean=float(np.mean(batch_means)), scale=float(np.mean(inv_stds)))
        spec = info.latent if info.latent is not None else measured
        meta = {"format": 1, "source": src, "tokenizer": info.id, "tokenizer_dir": str(tokenizer_dir),
                "weights": weights, "image_size": size, "crop": "adm", "dtype": dtype, "images": count,
                "latent": asdict(spec), "latent_from": "artifact" if info.latent is not None else "measured",
                "measured": asdict(measured)}
        # index.json goes last: a reader never sees a cache whose shards or metadata are still being written.
        index_bytes = Path(out_dir, "index.json").read_bytes()
        os.remove(os.path.join(out_dir, "index.json"))
        if staging:
            storage.upload_dir(out_dir, dest)
        storage.write_bytes(storage.join(dest, "latents.json"), json.dumps(meta, indent=2).encode())
        storage.write_bytes(storage.join(dest, "index.json"), index_bytes)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(src_cache, ignore_errors=True)
    nbytes = sum(s["raw_data"]["bytes"] for s in index["shards"])
    return LatentSummary(count, nbytes, len(index["shards"]), shape, measured.mean, measured.scale,
                         time.perf_counter() - started)


def read_latent_info(url: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(url, "latents.json")))
    except storage.StorageError:
        raise UserError(f"{url}: no latents.json; not a latent cache written by `dmvae-scale data cache-latents`") \
            from None


class LatentStreamDataset(_EpochAware):
    """A latent cache as {"latent": raw float32 (C, h, w), "label": long}; normalise with `.latent_spec`."""

    def __init__(self, url: str, *, batch_size: int, hflip: bool = True, seed: int = 0, shuffle: bool = True,
                 cache_dir: str | None = None, num_canonical_nodes: int | None = None, with_keys: bool = False,
                 **streaming_kwargs: Any):
        locations = streaming_locations(url, cache_dir, streaming_kwargs.pop("cache_limit", None))
        self.info = read_latent_info(url)
        self.latent_spec = LatentSpec(**self.info["latent"])
        self.tokenizer_id = self.info["tokenizer"]
        self.hflip = hflip
        self.seed = int(seed)
        self.with_keys = with_keys
        self.url = url
        super().__init__(**locations, batch_size=batch_size, shuffle=shuffle, shuffle_seed=self.seed,
                         num_canonical_nodes=num_canonical_nodes, **streaming_kwargs)

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        raw = self.read_sample(sample_id, lambda raw: raw)  # a damaged shard: ShardDataError naming it
        flip = self.hflip and bool(sample_rng(self.seed, self.current_epoch, sample_id).integers(0, 2))
        latent = raw["latent_flip"] if flip else raw["latent"]
        out = {"latent": torch.from_numpy(np.asarray(latent, dtype=np.float32).copy()),
               "label": torch.tensor(int(raw["label"]), dtype=torch.long)}
        if self.with_keys:
            out["key"] = raw["key"]
        return out
