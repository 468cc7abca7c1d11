"""One DeepSpeed worker of a distributed run: engines, data, the shared loop, checkpoints, resume, logging.

Every worker (a Ray Train worker, or any process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set)
calls `run_worker(job)`:
  1. joins the process group (gloo on CPU, NCCL on GPU) and builds the stage from the config, seeded alike on every
     rank;
  2. finds the latest complete checkpoint of the run directory; refuses it when the config changes what it means;
  3. wraps the stage's models (deepspeed_engine.build_engines), restoring engines, loop counters, EMA partitions,
     stage state, data position and RNG states from the checkpoint - through DeepSpeed's universal checkpoint when
     the number of workers or the ZeRO stage changed;
  4. runs the shared TrainLoop (train/loop.py) with hooks that checkpoint every cfg.ckpt_every_images images and on
     a stop request (SIGTERM, the driver's stop, a Ray preemption notice), log loss/throughput/achieved FLOP/s (MFU
     on GPU) at the log interval to metrics.jsonl, TensorBoard and optionally W&B (no per-step host syncs beyond
     the loop's non-finite guard), and reseed the global RNG from (seed, rank, images seen);
  5. at the end writes a final checkpoint and the stage artifact (<run_dir>/artifact).
A run that stops itself (non-finite losses, refused resume, stop request) returns a WorkerResult with a status
instead of raising, so Ray Train's failure handling does not retry what a retry cannot fix.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import RunConfig, config_hash, dump_yaml, to_dict
from ..data import storage
from ..data.artifact_store import artifact_info, upload_artifact
from ..errors import UserError
from . import checkpoint as ckpt
from .deepspeed_engine import (ShardedEMA, build_engines, convert_to_universal, device_for,
                               init_distributed, load_engines, save_engines)
from .loop import GuardedEngine, LoopHook, TrainingDivergedError, TrainLoop
from .precision import compute_paths, describe_paths

RANK_STATE_FORMAT = 1
STOP_CHECK_EVERY = 10  # steps between checks of the stop request (one tiny all-reduce)

# Peak dense bf16 tensor-core FLOP/s per device, for MFU. Matched as substrings of the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "B200": 2250e12,
                   "GH200": 989e12, "MI300X": 1307e12}


@dataclass
class WorkerJob:
    """Everything a worker needs; picklable (it travels to Ray workers).

    stage_factory(cfg, rank) -> Stage and dataset_factory(cfg) -> map-style dataset with set_epoch() replace the
    real ones (train.stages.build_stage; the data reader) where a caller brings its own (tests, benchmarks)."""

    cfg: RunConfig
    stage_factory: Optional[Callable] = None
    dataset_factory: Optional[Callable] = None
    shard_frozen_above_bytes: Optional[int] = None
    control: Any = None  # a Ray actor handle with .stop_requested(); set by the launcher
    wandb_project: Optional[str] = None  # log to Weights & Biases too (the launcher takes it from WANDB_PROJECT)


@dataclass
class WorkerResult:
    status: str  # "done" | "stopped" | "diverged" | "refused"
    message: str = ""
    images_seen: int = 0
    steps: int = 0
    skipped_steps: int = 0
    checkpoint: str = ""
    artifact: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


class AgreedGuard(GuardedEngine):
    """The loop's non-finite guard, deciding with the verdict all workers agreed on in backward (a loss that is
    finite here but not on another worker must skip here too, or the workers' weights and skip counts diverge)."""

    def step(self) -> None:
        local = True if self._finite is None else bool(self._finite)
        self._finite = torch.tensor(self.engine.all_finite(local))
        super().step()


class StopRequested(Exception):
    """Raised inside the loop after the stop checkpoint is written."""


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------

def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), \
        int(os.environ.get("LOCAL_RANK", "0"))


def step_seed(seed: int, rank: int, images_seen: int) -> int:
    """The global-RNG seed of the step that starts at `images_seen` on `rank`."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + images_seen) % (2 ** 63)


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def upstream_latents(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Latent shape and statistics of every upstream artifact the config names (part of what a checkpoint means)."""
    out = {}
    for role in ("tokenizer", "reference", "generator"):
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


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------

class PositionalBatches:
    """Batches of a map-style dataset by global stream position (train.local.stream_batches): resuming at
    images_seen with any number of workers continues the same global order. Its state is the position."""

    def __init__(self, dataset, per_rank_batch: int, seed: int, rank: int, world: int):
        self.dataset, self.batch, self.seed, self.rank, self.world = dataset, per_rank_batch, seed, rank, world
        self.start = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from .local import stream_batches
        return stream_batches(self.dataset, self.batch, self.seed, self.start, self.rank, self.world)

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
            raise ckpt.CheckpointError(f"the checkpoint at {images_seen} images holds no data-reader state")
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


def _is_shard_dataset(source: str) -> bool:
    return storage.is_remote(source) or os.path.isfile(os.path.join(source, "index.json"))


def make_batches(job: WorkerJob, per_rank_batch: int, rank: int, world: int):
    cfg = job.cfg
    if job.dataset_factory is not None:
        return PositionalBatches(job.dataset_factory(cfg), per_rank_batch, cfg.seed, rank, world)
    if cfg.data.latents is not None:
        return LatentBatches(cfg, per_rank_batch)
    if _is_shard_dataset(cfg.data.source):
        return StreamingBatches(cfg, per_rank_batch)
    from .local import build_dataset
    return PositionalBatches(build_dataset(cfg), per_rank_batch, cfg.seed, rank, world)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics sinks (rank 0)
# ----------------------------------------------------------------------------------------------------------------------

def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("WANDB_PROJECT is set but wandb is not installed; pip install wandb or unset "
                        "WANDB_PROJECT") from None
    return wandb


class MetricSinks:
    """metrics.jsonl and TensorBoard events under the run directory; W&B when WANDB_PROJECT is set."""

    def __init__(self, cfg: RunConfig, wandb_project: Optional[str] = None):
        self.cfg = cfg
        self.remote = storage.is_remote(cfg.run_dir)
        self.local_dir = os.path.join(ckpt.CheckpointStore(cfg.run_dir).cache_dir, "logs") if self.remote \
            else cfg.run_dir
        os.makedirs(self.local_dir, exist_ok=True)
        self.jsonl = os.path.join(self.local_dir, "metrics.jsonl")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"))
        self.wandb = None
        if wandb_project:
            wandb = import_wandb()
            self.wandb = wandb.init(project=wandb_project, name=cfg.name, resume="allow",
                                    id=f"{cfg.name}-{config_hash(cfg)}", config=to_dict(cfg))

    def write(self, images: int, metrics: dict[str, float]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"images": images, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, images)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=images)
        if self.remote:  # small files: copy the whole logs directory up at each interval
            fs, root = storage.filesystem(self.cfg.run_dir)
            for dirpath, _, files in os.walk(self.local_dir):
                for name in files:
                    src = os.path.join(dirpath, name)
                    rel = os.path.relpath(src, self.local_dir).replace(os.sep, "/")
                    fs.put_file(src, f"{root.rstrip('/')}/{rel}")

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None


class FlopCounter:
    """Counts the FLOPs of the first training step of this process (feeds achieved FLOP/s and, on GPU, MFU). Wraps
    the batch iterator so the count covers exactly one stage.step: it starts when batch 1 is handed out and stops
    when batch 2 is asked for (or at close())."""

    def __init__(self):
        self.flops_per_step: Optional[float] = None
        self._gen = None

    def wrap(self, batches: Iterator) -> Iterator:
        self._gen = self._counted(iter(batches))
        return self._gen

    def _counted(self, it: Iterator) -> Iterator:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            yield next(it)
        self.flops_per_step = float(counter.get_total_flops())
        yield from it

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()  # leaves the counting mode if the loop ended after one step


# ----------------------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------------------

class Reseed(LoopHook):
    """Any use of the global RNGs in the next step is a function of (seed, rank, images seen)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def seed_for(self, images_seen: int) -> None:
        s = step_seed(self.seed, self.rank, images_seen)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)

    def after_step(self, loop) -> None:
        self.seed_for(loop.images_seen)


class StopSignal:
    """A stop request from SIGTERM (when we own the main thread), the launcher's control actor, or Ray Train's
    preemption notice."""

    def __init__(self, control: Any, under_ray: bool):
        self.control = control
        self.under_ray = under_ray
        self.local = threading.Event()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.local.set())

    def requested(self) -> bool:
        if self.local.is_set():
            return True
        if self.control is not None:
            import ray
            if ray.get(self.control.stop_requested.remote()):
                return True
        if self.under_ray:
            import ray.train
            getter = getattr(ray.train, "get_preemption_info", None)
            if getter is not None and getter() is not None:  # collective: every rank calls it at the same steps
                return True
        return False


class CheckpointHook(LoopHook):
    def __init__(self, worker: "Worker"):
        self.w = worker
        every = worker.cfg.ckpt_every_images
        self.every = every
        self.next = None

    def after_step(self, loop) -> None:
        if self.next is None and self.every > 0:  # first step of this process: the next multiple after the start
            self.next = (self.w.start_images // self.every + 1) * self.every
        # Inside a run of skipped (non-finite) steps the save waits for the next good step: "last good checkpoint"
        # must not be one taken while the loss was going bad.
        if self.next is not None and loop.images_seen >= self.next and loop.images_seen < self.w.cfg.total_images \
                and loop.consecutive_skips == 0:
            self.w.save_checkpoint(loop)
            self.next = (loop.images_seen // self.every + 1) * self.every
        if loop.steps % STOP_CHECK_EVERY == 0:
            stop = self.w.stop.requested()
            flag = torch.tensor([1.0 if stop else 0.0], device=self.w.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                self.w.save_checkpoint(loop)
                raise StopRequested()


class LogHook(LoopHook):
    def __init__(self, worker: "Worker"):
        self.w = worker
        self.last_time = time.perf_counter()
        self.last_images = None

    def on_log(self, loop, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.last_images is None:
            self.last_images = self.w.start_images
        images = loop.images_seen - self.last_images
        rate = images / max(now - self.last_time, 1e-9)
        out = dict(metrics)
        out["images_per_second"] = rate
        out["skipped_steps"] = float(loop.skipped_steps)
        flops = self.w.flops.flops_per_step
        if flops:  # per worker: FLOPs of one step / its images x its share of the image rate
            achieved = flops / self.w.per_rank_batch * rate / self.w.world
            out["tflops_per_worker"] = achieved / 1e12
            peak = peak_flops(self.w.device, self.w.engine_set.precision)
            if peak:
                out["mfu"] = achieved / peak
        self.last_time, self.last_images = now, loop.images_seen
        self.w.history.append({"images": float(loop.images_seen), **out})
        if self.w.rank == 0:
            self.w.sinks.write(loop.images_seen, out)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint write (collective)
# ----------------------------------------------------------------------------------------------------------------------

def write_checkpoint(store: ckpt.CheckpointStore, name: str, engines: dict, rank_state: dict, *, rank: int,
                     device: torch.device, config_yaml: str, manifest: dict) -> ckpt.CheckpointInfo:
    """Every worker writes its ZeRO shards and its state, uploads them (remote stores), and agrees that all
    succeeded; only then rank 0 lists the files and writes the manifest, then prunes to keep-last-k. A failure on any
    worker raises on every worker and leaves the directory without a manifest, so it is never resumed from."""
    if rank == 0:
        store.prepare(name)
    dist.barrier()
    local = store.staging_dir(name, rank)
    error = None
    try:
        with ckpt.writing_checkpoint(store.remote):
            save_engines(engines, local)
            path = ckpt.rank_state_file(local, rank)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(rank_state, path)
            ckpt.file_written(path)
        if rank == 0:
            with open(os.path.join(local, "config.yaml"), "w") as f:
                f.write(config_yaml)
        store.upload(name, rank)
    except Exception as exc:  # every rank learns that the save failed; nobody writes a manifest
        error = exc
    if not _all_ok(error is None, device):
        raise ckpt.CheckpointError(f"checkpoint {store.url(name)} failed on a worker"
                                   f"{f': {error}' if error else ''}; it stays incomplete and is never "
                                   f"resumed from") from error
    info = None
    if rank == 0:
        store.sync(name)
        info = store.write_manifest(name, **manifest)
        store.prune(background=True)  # joined by the next save and at the end of the run
    return _broadcast(info)


# ----------------------------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, job: WorkerJob):
        self.job = job
        self.cfg = cfg = job.cfg
        self.rank, self.world, self.local_rank = _dist_env()
        self.under_ray = job.control is not None
        dcfg = cfg.distributed
        self.device = device_for(dcfg.use_gpu)
        init_distributed(dcfg.use_gpu, dcfg.timeout_s)
        if dist.get_world_size() != self.world:
            raise RuntimeError(f"WORLD_SIZE={self.world} but the process group has {dist.get_world_size()} ranks")
        if cfg.batch_size % (self.world * dcfg.grad_accum):
            raise UserError(f"batch_size: {cfg.batch_size} is not divisible by {self.world} workers x "
                            f"distributed.grad_accum={dcfg.grad_accum}")
        self.per_rank_batch = cfg.batch_size // (self.world * dcfg.grad_accum)
        self.store = ckpt.CheckpointStore(cfg.run_dir, keep=cfg.keep_checkpoints)
        self.stop = StopSignal(job.control, self.under_ray)
        self.history: list[dict[str, float]] = []
        self.last_saved: Optional[ckpt.CheckpointInfo] = None
        self.start_images = 0

    # -- build -------------------------------------------------------------------------------------------------------
    def build(self) -> Optional[WorkerResult]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        factory = self.job.stage_factory
        if factory is None:
            from .stages import build_stage
            factory = build_stage
        self.stage = factory(cfg, self.rank)
        models = self.stage.models()
        self.meaning = ckpt.meaning_of(cfg, upstream_latents(cfg), param_shapes(models))
        latest = _broadcast(self.store.latest() if self.rank == 0 else None)
        if latest is not None:
            try:
                ckpt.check_resume(latest.meaning, self.meaning, f"checkpoint {latest.url}")
                ckpt.check_zero_stage(latest.zero_stage, cfg.distributed.zero_stage, f"checkpoint {latest.url}")
            except ckpt.ResumeRefusedError as exc:
                return WorkerResult("refused", str(exc))
        self.latest = latest
        self.universal = latest is not None and latest.zero_stage > 0 and (
            latest.world_size != self.world or latest.zero_stage != cfg.distributed.zero_stage)
        kwargs = {}
        if self.job.shard_frozen_above_bytes is not None:
            kwargs["shard_frozen_above_bytes"] = self.job.shard_frozen_above_bytes
        self.engine_set = build_engines(models, cfg.distributed, micro_batch=self.per_rank_batch, rank=self.rank,
                                        world_size=self.world, device=self.device, load_universal=self.universal,
                                        **kwargs)
        set_precision = getattr(self.stage, "set_precision", None)
        if set_precision is not None:  # one autocast region per forward, opened by the stage (train/precision.py)
            set_precision(self.engine_set.precision, self.device.type)
        if self.rank == 0 or self.local_rank == 0:
            print(f"worker {self.rank}: {describe_paths(self._compute_paths(models))}", flush=True)
        self.emas = {name: ShardedEMA(eng.module, spec.optim.ema_decay, self.rank, self.world,
                                      should_update=eng.stepped_optimizer)
                     for name, spec in models.items() if spec.trainable and spec.ema
                     for eng in [self.engine_set.engines[name]]}
        self.batches = make_batches(self.job, self.per_rank_batch, self.rank, self.world)
        self.sinks = MetricSinks(cfg, self.job.wandb_project) if self.rank == 0 else None
        self.flops = FlopCounter()
        self.reseed = Reseed(cfg.seed, self.rank)
        self.log_hook = LogHook(self)
        self.loop = TrainLoop(self.stage, self.engine_set.engines, cfg, emas=self.emas,
                              hooks=[self.reseed, CheckpointHook(self), self.log_hook], device=self.device,
                              world_size=self.world, is_main=self.rank == 0, reduce_metrics=self._mean_over_workers)
        self.loop.engines = {name: AgreedGuard(eng) for name, eng in self.engine_set.engines.items()}
        return None

    def _compute_paths(self, models: dict) -> dict[str, str]:
        paths = compute_paths(self.device, self.engine_set.precision)
        dtype = torch.bfloat16 if self.engine_set.precision == "bf16" else torch.float32
        for name, spec in models.items():
            pick = getattr(spec.module, "attention_backend", None)
            if callable(pick):
                paths[f"attention[{name}]"] = pick(self.device, dtype)
        return paths

    def _mean_over_workers(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = sorted(means)
        if not keys:
            return means
        stacked = torch.stack([means[k].float().reshape(()) for k in keys]).to(self.device)
        dist.all_reduce(stacked)
        stacked /= self.world
        return dict(zip(keys, stacked))

    # -- checkpoint --------------------------------------------------------------------------------------------------
    def _rank_state(self, loop: TrainLoop) -> dict[str, Any]:
        state = {"format": RANK_STATE_FORMAT, "rank": self.rank, "world": self.world, "loop": loop.state_dict(),
                 "consecutive_skips": loop.consecutive_skips, "rng": rng_state()}
        reader = getattr(self.batches, "state_dict", None)
        state["reader"] = reader() if reader is not None else None
        return state

    def save_checkpoint(self, loop: TrainLoop) -> ckpt.CheckpointInfo:
        name = ckpt.checkpoint_name(loop.images_seen)
        if self.last_saved is not None and self.last_saved.name == name:
            return self.last_saved
        self.last_saved = write_checkpoint(
            self.store, name, self.engine_set.engines, self._rank_state(loop), rank=self.rank, device=self.device,
            config_yaml=dump_yaml(self.cfg),
            manifest=dict(images_seen=loop.images_seen, step=loop.steps, world_size=self.world,
                          zero_stage=self.cfg.distributed.zero_stage, engines=list(self.engine_set.engines),
                          meaning=self.meaning, config_hash=config_hash(self.cfg),
                          upstream=dict(getattr(self.stage, "upstream", {})),
                          counters={"skipped_steps": loop.skipped_steps}))
        return self.last_saved

    def restore(self) -> None:
        latest = self.latest
        if latest is None:
            self.reseed.seed_for(0)
            prepare = getattr(self.stage, "needs_prepare", None)
            if prepare is not None and prepare():
                from .local import stats_batches
                dataset = getattr(self.batches, "dataset", None)
                if dataset is None or not hasattr(dataset, "__getitem__"):
                    raise UserError("this stage measures latent statistics first, which needs an in-memory data "
                                    "source (fashion-mnist or a local image folder)")
                images = self.job.cfg.data.stats_images
                self.stage.prepare(self.attach(stats_batches(dataset, self.per_rank_batch, images)))
            return
        # Remote stores: one download per node (local rank 0), the others wait.
        local = self.store.local_view(latest) if (not self.store.remote or self.local_rank == 0) else None
        dist.barrier()
        local = local or self.store.local_view(latest)
        if self.universal:
            converter = self.rank == 0 if not self.store.remote else self.local_rank == 0
            if converter:
                convert_to_universal(local, latest.engines)
            dist.barrier()
        load_engines(self.engine_set.engines, local, self.universal)
        same_world = latest.world_size == self.world
        own = ckpt.rank_state_file(local, self.rank if same_world else 0)
        state = torch.load(own, map_location="cpu", weights_only=True)
        loop_state = state["loop"]
        if self.emas:
            ranks = [state] if same_world else [
                torch.load(ckpt.rank_state_file(local, r), map_location="cpu", weights_only=True)
                for r in range(latest.world_size)]
            if same_world:
                loop_state["ema"] = {n: [s] for n, s in loop_state["ema"].items()}
            else:
                loop_state["ema"] = {n: [r["loop"]["ema"][n] for r in ranks] for n in self.emas}
        self.loop.load_state_dict(loop_state)
        self.loop.consecutive_skips = int(state.get("consecutive_skips", 0))
        if same_world:
            set_rng_state(state["rng"])
        self.reseed.seed_for(self.loop.images_seen)
        self.batches.resume_at(self.loop.images_seen, state.get("reader"))
        self.start_images = self.loop.images_seen
        self.last_saved = latest
        if self.rank == 0:
            how = " through a universal checkpoint" if self.universal else ""
            print(f"resumed from {latest.url} ({latest.images_seen} images, {latest.world_size} workers){how}",
                  flush=True)

    # -- run ---------------------------------------------------------------------------------------------------------
    def run(self) -> WorkerResult:
        refused = self.build()
        if refused is not None:
            return refused
        with contextlib.ExitStack() as stack:
            # Frozen-encoder features for the batches: the teacher service (teacher.remote) or this process.
            self.attach = lambda batches: batches
            if getattr(self.stage, "teacher_spec", None) is not None:
                from .local import open_stage_features
                # Connect to the driver's service; in-process, share the stage's encoder unless ZeRO-3 shards it.
                self.attach = open_stage_features(self.stage, self.cfg, self.device, stack, start=False,
                                                  rank=self.rank,
                                                  share_encoder=self.cfg.distributed.zero_stage < 3)
            return self._run()

    def _run(self) -> WorkerResult:
        self.restore()
        loop = self.loop
        self.log_hook.last_time = time.perf_counter()
        status, message = "done", ""
        try:
            # No autocast region here: a run-long region would feed every forward the first step's bf16 weights.
            loop.run(self.flops.wrap(self.attach(iter(self.batches))))
        except StopRequested:
            status = "stopped"
            message = (f"stopped on request at {loop.images_seen} images; checkpoint {self.last_saved.url}; "
                       f"run the same command again to resume")
        except TrainingDivergedError as exc:
            status = "diverged"
            kept = self.store.latest() if self.rank == 0 else None
            message = f"{exc}; last good checkpoint: {kept.url if kept else 'none'}"
        finally:
            self.flops.close()
        result = WorkerResult(status, message, loop.images_seen, loop.steps, loop.skipped_steps,
                              history=list(self.history))
        if status == "done":
            info = self.save_checkpoint(loop)
            result.checkpoint = info.url
            result.artifact = self.write_artifact()
        elif self.last_saved is not None:
            result.checkpoint = self.last_saved.url
        self.store.wait()  # the last background prune: a finished run leaves exactly keep-last-k checkpoints
        if self.sinks is not None:
            self.sinks.close()
        return result

    def write_artifact(self) -> str:
        """Full weights and EMA of the exported models (gathered under ZeRO-3), written by rank 0."""
        from .stages import save_stage_artifact
        full_ema = {name: ema.full_state_dict() for name, ema in self.emas.items()}  # collective
        views = {name: _FullEMAView(sd) for name, sd in full_ema.items()}
        params = [p for eng in self.engine_set.engines.values() for p in eng.module.parameters()]
        target = storage.join(self.cfg.run_dir, "artifact")
        local = target if not self.store.remote else os.path.join(self.store.cache_dir, "artifact")
        with _gathered(params):
            if self.rank == 0:
                save_stage_artifact(self.stage, views, self.cfg, local)
                if self.store.remote:
                    upload_artifact(local, target)  # artifact.json last
        dist.barrier()
        return target


class _FullEMAView:
    """What save_stage_artifact needs from an EMA, from full (gathered) averages."""

    def __init__(self, shadow: dict[str, torch.Tensor]):
        self.shadow = shadow

    def module_state_dict(self, module) -> dict[str, torch.Tensor]:
        state = module.state_dict()
        for n, v in self.shadow.items():
            state[n] = v.to(state[n].dtype)
        return state


def _gathered(params):
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def run_worker(job: WorkerJob) -> WorkerResult:
    return Worker(job).run()


def ray_train_loop(config: dict) -> WorkerResult:
    """TorchTrainer's train_loop_per_worker. Rank 0's result comes back as the run's return value; progress goes to
    the run directory's logs, not through ray.train.report (a per-interval report costs a cross-worker barrier)."""
    return run_worker(config["job"])
