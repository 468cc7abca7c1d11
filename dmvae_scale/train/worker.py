"""One DeepSpeed worker of a run, whatever the launcher: N of them under Ray Train, or one in this process (world size
1, gloo on loopback). Every worker (any process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set) calls
`run_worker(job)`:
  1. joins the process group (gloo on CPU, NCCL on GPU) and builds the stage, seeded alike on every rank;
  2. asks the CheckpointManager for the latest complete checkpoint (refused when the config changes what it means);
  3. wraps the stage's models in DeepSpeed engines (deepspeed_engine.build_engines) and restores the parts of a
     checkpoint through the manager: engines, loop counters, EMA partitions, the stage's state, the data position,
     the RNG states, the FLOP count (each part saves and loads its own state);
  4. runs the shared TrainLoop (loop.py, which seeds every step from (seed, rank, images seen)) with hooks:
     checkpoints every cfg.ckpt_every_images (checkpoint/manager.py), the stop request and Ray's preemption notice
     (collectives.py), metrics at the log interval (reporting.py; with `ray.train.report` under Ray Train);
  5. at the end writes a final checkpoint and the stage artifact (<run_dir>/artifact).
A run that stops itself (non-finite losses, a user error such as a missing artifact or a refused resume, a stop
request) returns a WorkerResult with a status instead of raising, so Ray Train never retries what a retry cannot fix.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Optional

import torch

from ..log import say
from ..config import batch_split, is_elastic
from ..data import storage
from ..data.artifact_store import upload_artifact
from ..errors import UserError
from ..models.compile import compile_model_parts, compile_wanted
from .api import WorkerJob, WorkerResult
from .batches import make_batches, statistics_batches
from .checkpoint import MANIFEST, CheckpointManager, ResumeRefusedError
from .checkpoint.durable import file_written
from .collectives import PREEMPTED, STOP, STOP_CHECK_EVERY, StopSignal, dist_env, mean_over_workers
from .deepspeed_engine import build_engines, device_for, init_distributed
from .ema import FullEMAView, ShardedEMA
from .guard import TrainingDivergedError
from .loop import LoopHook, TrainLoop
from .reporting import FlopCounter, ImageGrid, LogHook, MetricSinks, analytic_flops_per_image
from .precision import compute_paths, describe_paths
from .rng import RNGState, seed_everything, seed_step
from .watchdog import backend_timeout_s, watched, watching


class StopRequested(Exception):
    """Raised inside the loop after the stop checkpoint is written."""


class StopHook(LoopHook):
    """Every few steps the workers agree on the stop request: a stop checkpoints and ends the run; a preemption
    notice checkpoints at once and training goes on (the node may be reclaimed any moment; the restart resumes)."""

    def __init__(self, signal: StopSignal, checkpointer: CheckpointManager, device: torch.device, rank: int):
        self.signal, self.checkpointer, self.device, self.rank = signal, checkpointer, device, rank

    def after_step(self, loop) -> None:
        if loop.steps % STOP_CHECK_EVERY:
            return
        verdict = self.signal.agreed(self.device)
        if verdict == PREEMPTED:
            info = self.checkpointer.save()
            if self.rank == 0:
                say("train", f"preemption notice: checkpoint {info.url} written; training goes on")
        elif verdict == STOP:
            self.checkpointer.save()
            raise StopRequested()


class Worker:
    def __init__(self, job: WorkerJob):
        self.job, self.cfg = job, job.cfg
        self.report: Optional[Callable] = None  # report(images, metrics) at each log interval (Ray Train's)
        self.rank, self.world, self.local_rank = dist_env()
        dcfg = self.cfg.distributed
        self.device = device_for(dcfg.use_gpu)
        init_distributed(dcfg.use_gpu, backend_timeout_s(dcfg.timeout_s))
        # The global batch is batch_size at any world size (an elastic run's changes included): each worker takes
        # `accumulation` micro-batches of per_rank_batch images per optimiser step.
        self.per_rank_batch, self.accumulation = batch_split(self.cfg, self.world)
        self.checkpointer = CheckpointManager(self.cfg, rank=self.rank, world=self.world,
                                              local_rank=self.local_rank, device=self.device)
        self.stop = StopSignal(job.control, under_ray=job.control is not None)

    def build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)  # identical initial weights on every rank
        factory = self.job.stage_factory
        if factory is None:
            from .stages import build_stage
            factory = build_stage
        self.stage = factory(cfg, self.rank)
        models = self.stage.models()
        if compile_wanted(cfg.distributed.compile, self.device, cfg.distributed.zero_stage):
            compiled = sum(compile_model_parts(spec.module) for spec in models.values())
            if self.rank == 0:
                say("train", f"torch.compile: {compiled} model units (distributed.compile={cfg.distributed.compile})")
        self.checkpointer.find_resume(models)
        kwargs = {}
        if self.job.shard_frozen_above_bytes is not None:
            kwargs["shard_frozen_above_bytes"] = self.job.shard_frozen_above_bytes
        self.engine_set = build_engines(models, cfg.distributed, micro_batch=self.per_rank_batch, rank=self.rank,
                                        world_size=self.world, device=self.device,
                                        load_universal=self.checkpointer.universal, on_file_saved=file_written,
                                        accumulation=self.accumulation, **kwargs)
        set_precision = getattr(self.stage, "set_precision", None)
        if set_precision is not None:  # one autocast region per forward, opened by the stage (train/precision.py)
            set_precision(self.engine_set.precision, self.device.type)
        if self.local_rank == 0:
            say("train", f"{describe_paths(self._compute_paths(models))}", all_ranks=True)
        engines = self.engine_set.engines
        self.emas = {name: ShardedEMA(engines[name].module, spec.optim.ema_decay, self.rank, self.world)
                     for name, spec in models.items() if spec.trainable and spec.ema}
        self.batches = make_batches(cfg, self.per_rank_batch, self.rank, self.world, self.job.dataset_factory)
        self.loop = TrainLoop(self.stage, engines, cfg, emas=self.emas, device=self.device, world_size=self.world,
                              rank=self.rank, is_main=self.rank == 0,
                              progress=self.job.progress and self.job.control is None,
                              reduce_metrics=lambda m: mean_over_workers(m, self.world, self.device),
                              accumulation=self.accumulation)
        # a stage whose steps alternate costs names its cycle, so the count is the mean over one whole cycle (of
        # optimiser steps: `accumulation` batches each)
        self.flops = FlopCounter(self.per_rank_batch,
                                 steps=getattr(self.stage, "flop_cycle", 1) * self.accumulation)
        # What a checkpoint holds: parts that save and load their own state (checkpoint/manager.py).
        parts = {"loop": self.loop, "data": self.batches, "rng": RNGState(), "flops": self.flops,
                 **{f"ema.{name}": ema for name, ema in self.emas.items()}}
        if callable(getattr(self.stage, "state_dict", None)):
            parts["stage"] = self.stage
        self.checkpointer.track(engines, parts, upstream=getattr(self.stage, "upstream", {}))

    def _compute_paths(self, models: dict) -> dict[str, str]:
        paths = compute_paths(self.device, self.engine_set.precision)
        dtype = torch.bfloat16 if self.engine_set.precision == "bf16" else torch.float32
        for name, spec in models.items():
            pick = getattr(spec.module, "attention_backend", None)
            if callable(pick):
                paths[f"attention[{name}]"] = pick(self.device, dtype)
        return paths

    def run(self) -> WorkerResult:
        with contextlib.ExitStack() as stack:
            # a collective that stalls past distributed.timeout_s is named and fails this worker (watchdog.py)
            stack.enter_context(watching(self.cfg.distributed.timeout_s, self.rank, self.world))
            stack.callback(self.stop.close)
            stack.callback(self.checkpointer.close)
            self.build()
            # Frozen-encoder features for the batches: the teacher service (teacher.remote) or this process.
            self.attach = lambda batches: batches
            if getattr(self.stage, "teacher_spec", None) is not None:
                from .teacher_features import open_stage_features
                # In-process, share the stage's encoder unless ZeRO-3 shards it.
                self.attach = open_stage_features(self.stage, self.cfg, self.device, stack, rank=self.rank,
                                                  share_encoder=self.cfg.distributed.zero_stage < 3)
            return self._run(stack)

    def _say_world(self, was: Optional[int]) -> None:
        """Rank 0 says how the global batch is made at this world size: always in an elastic run, and whenever a
        resume changed the world size (the universal checkpoint took the state over)."""
        if self.rank != 0 or not (is_elastic(self.cfg) or (was is not None and was != self.world)):
            return
        cfg, loop = self.cfg, self.loop
        split = (f"global batch {cfg.batch_size} = {self.world} x micro {self.per_rank_batch} x accumulation "
                 f"{self.accumulation}")
        if was is None:
            say("train", f"starting at 0 of {cfg.total_images} images with world size {self.world}; {split}")
        else:
            say("train", f"going on at {loop.images_seen} of {cfg.total_images} images with world size {self.world} "
                         f"(was {was}); {split}")

    def _prepare_fresh(self) -> None:
        seed_step(self.cfg.seed, self.rank, 0)
        prepare = getattr(self.stage, "needs_prepare", None)
        if prepare is not None and prepare():
            self.stage.prepare(self.attach(statistics_batches(self.batches, self.per_rank_batch,
                                                              self.cfg.data.stats_images)))

    def _run(self, stack: contextlib.ExitStack) -> WorkerResult:
        cfg, loop, ckpt = self.cfg, self.loop, self.checkpointer
        fresh = not ckpt.restore()
        if fresh:
            self._prepare_fresh()
        self._say_world(None if fresh else ckpt.latest.world_size)
        sinks = MetricSinks(cfg, ckpt.store.cache_dir, self.job.wandb_project) if self.rank == 0 else None
        if sinks is not None:
            stack.callback(sinks.close)
        # FLOPs are counted on the run's first steps (step index < the stage's cycle), in whichever process takes
        # them: counting runs a step under a dispatch mode whose numerics differ in the last bits, so a resumed run
        # must count exactly the steps an uninterrupted one counts; what was counted before comes from the checkpoint.
        flops = self.flops
        log = LogHook(start_images=loop.images_seen, per_rank_batch=self.per_rank_batch, world=self.world,
                      device=self.device, precision=self.engine_set.precision, flops=flops, sinks=sinks,
                      report=self.report, total_images=cfg.total_images,
                      summary_lines=self.job.control is not None or not self.job.progress,  # no bar: a line each
                      analytic_per_image=analytic_flops_per_image(cfg))
        grid = ImageGrid(cfg.log_images_every_images, self.stage, self.device, sinks, loop.images_seen)
        # The data reader first: it marks the batch consumed before a checkpoint can be taken.
        loop.hooks = [self.batches, ckpt, StopHook(self.stop, ckpt, self.device, self.rank), log, grid]
        status, message = "done", ""
        try:
            # No autocast region here: a run-long region would feed every forward the first step's bf16 weights.
            batches = grid.wrap(self.attach(iter(self.batches)))
            loop.run(flops.wrap(batches, start_step=loop.steps * self.accumulation))
        except StopRequested:
            status = "stopped"
            message = (f"stopped on request at {loop.images_seen} of total_images={cfg.total_images} images; "
                       f"checkpoint {ckpt.last_saved.url}; run the same command again to resume from it")
        except TrainingDivergedError as exc:
            status = "diverged"
            kept = ckpt.store.latest() if self.rank == 0 else None
            message = f"{exc}; last good checkpoint: {kept.url if kept else 'none'}"
        finally:
            flops.close()
        result = WorkerResult(status, message, loop.images_seen, loop.steps, loop.skipped_steps,
                              history=list(log.history))
        if status == "done":
            result.checkpoint = ckpt.save().url
            result.artifact = self.write_artifact()
            if self.report is not None and log.history:  # Ray's view ends on the final checkpoint too
                self.report(loop.images_seen, {k: v for k, v in log.history[-1].items() if k != "images"})
        elif ckpt.last_saved is not None:
            result.checkpoint = ckpt.last_saved.url
        return result

    def write_artifact(self) -> str:
        """Full weights and EMA of the exported models (gathered under ZeRO-3), written by rank 0."""
        import torch.distributed as dist
        from .stages import save_stage_artifact
        full_ema = {name: ema.full_state_dict() for name, ema in self.emas.items()}  # collective
        views = {name: FullEMAView(sd) for name, sd in full_ema.items()}
        params = [p for eng in self.engine_set.engines.values() for p in eng.module.parameters()]
        store = self.checkpointer.store
        target = storage.join(self.cfg.run_dir, "artifact")
        local = target if not store.remote else os.path.join(store.cache_dir, "artifact")
        with _gathered(params):
            if self.rank == 0:
                save_stage_artifact(self.stage, views, self.cfg, local)
                if store.remote:
                    upload_artifact(local, target)  # artifact.json last
        with watched("barrier(artifact written)"):
            dist.barrier()
        return target


def _gathered(params):
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def run_worker(job: WorkerJob, make_report: Optional[Callable] = None) -> WorkerResult:
    """One worker's whole run. A user error (a missing artifact, a refused resume, a bad input) comes back as a
    result with its message, identical on every worker, instead of an exception a launcher would retry.
    make_report(checkpointer, rank) -> report(images, metrics), called at each log interval."""
    try:
        worker = Worker(job)
        if make_report is not None:
            worker.report = make_report(worker.checkpointer, worker.rank)
        return worker.run()
    except ResumeRefusedError as exc:
        return WorkerResult("refused", str(exc))
    except UserError as exc:
        return WorkerResult("error", str(exc))


def ray_report(checkpointer: CheckpointManager, rank: int) -> Callable:
    """`ray.train.report` at each log interval: the metrics, and (rank 0, when a newer checkpoint exists) a pointer
    checkpoint: a directory holding latest.json with the manifest URL of the latest complete checkpoint."""
    import ray.train
    reported = {"name": None}

    def report(images: int, metrics: dict[str, float]) -> None:
        latest = checkpointer.last_saved
        with tempfile.TemporaryDirectory() as d:
            pointer = None
            if rank == 0 and latest is not None and latest.name != reported["name"]:
                with open(os.path.join(d, "latest.json"), "w") as f:
                    json.dump({"manifest": storage.join(latest.url, MANIFEST), "images_seen": latest.images_seen},
                              f)
                pointer = ray.train.Checkpoint.from_directory(d)
                reported["name"] = latest.name
            ray.train.report({"images": float(images), **metrics}, checkpoint=pointer)
    return report


def ray_train_loop(config: dict) -> WorkerResult:
    """TorchTrainer's train_loop_per_worker. Rank 0's result comes back as the run's return value."""
    from ..distributed.placement import threads_as_reserved
    threads_as_reserved()  # as many torch threads as CPUs reserved: oversubscribed workers ran 4x slower
    return run_worker(config["job"], make_report=ray_report)
