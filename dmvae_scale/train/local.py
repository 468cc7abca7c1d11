"""Run one stage in this process (CPU, or one GPU): data in memory, PlainEngines, the shared loop, then the artifact.

Data: Fashion-MNIST from Debian's package, or an ImageNet-style folder (`root/<split>/<class>/<image>` or
`root/<class>/<image>`) decoded once into memory, resized by the short side and centre-cropped to data.image_size.
The batch order is a function of (seed, images seen): position p of the stream is image perm_e[p mod N] of epoch
e = p div N, so a run restarted at images_seen continues the same sequence.

Frozen-encoder features (stages with a frozen tokenizer encoder): `teacher.remote: false` computes them in this
process with the stage's own encoder, `true` asks the TeacherService (started here, or joined when one serving the
same teacher runs on the cluster; stopped at the end if started here), one batch ahead. Both compute in fixed-shape
chunks with the same weights, so the artifact is the same bit for bit (same device, dtype and thread count).
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..artifacts import ArtifactInfo
from ..config import RunConfig, save_resolved
from ..data.artifact_store import open_artifact
from ..data.builtin import ImageArrayDataset, load_fashion_mnist
from ..data.latents import LatentSummary, cache_latents, resolve_device
from ..distributed.teacher_service import (LocalFeatures, ServiceOptions, TeacherClient, connect_teacher_service,
                                           options_from_config, service_name, teacher_service)
from ..distributed.teachers import build_teacher, encoder_teacher, tokenizer_encoder_spec
from ..errors import UserError
from .api import PlainEngine
from .loop import LoopSummary, train_loop
from .stages import build_stage, save_stage_artifact



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


Attach = Callable[[Iterable[dict]], Iterator[dict]]


def _no_features(batches: Iterable[dict]) -> Iterator[dict]:
    yield from batches


def open_stage_features(stage, cfg: RunConfig, device: torch.device, stack: ExitStack, *, start: bool = True,
                        rank: int = 0, share_encoder: bool = True) -> Attach:
    """How a run's batches get their frozen-encoder features: from the service (teacher.remote), in-process, or not
    at all (the stage has no frozen encoder). Returns `attach(batches) -> batches with "teacher_features"`.

    start: start (or join) the service, bound to `stack`: a single-process run. A Ray Train worker passes
    start=False and its rank: it connects to the service its driver started (an actor dies with its creator).
    share_encoder: in-process, the stage's own encoder computes the features (no second copy); a DeepSpeed worker
    passes False (its engine may shard or cast that module) and gets a copy built from the spec, equal to the
    service's network.
    """
    spec = stage.teacher_spec
    if spec is None:
        return _no_features
    if cfg.teacher.remote:
        options = options_from_config(cfg, spec=spec)
        if start:
            pool = stack.enter_context(teacher_service(spec, options, address=cfg.distributed.address))
        else:
            pool = connect_teacher_service(spec, options)
        return _remote_attach(TeacherClient(pool, rank), stack, report=rank == 0)
    # In-process on this run's device: the spec's device follows the run, not distributed.use_gpu.
    spec = dataclasses.replace(spec, device=str(device), dtype="bfloat16" if device.type == "cuda" else "float32")
    teacher = encoder_teacher(spec, stage.frozen_encoder) if share_encoder else build_teacher(spec)
    return LocalFeatures(teacher).attach


def _remote_attach(client: TeacherClient, stack: ExitStack, report: bool = True) -> Attach:
    if report:
        stack.callback(lambda: print(f"teacher service: {client.requests} requests, {client.retries} retries, "
                                     f"{client.wait_s:.1f} s waiting for features", flush=True))
    return lambda batches: client.attach(batches, depth=1)


def cache_latents_with_teacher(src: str, dest: str, tokenizer_dir: str, *, remote: bool, weights: str = "ema",
                               batch_size: int = 64, device: str = "auto", options: ServiceOptions | None = None,
                               address: str | None = None, **kwargs) -> LatentSummary:
    """data.latents.cache_latents with the encoder's features from a teacher that is the artifact's frozen encoder:
    the TeacherService (`remote`; `options` default to one CPU-side replica named after the teacher) or the same
    network in this process. Both give the same latents, bit for bit. kwargs go to cache_latents."""
    artifact = open_artifact(tokenizer_dir)  # local or s3://
    info, artifact_cfg = artifact.info, artifact.config()
    # The features are computed where the teacher runs: the service's device, or this process's.
    on_gpu = (options is not None and options.num_gpus > 0) if remote else resolve_device(device).type == "cuda"
    # One chunk holds a batch and its mirrors: a fixed shape whatever the batch, so both sources agree.
    spec = dataclasses.replace(
        tokenizer_encoder_spec(artifact_cfg, tokenizer_dir, weights, info.content_hash), chunk=2 * batch_size,
        device="cuda" if on_gpu else "cpu", dtype="bfloat16" if on_gpu else "float32")
    with ExitStack() as stack:
        if remote:
            options = options or ServiceOptions(name=service_name(spec))
            attach = _remote_attach(TeacherClient(stack.enter_context(teacher_service(spec, options, address))), stack)
        else:
            attach = LocalFeatures(build_teacher(spec)).attach
        return cache_latents(src, dest, tokenizer_dir, weights=weights, batch_size=batch_size, device=device,
                             attach=attach, **kwargs)


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
    with ExitStack() as stack:
        attach = open_stage_features(stage, cfg, dev, stack)
        if stage.needs_prepare():
            stage.prepare(attach(stats_batches(dataset, cfg.batch_size, cfg.data.stats_images)))
        summary, loop = train_loop(stage, engines, attach(stream_batches(dataset, cfg.batch_size, cfg.seed)), cfg,
                                   device=dev, progress=progress)
    run_dir = Path(cfg.run_dir)
    save_resolved(cfg, run_dir)
    info = save_stage_artifact(stage, loop.emas, cfg, run_dir / "artifact")
    print(f"artifact {info.id} -> {run_dir / 'artifact'}", flush=True)
    return LocalRun(run_dir / "artifact", info, summary)
