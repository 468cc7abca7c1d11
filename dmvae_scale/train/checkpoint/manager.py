"""The one owner of a run's checkpoints (after torchtitan's CheckpointManager): cadence, the state a checkpoint
holds, the collective write, restore (through DeepSpeed's universal checkpoint when the number of workers or the ZeRO
stage changed), keep-last-k, and the refusal of a checkpoint whose meaning the config changes.

The worker calls three methods: `find_resume` (collective: the latest complete checkpoint, or a ResumeRefusedError
naming the key), `restore` (engines, loop counters, EMA partitions, stage state, data position, RNG) and `save`. As a
loop hook it saves every cfg.ckpt_every_images images. The store (layout, manifest written last, "latest complete",
pruning) is checkpoint.py; durable writes are durable.py.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..data.artifact_store import artifact_info
from ..config import RunConfig, config_hash, dump_yaml
from . import checkpoint as ckpt
from .collectives import all_ok, broadcast
from .deepspeed_engine import convert_to_universal, load_engines, save_engines
from .durable import file_written, writing_checkpoint
from .loop import LoopHook, TrainLoop
from .rng import rng_state, set_rng_state

RANK_STATE_FORMAT = 1


def upstream_latents(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Latent shape and statistics of every upstream artifact the config names (part of what a checkpoint means)."""
    out = {}
    for role in ("tokenizer", "real_score", "generator"):
        path = getattr(cfg.inputs, role)
        if path is None:
            continue
        info = artifact_info(path)  # local or s3://
        if info.latent is not None:
            out[role] = {"mean": info.latent.mean, "scale": info.latent.scale, "channels": info.latent.channels,
                         "height": info.latent.height, "width": info.latent.width}
    return out


def param_shapes(models: dict) -> dict[str, dict[str, list[int]]]:
    return {name: {n: list(p.shape) for n, p in spec.module.named_parameters()} for name, spec in models.items()}


class Checkpointer(LoopHook):
    def __init__(self, cfg: RunConfig, *, rank: int, world: int, local_rank: int, device: torch.device):
        self.cfg, self.rank, self.world, self.local_rank, self.device = cfg, rank, world, local_rank, device
        self.store = ckpt.CheckpointStore(cfg.run_dir, keep=cfg.keep_checkpoints)
        self.every = cfg.ckpt_every_images
        self.latest: Optional[ckpt.CheckpointInfo] = None
        self.last_saved: Optional[ckpt.CheckpointInfo] = None
        self.universal = False
        self.meaning: dict[str, Any] = {}
        self.start_images = 0
        self._next: Optional[int] = None
        self.engines: dict = {}
        self.loop: Optional[TrainLoop] = None
        self.batches: Any = None
        self.stage: Any = None
        self.extra: Callable[[], dict] = dict  # more of this worker's state to save (its FLOP count)
        self.restored_extra: dict = {}

    # -- 1. what to resume from ----------------------------------------------------------------------------------------
    def find_resume(self, models: dict) -> Optional[ckpt.CheckpointInfo]:
        """Collective: the run directory's latest complete checkpoint (None: a fresh run). Raises ResumeRefusedError
        when the config changes what it means (config keys, upstream latent statistics, parameter shapes)."""
        cfg = self.cfg
        self.meaning = ckpt.meaning_of(cfg, upstream_latents(cfg), param_shapes(models))
        latest = broadcast(self.store.latest() if self.rank == 0 else None)
        if latest is not None:
            ckpt.check_resume(latest.meaning, self.meaning, f"checkpoint {latest.url}")
            ckpt.check_zero_stage(latest.zero_stage, cfg.distributed.zero_stage, f"checkpoint {latest.url}")
        self.latest = latest
        self.universal = latest is not None and latest.zero_stage > 0 and (
            latest.world_size != self.world or latest.zero_stage != cfg.distributed.zero_stage)
        return latest

    def bind(self, stage, engines: dict, loop: TrainLoop, batches) -> None:
        """What a checkpoint holds: the engines' state, the loop's (counters, EMA, the stage's own), the reader's."""
        self.stage, self.engines, self.loop, self.batches = stage, engines, loop, batches

    # -- 2. restore ----------------------------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the checkpoint find_resume chose into everything bound; False when there is none (fresh run)."""
        latest, loop = self.latest, self.loop
        if latest is None:
            return False
        # Remote stores: one download per node (local rank 0), the others wait.
        local = self.store.local_view(latest) if (not self.store.remote or self.local_rank == 0) else None
        dist.barrier()
        local = local or self.store.local_view(latest)
        if self.universal:
            if (self.rank == 0) if not self.store.remote else (self.local_rank == 0):
                convert_to_universal(local, latest.engines)
            dist.barrier()
        load_engines(self.engines, local, self.universal)
        same_world = latest.world_size == self.world
        state = torch.load(ckpt.rank_state_file(local, self.rank if same_world else 0), map_location="cpu",
                           weights_only=True)
        loop_state = state["loop"]
        if loop.emas:
            if same_world:
                loop_state["ema"] = {n: [s] for n, s in loop_state["ema"].items()}
            else:
                ranks = [torch.load(ckpt.rank_state_file(local, r), map_location="cpu", weights_only=True)
                         for r in range(latest.world_size)]
                loop_state["ema"] = {n: [r["loop"]["ema"][n] for r in ranks] for n in loop.emas}
        loop.load_state_dict(loop_state)
        loop.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.restored_extra = dict(state.get("extra") or {})
        if same_world:
            set_rng_state(state["rng"])
        self.batches.resume_at(loop.images_seen, state.get("reader"))
        self.start_images = loop.images_seen
        self.last_saved = latest
        if self.rank == 0:
            how = " through a universal checkpoint" if self.universal else ""
            print(f"resumed from {latest.url} ({latest.images_seen} images, {latest.world_size} workers){how}",
                  flush=True)
        return True

    # -- 3. save -------------------------------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        loop = self.loop
        return {"format": RANK_STATE_FORMAT, "rank": self.rank, "world": self.world, "loop": loop.state_dict(),
                "consecutive_skips": loop.consecutive_skips, "rng": rng_state(),
                "reader": self.batches.state_dict(), "extra": self.extra()}

    def save(self) -> ckpt.CheckpointInfo:
        """Collective: a checkpoint at the loop's images seen (the existing one when already taken there)."""
        loop = self.loop
        name = ckpt.checkpoint_name(loop.images_seen)
        if self.last_saved is not None and self.last_saved.name == name:
            return self.last_saved
        self.last_saved = self._write(name, dict(
            images_seen=loop.images_seen, step=loop.steps, world_size=self.world,
            zero_stage=self.cfg.distributed.zero_stage, engines=list(self.engines), meaning=self.meaning,
            config_hash=config_hash(self.cfg), upstream=dict(getattr(self.stage, "upstream", {})),
            counters={"skipped_steps": loop.skipped_steps}))
        return self.last_saved

    def _write(self, name: str, manifest: dict) -> ckpt.CheckpointInfo:
        return write_checkpoint(self.store, name, self.engines, self._rank_state(), rank=self.rank,
                                device=self.device, config_yaml=dump_yaml(self.cfg), manifest=manifest)

    # -- cadence -------------------------------------------------------------------------------------------------------
    def after_step(self, loop) -> None:
        if self.every <= 0:
            return
        if self._next is None:  # first step of this process: the next multiple after the start
            self._next = (self.start_images // self.every + 1) * self.every
        # Inside a run of skipped (non-finite) steps the save waits for the next good step: "last good checkpoint"
        # must not be one taken while the loss was going bad.
        if loop.images_seen >= self._next and loop.images_seen < self.cfg.total_images \
                and loop.consecutive_skips == 0:
            self.save()
            self._next = (loop.images_seen // self.every + 1) * self.every

    def close(self) -> None:
        """Join the last background prune: a finished run leaves exactly keep-last-k checkpoints."""
        self.store.wait()


def write_checkpoint(store: ckpt.CheckpointStore, name: str, engines: dict, rank_state: dict, *, rank: int,
                     device: torch.device, config_yaml: str, manifest: dict) -> ckpt.CheckpointInfo:
    """The collective write. Every worker writes its ZeRO shards and its state, uploads them (remote stores), and
    agrees that all succeeded; only then rank 0 lists the files and writes the manifest, then prunes to keep-last-k.
    A failure on any worker raises on every worker and leaves the directory without a manifest, so it is never
    resumed from."""
    if rank == 0:
        store.prepare(name)
    dist.barrier()
    local = store.staging_dir(name, rank)
    error = None
    try:
        with writing_checkpoint(store.remote):
            save_engines(engines, local)
            path = ckpt.rank_state_file(local, rank)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(rank_state, path)
            file_written(path)
        if rank == 0:
            with open(os.path.join(local, "config.yaml"), "w") as f:
                f.write(config_yaml)
        store.upload(name, rank)
    except Exception as exc:  # every rank learns that the save failed; nobody writes a manifest
        error = exc
    if not all_ok(error is None, device):
        raise ckpt.CheckpointError(f"checkpoint {store.url(name)} failed on a worker"
                                   f"{f': {error}' if error else ''}; it stays incomplete and is never "
                                   f"resumed from") from error
    info = None
    if rank == 0:
        store.sync(name)
        info = store.write_manifest(name, **manifest)
        store.prune(background=True)  # joined by the next save and at the end of the run
    return broadcast(info)
