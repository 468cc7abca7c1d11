"""The one owner of a run's checkpoints (after torchtitan's CheckpointManager): cadence, the collective write,
restore (through DeepSpeed's universal checkpoint when the number of workers or the ZeRO stage changed), keep-last-k,
and the refusal of a checkpoint whose meaning the config changes.

What a checkpoint holds is a set of parts that checkpoint themselves; the manager stores and restores them without
reaching inside:
  - engines: `save(directory)` / `load(directory, universal)` (DeepSpeed writes its own ZeRO shards);
  - every other part: `state_dict()` / `load_state_dict(state)`, kept per rank in ranks/rank-NNNNN.pt: the loop's
    counters (the non-finite guard's included), each EMA's partition, the data reader's position, the RNG states,
    the stage's own state (measured latent statistics), the FLOP count.
After a change of world size a part is resharded by what it declares: `SHARDED = True` (the EMA partitions) is
handed the states of every rank of the saving run; `RANK_LOCAL = True` (the RNG states: the loop reseeds them from
(seed, rank, images seen) anyway) keeps its own; any other part is replicated and takes rank 0's state.

The worker calls `find_resume` (collective: the latest complete checkpoint, or a ResumeRefusedError naming the key),
`track` (the engines and parts), `restore` and `save`; as a loop hook the manager saves every cfg.ckpt_every_images
images. The files are the store's (store.py); what a checkpoint means is meaning.py; durable writes are durable.py;
how they are checked and read (sha256 before anything is read, pickles that cannot run code) is integrity.py.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from ...log import say
from ...config import RunConfig, config_hash, dump_yaml
from ..collectives import all_ok, broadcast
from ..watchdog import watched
from ..deepspeed_engine import DS_CHECKPOINT_TAG, convert_to_universal
from ..loop import LoopHook
from .durable import file_written, writing_checkpoint
from .integrity import checked_loads, safe_load, sha256_file
from .meaning import meaning_of, param_shapes, refuse_changed_meaning, upstream_latents
from .store import CheckpointError, CheckpointInfo, CheckpointStore, checkpoint_name, rank_state_file

RANK_STATE_FORMAT = 2


def read_rank_parts(directory: str, rank: int) -> dict[str, Any]:
    """{part name: state} of one rank of a checkpoint (format 2, or the format-1 layout converted)."""
    path = rank_state_file(directory, rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the checkpoint has no state for rank {rank}")
    state = safe_load(path, map_location="cpu")
    if state.get("format") == RANK_STATE_FORMAT:
        return state["parts"]
    if state.get("format") == 1:  # before the parts: the loop held the EMA and the stage's state
        loop = state["loop"]
        parts = {"loop": {"images_seen": loop["images_seen"], "steps": loop["steps"],
                          "skipped_steps": loop["skipped_steps"],
                          "consecutive_skips": state.get("consecutive_skips", 0)},
                 "rng": state["rng"], "flops": dict(state.get("extra") or {}),
                 "data": {"reader": state["reader"]} if state.get("reader") is not None
                 else {"position": loop["images_seen"]}}
        if "stage" in loop:
            parts["stage"] = loop["stage"]
        parts.update({f"ema.{name}": shard for name, shard in loop.get("ema", {}).items()})
        return parts
    raise CheckpointError(f"{path}: rank-state format {state.get('format')!r}; this version reads 1 and "
                          f"{RANK_STATE_FORMAT}")


def _reshard(part: Any, name: str, states: list[dict[str, Any]]) -> Optional[Any]:
    """The state a part takes after the world size changed (None: keep its own)."""
    if getattr(part, "SHARDED", False):
        return [s[name] for s in states]
    if getattr(part, "RANK_LOCAL", False):
        return None
    return states[0][name]


class CheckpointManager(LoopHook):
    def __init__(self, cfg: RunConfig, *, rank: int, world: int, local_rank: int, device: torch.device):
        self.cfg, self.rank, self.world, self.local_rank, self.device = cfg, rank, world, local_rank, device
        self.store = CheckpointStore(cfg.run_dir, keep=cfg.keep_checkpoints)
        self.every = cfg.ckpt_every_images
        self.latest: Optional[CheckpointInfo] = None
        self.last_saved: Optional[CheckpointInfo] = None
        self.universal = False
        self.meaning: dict[str, Any] = {}
        self.start_images = 0
        self._next: Optional[int] = None
        self.engines: dict = {}
        self.parts: dict[str, Any] = {}
        self.upstream: dict[str, str] = {}

    # -- 1. what to resume from ----------------------------------------------------------------------------------------
    def find_resume(self, models: dict) -> Optional[CheckpointInfo]:
        """Collective: the run directory's latest complete checkpoint (None: a fresh run). Raises ResumeRefusedError
        when the config changes what it means (config keys, upstream latent statistics, parameter shapes)."""
        cfg = self.cfg
        self.meaning = meaning_of(cfg, upstream_latents(cfg), param_shapes(models))
        latest = broadcast(self.store.latest() if self.rank == 0 else None, "latest checkpoint")
        if latest is not None:
            refuse_changed_meaning(latest, self.meaning, cfg.distributed.zero_stage)
        self.latest = latest
        self.universal = latest is not None and latest.zero_stage > 0 and (
            latest.world_size != self.world or latest.zero_stage != cfg.distributed.zero_stage)
        return latest

    def track(self, engines: dict, parts: dict[str, Any], upstream: Optional[dict[str, str]] = None) -> None:
        """What a checkpoint holds: the engines, the parts (one of them named "loop": its state has images_seen,
        steps and skipped_steps), and the upstream artifact ids the manifest records."""
        if "loop" not in parts:
            raise ValueError("a checkpoint's parts must include the loop (its counters date the checkpoint)")
        self.engines, self.parts, self.upstream = engines, parts, dict(upstream or {})

    # -- 2. restore ----------------------------------------------------------------------------------------------------
    def restore(self) -> bool:
        """Load the checkpoint find_resume chose into the engines and every part; False when there is none.

        Before anything is read, one process checks every file against the manifest's sha256 (rank 0 for a local
        store; for a remote one, local rank 0 of each node, which downloads to the node's cache first) while the
        others wait; every worker then reads only through integrity.checked_loads (files the manifest lists, and
        pickles that cannot run code). A refusal on one worker raises on all, naming the file where it happened."""
        latest = self.latest
        if latest is None:
            return False
        store = self.store
        prepares = (self.local_rank == 0) if store.remote else (self.rank == 0)
        local = self._agreed(lambda: store.local_view(latest) if prepares else None, latest,
                             "checking its files against the manifest")
        local = local or store.local_view(latest, verify=False)
        universal = tuple(f"engines/{name}/{DS_CHECKPOINT_TAG}_universal/" for name in latest.engines)
        with checked_loads(store.view(latest, local, derived=universal)):
            if self.universal:
                self._agreed(lambda: convert_to_universal(local, latest.engines) if prepares else None, latest,
                             "converting it to a universal checkpoint")
            for name, engine in self.engines.items():
                engine.load(os.path.join(local, "engines", name), self.universal)
            if latest.world_size == self.world:
                own = read_rank_parts(local, self.rank)
                chosen = {name: own[name] for name in self.parts if name in own}
            else:
                states = [read_rank_parts(local, r) for r in range(latest.world_size)]
                chosen = {name: _reshard(part, name, states) for name, part in self.parts.items()
                          if name in states[0]}
        missing = sorted(set(self.parts) - set(chosen) - {"stage"})
        if missing:
            raise CheckpointError(f"checkpoint {latest.url} holds no state for {', '.join(missing)}")
        for name, state in chosen.items():
            if state is not None:
                self.parts[name].load_state_dict(state)
        self.start_images = self.parts["loop"].state_dict()["images_seen"]
        self.last_saved = latest
        if self.rank == 0:
            how = " through a universal checkpoint" if self.universal else ""
            say("train", f"resumed from {latest.url} ({latest.images_seen} images, {latest.world_size} workers){how}")
        return True

    def _agreed(self, fn, latest: CheckpointInfo, what: str):
        """fn() on the workers it concerns while the others wait (collective): its error raises on the worker where
        it happened, and a CheckpointError on the others, instead of leaving them waiting for the timeout."""
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # every worker learns of it
            error = exc
        if not all_ok(error is None, self.device, f"resume: {what}"):
            if error is not None:
                raise error
            raise CheckpointError(f"checkpoint {latest.url}: {what} failed on another worker (its error names the "
                                  f"file); nothing was restored")
        return result

    # -- 3. save -------------------------------------------------------------------------------------------------------
    def save(self) -> CheckpointInfo:
        """Collective: a checkpoint at the loop's images seen (the existing one when already taken there)."""
        loop = self.parts["loop"].state_dict()
        name = checkpoint_name(loop["images_seen"])
        if self.last_saved is not None and self.last_saved.name == name:
            return self.last_saved
        rank_state = {"format": RANK_STATE_FORMAT, "rank": self.rank, "world": self.world,
                      "parts": {part_name: part.state_dict() for part_name, part in self.parts.items()}}
        manifest = dict(images_seen=loop["images_seen"], step=loop["steps"], world_size=self.world,
                        zero_stage=self.cfg.distributed.zero_stage, engines=list(self.engines), meaning=self.meaning,
                        config_hash=config_hash(self.cfg), upstream=self.upstream,
                        counters={"skipped_steps": loop["skipped_steps"]})
        self.last_saved = write_checkpoint(self.store, name, self.engines, rank_state, rank=self.rank,
                                           device=self.device, config_yaml=dump_yaml(self.cfg), manifest=manifest)
        return self.last_saved

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


def write_checkpoint(store: CheckpointStore, name: str, engines: dict, rank_state: dict, *, rank: int,
                     device: torch.device, config_yaml: str, manifest: dict) -> CheckpointInfo:
    """The collective write. Every worker writes its engines' ZeRO shards and its parts' state (hashing each file
    as it is finished), uploads them (remote stores), and agrees that all succeeded; only then rank 0 gathers the
    hashes, lists the files and writes the manifest, then prunes to keep-last-k. A failure on any worker raises on
    every worker and leaves the directory without a manifest, so it is never resumed from."""
    if rank == 0:
        store.prepare(name)
    with watched(f"barrier(checkpoint {name})"):
        dist.barrier()
    local = store.staging_dir(name, rank)
    error = None
    hashes: dict[str, str] = {}
    try:
        with writing_checkpoint(store.remote) as written:
            for engine_name, engine in engines.items():
                engine.save(os.path.join(local, "engines", engine_name))
            path = rank_state_file(local, rank)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(rank_state, path)
            file_written(path)
        if rank == 0:
            with open(os.path.join(local, "config.yaml"), "w") as f:
                f.write(config_yaml)
        hashes = _relative_hashes(local, written.sha256, everything_here=store.remote,
                                  also=["config.yaml"] if rank == 0 else [])
        store.upload(name, rank)
    except Exception as exc:  # every rank learns that the save failed; nobody writes a manifest
        error = exc
    if not all_ok(error is None, device, f"checkpoint {name} written"):
        raise CheckpointError(f"checkpoint {store.url(name)} failed on a worker"
                              f"{f': {error}' if error else ''}; it stays incomplete and is never "
                              f"resumed from") from error
    gathered: list = [None] * dist.get_world_size()
    with watched(f"all_gather_object(checkpoint {name} hashes)"):
        dist.all_gather_object(gathered, hashes)
    info = None
    if rank == 0:
        store.sync(name)
        info = store.write_manifest(name, **manifest, sha256=_merge_hashes(gathered))
        store.prune(background=True)  # joined by the next save and at the end of the run
    return broadcast(info, f"checkpoint {name} manifest")


def _relative_hashes(local: str, hashes: dict[str, str], everything_here: bool, also: list[str]) -> dict[str, str]:
    """{path relative to the checkpoint: sha256} of what this worker wrote under `local`, and of the files `also`
    names. everything_here (a remote store's per-worker staging directory): the files no writer reported
    (DeepSpeed's recovery scripts, config.yaml) are hashed too, so rank 0 never downloads them to hash them."""
    root = os.path.abspath(local)
    out = {os.path.relpath(p, root).replace(os.sep, "/"): h for p, h in hashes.items()
           if p.startswith(root.rstrip(os.sep) + os.sep)}
    if everything_here:
        for dirpath, _, files in os.walk(root):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                if rel not in out:
                    out[rel] = sha256_file(os.path.join(dirpath, f))
    for rel in also:
        if rel not in out:
            out[rel] = sha256_file(os.path.join(root, rel))
    return out


def _merge_hashes(per_rank: list) -> dict[str, str]:
    """The workers' hashes as one mapping; a file two workers report differently is left for rank 0 to hash."""
    merged: dict[str, str] = {}
    conflicting: set[str] = set()
    for hashes in per_rank:
        for rel, digest in (hashes or {}).items():
            if merged.setdefault(rel, digest) != digest:
                conflicting.add(rel)
    for rel in conflicting:
        merged.pop(rel)
    return merged
