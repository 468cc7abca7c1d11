"""Run one stage in this process (CPU, or one GPU): data in memory, PlainEngines, the shared loop, then the artifact.

Data: Fashion-MNIST from Debian's package, or an ImageNet-style folder (`root/<split>/<class>/<image>` or
`root/<class>/<image>`) decoded once into memory, resized by the short side and centre-cropped to data.image_size.
The batch order is a function of (seed, images seen): position p of the stream is image perm_e[p mod N] of epoch
e = p div N, so a run restarted at images_seen continues the same sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import ArtifactInfo
from ..config import RunConfig, save_resolved
from ..data.builtin import ImageArrayDataset, load_fashion_mnist
from ..errors import UserError
from .api import PlainEngine
from .loop import LoopSummary, train_loop
from .stages import build_stage, save_stage_artifact

STATS_IMAGES = 4096  # images the latent mean/scale are measured on (fewer if the data set is smaller)


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
    if d.latents is not None:
        raise UserError("data.latents: the local runner reads images and encodes them itself; remove it")
    if d.random_crop:
        raise UserError("data.random_crop: the local runner serves centre-cropped images held in memory; set it false")
    if d.image_size != cfg.tokenizer.image_size:
        raise UserError(f"data.image_size={d.image_size} differs from tokenizer.image_size="
                        f"{cfg.tokenizer.image_size}; the tokenizer accepts only its own size")
    if d.source == "fashion-mnist":
        images, labels = load_fashion_mnist(d.split)
        num_classes = 10
        if d.limit:
            images, labels = images[:d.limit], labels[:d.limit]
    elif Path(d.source).is_dir():
        images, labels, num_classes = load_image_folder(d.source, d.split, d.image_size, d.limit)
    else:
        raise UserError(f"data.source: {d.source!r} is neither 'fashion-mnist' nor a local folder (shard datasets "
                        f"and s3:// URLs are read by the distributed runner)")
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


def stats_batches(dataset: ImageArrayDataset, batch_size: int, images: int = STATS_IMAGES
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """The first `images` images in data-set order (no flip): identical on every rank and every run."""
    hflip, dataset.hflip = dataset.hflip, False
    try:
        count = min(images, len(dataset))
        for start in tqdm(range(0, count, batch_size), desc="latent statistics", unit="batch", leave=False):
            yield _collate([dataset[i] for i in range(start, min(start + batch_size, count))])
    finally:
        dataset.hflip = hflip


@dataclass
class LocalRun:
    artifact: Path
    info: ArtifactInfo
    summary: LoopSummary


def run_local(cfg: RunConfig, device: str = "cpu", progress: bool = True) -> LocalRun:
    """Train cfg.stage in this process and write `<run_dir>/config.yaml` and the artifact `<run_dir>/artifact`."""
    if "://" in cfg.run_dir:
        raise UserError(f"run_dir: the local runner writes to a local directory, got {cfg.run_dir!r}")
    if cfg.distributed.num_workers != 1:
        raise UserError(f"distributed.num_workers={cfg.distributed.num_workers}: the local runner is one process; "
                        f"set it to 1")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here; use --device cpu")
    torch.manual_seed(cfg.seed)
    stage = build_stage(cfg)
    dataset = build_dataset(cfg)
    for spec in stage.models().values():
        spec.module.to(dev)
    engines = {name: PlainEngine(spec.module, spec.optim) for name, spec in stage.models().items() if spec.trainable}
    if stage.needs_prepare():
        stage.prepare(stats_batches(dataset, cfg.batch_size))
    summary, loop = train_loop(stage, engines, stream_batches(dataset, cfg.batch_size, cfg.seed), cfg,
                               device=dev, progress=progress)
    run_dir = Path(cfg.run_dir)
    save_resolved(cfg, run_dir)
    info = save_stage_artifact(stage, loop.emas, cfg, run_dir / "artifact")
    print(f"artifact {info.id} -> {run_dir / 'artifact'}", flush=True)
    return LocalRun(run_dir / "artifact", info, summary)
