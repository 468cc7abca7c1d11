"""DeepSpeed engines for a stage's models: one engine per trainable model, frozen models prepared for inference.

Every trainable `ModelSpec` becomes a `DeepSpeedEngine`: torch AdamW (the optimiser of the tests' plain reference,
so a DeepSpeed run and a plain single-process run of the same seed follow the same trajectory), the linear warm-up
schedule, global-norm clipping and ZeRO stage 0-3, all from the typed run config. Precision: bf16 autocast where the
device has bf16 (parameters and optimiser state stay fp32), fp32 on CPU. Frozen models (the real score model, an SSL
teacher) are not wrapped for training: eval mode, no gradients; under ZeRO-3 one too large to replicate is
partitioned by a ZeRO-3 inference engine and gathered layer by layer in forward.

The wrapper adds what DeepSpeed leaves to the caller:
  - forwards run the plain module (DeepSpeed's engine forward hooks its outputs, so a discriminator inside the
    generator's loss or an autograd.grad for an adaptive weight would run the wrong engine's gradient reduction);
    backward goes through DeepSpeed with the prologue the output hook would have run (pinned DeepSpeed 0.19.8);
  - `save` / `load` of its own ZeRO shards, as one of the parts a checkpoint holds (checkpoint/manager.py);
The non-finite guard wraps these engines (guard.py).
Activation checkpointing is the models' own (DiTConfig.grad_checkpointing: torch non-reentrant checkpointing, which
works under ZeRO 1-3); gradient accumulation is DeepSpeed's: `accumulation` micro-batches per step
(config.batch_split: distributed.grad_accum at the planned world size, more at a smaller one of an elastic run).
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import DistributedConfig, OptimConfig
from ..errors import UserError
from ..models.hardware import native_bf16
from .api import ModelSpec, warmup_lambda

# A frozen model above this size is partitioned under ZeRO-3 instead of replicated on every worker.
FROZEN_SHARD_BYTES = 2 * 2**30
DS_CHECKPOINT_TAG = "zero"


class EngineConfigError(UserError):
    """A distributed setting that cannot work here (precision the device lacks, a stage without optimiser...)."""


# ----------------------------------------------------------------------------------------------------------------------
# Process group and precision
# ----------------------------------------------------------------------------------------------------------------------

def init_distributed(use_gpu: bool, timeout_s: float = 1800) -> None:
    """Join (or create) the process group through DeepSpeed: NCCL on GPU, gloo on CPU.

    On CPU, DeepSpeed would JIT-compile its shared-memory all-reduce op (80-140 s on first use). That op only serves
    inference all-reduce; training collectives go through torch.distributed gloo either way, so we mark it
    unavailable and skip the build.

    `timeout_s` (the worker passes watchdog.backend_timeout_s(distributed.timeout_s)) bounds every collective,
    including the wait of the other ranks while rank 0 downloads or converts a large checkpoint: raise
    distributed.timeout_s for multi-hundred-GB checkpoints on slow object storage. Under Ray Train the group already
    exists (TorchConfig.timeout_s, set from the same value) and DeepSpeed joins it.
    """
    import datetime

    import deepspeed
    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s))


def device_for(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EngineConfigError("distributed.use_gpu=true but no CUDA device is visible to this worker; "
                                "set distributed.use_gpu=false or run where GPUs are")
    # One visible device: the scheduler isolated this worker's GPU (CUDA_VISIBLE_DEVICES); else the node's devices
    # are shared and the local rank picks one.
    index = 0 if torch.cuda.device_count() == 1 else int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device computes bf16 natively (CUDA, compute capability >= 8.0), else fp32. An
    explicit bf16 on CPU runs CPU autocast (slow, but the same weight-cast cache as CUDA: what the tests exercise)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise EngineConfigError(f"distributed.precision=bf16 but {torch.cuda.get_device_name(device)} has no native "
                                f"bf16 (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
                                f" < 8.0); use fp32 or auto")
    return precision


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------------------------------

def deepspeed_config(optim: OptimConfig, dist_cfg: DistributedConfig, *, micro_batch: int, world_size: int,
                     load_universal: bool = False, zero_stage: int | None = None,
                     accumulation: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of one trainable model, generated from the typed run config (never hand-written).
    accumulation: gradient-accumulation steps at this world size (default distributed.grad_accum)."""
    accumulation = dist_cfg.grad_accum if accumulation is None else accumulation
    stage = dist_cfg.zero_stage if zero_stage is None else zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Whole-model consolidation happens in our export (offline, from the shards), not at every save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": float(optim.grad_clip or 0.0),
        "zero_optimization": zero,
        # bf16 runs as autocast around the stage step (fp32 master weights = the module's weights); DeepSpeed's
        # own bf16 mode would cast the modules and every stage input along with them.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def _adamw(optim: OptimConfig, device: torch.device):
    def make(params):
        # fused on CUDA: one kernel for the whole update; CPU keeps torch's default (foreach), like the plain reference.
        extra = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                 **extra)
    return make


# ----------------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------------

class DeepSpeedEngine:
    """A DeepSpeed engine with the stage contract's calling convention (`engine(x)`, `backward`, `step`, `module`);
    the non-finite guard (guard.py) wraps it. As a part of a checkpoint it writes and reads its own ZeRO shards
    (`save` / `load`)."""

    def __init__(self, name: str, ds_engine, world: int):
        self.name = name
        self.ds = ds_engine
        self.module = ds_engine.module
        self.world = world
        self._stepped = False
        self._zero = ds_engine.zero_optimization()

    def __call__(self, *args, **kwargs):
        # The plain module runs the forward, never DeepSpeed's engine forward: that one hooks its outputs so that ANY
        # backward through them counts as this engine's backward - a discriminator inside the generator's loss, or
        # an autograd.grad for the adaptive GAN weight, would then run this engine's gradient reduction in the middle
        # of another's. Parameter gathering under ZeRO-3 lives in module hooks and works either way. What the engine
        # forward does for the optimiser at the start of a training forward, we do here.
        if self._zero and torch.is_grad_enabled():
            self.ds.optimizer.clear_backward_seen_flag()
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        if self._zero:  # the engine forward's output hook would run this when the gradient reaches the outputs
            self.ds._backward_prologue()
        self.ds.backward(loss)

    def step(self) -> None:
        boundary = self.ds.is_gradient_accumulation_boundary()  # the optimiser steps only on a boundary
        self.ds.step()
        self._stepped = boundary

    def stepped_optimizer(self) -> bool:
        """Whether the last step() changed the weights (False inside a gradient-accumulation window)."""
        return self._stepped

    # -- a part of a checkpoint: its DeepSpeed state (module, optimiser, schedule, counters) as ZeRO shards --------
    def save(self, directory: str) -> None:
        """Every rank writes its ZeRO shards under directory/zero/ (collective)."""
        self.ds.save_checkpoint(directory, tag=DS_CHECKPOINT_TAG, client_state={}, save_latest=False)

    def load(self, directory: str, universal: bool = False) -> None:
        """Read this engine's state back (from the universal conversion when the world or ZeRO stage changed);
        raises if anything is missing. Every file is unpickled weights_only (integrity.checked_loads): one whose
        pickle would run code raises a CheckpointError naming it, before any of it runs."""
        from .checkpoint.integrity import checked_loads
        tag = f"{DS_CHECKPOINT_TAG}_universal" if universal else DS_CHECKPOINT_TAG
        try:
            with checked_loads():  # DeepSpeed's readers ask torch.load for full pickles: they get safe ones
                path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            forget = getattr(self.ds.checkpoint_engine, "forget", None)
            if forget is not None:
                forget()
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint of engine '{self.name}' under {directory}/{tag}")

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    @property
    def global_steps(self) -> int:
        return int(self.ds.global_steps)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's full fp32 weights on every rank (collective under ZeRO-3)."""
        params = list(self.module.parameters())
        if any(hasattr(p, "ds_tensor") for p in params):
            import deepspeed
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


@dataclass
class EngineSet:
    """What `build_engines` returns: engines by name (trainable), frozen modules by name, precision."""

    engines: dict[str, DeepSpeedEngine]
    frozen: dict[str, nn.Module]
    precision: str
    device: torch.device
    zero_stage: int
    sharded_frozen: list[str] = field(default_factory=list)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _prepare_frozen(name: str, module: nn.Module, device: torch.device, zero_stage: int, micro_batch: int,
                    shard_above_bytes: int) -> tuple[nn.Module, bool]:
    module.eval().requires_grad_(False)
    if zero_stage == 3 and param_bytes(module) > shard_above_bytes:
        import deepspeed
        # ZeRO-3 with no optimiser: parameters stay partitioned, forward hooks gather each layer when it runs.
        cfg = {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {"stage": 3},
               "steps_per_print": 2**31 - 1}
        engine, *_ = deepspeed.initialize(model=module, config=cfg)
        engine.eval()
        return engine.module, True
    return module.to(device), False


def build_engines(models: dict[str, ModelSpec], dist_cfg: DistributedConfig, *, micro_batch: int, rank: int,
                  world_size: int, device: torch.device, load_universal: bool = False,
                  shard_frozen_above_bytes: int = FROZEN_SHARD_BYTES,
                  on_file_saved: Callable[[str], None] | None = None, accumulation: int | None = None) -> EngineSet:
    """Wrap every trainable model in a DeepSpeed engine and prepare frozen ones; process group must exist.
    on_file_saved(path) is called as each checkpoint file is written (the checkpoint writer's early flush)."""
    import deepspeed
    precision = resolve_precision(dist_cfg.precision, device)
    engines: dict[str, DeepSpeedEngine] = {}
    frozen: dict[str, nn.Module] = {}
    sharded: list[str] = []
    for name, spec in models.items():
        if not spec.trainable:
            frozen[name], was_sharded = _prepare_frozen(name, spec.module, device, dist_cfg.zero_stage, micro_batch,
                                                        shard_frozen_above_bytes)
            if was_sharded:
                sharded.append(name)
            continue
        if spec.optim is None:
            raise EngineConfigError(f"model '{name}' is trainable but its ModelSpec has no optim settings")
        params = [p for p in spec.module.parameters() if p.requires_grad]
        if not params:
            raise EngineConfigError(f"model '{name}' is trainable but has no parameter with requires_grad")
        cfg = deepspeed_config(spec.optim, dist_cfg, micro_batch=micro_batch, world_size=world_size,
                               load_universal=load_universal, accumulation=accumulation)
        warmup = warmup_lambda(spec.optim.warmup_steps)
        ds_engine, *_ = deepspeed.initialize(
            model=spec.module.to(device), model_parameters=params, optimizer=_adamw(spec.optim, device),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup), config=cfg)
        _use_reusing_loads(ds_engine, on_file_saved)
        engines[name] = DeepSpeedEngine(name, ds_engine, world_size)
    if not engines:
        raise EngineConfigError("the stage declares no trainable model; nothing to train")
    return EngineSet(engines, frozen, precision, device, dist_cfg.zero_stage, sharded)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load of the engines' DeepSpeed state (collective)
# ----------------------------------------------------------------------------------------------------------------------

def _location_key(map_location) -> Any:
    """Equal for equal map_location arguments; DeepSpeed passes a fresh `lambda storage, loc: storage` each time,
    so a function compares by its code, not by identity."""
    code = getattr(map_location, "__code__", None)
    if code is None:
        return repr(map_location)
    if map_location.__closure__ or getattr(map_location, "__defaults__", None):
        return ("id", id(map_location))  # captured values could differ: never reuse across two of these
    return (code.co_code, code.co_consts, code.co_names, code.co_varnames)


@functools.lru_cache(maxsize=None)
def _reusing_checkpoint_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from .checkpoint.integrity import safe_load

    class ReusingTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, minus one redundant read of every restore, plus early flushes.

        DeepSpeed 0.19.8 deserialises the model-states file twice in a row on every load: SDLoaderBase's
        check_ckpt_list reads the whole file for one metadata field and drops it, then load() reads it again. Here
        the object loaded last is handed out once more when the very next request is for the same unchanged file
        (same path, size and mtime), then forgotten; `forget()` drops it at the end of a restore. A restore thus
        reads each byte once, as a raw read of the checkpoint does. Every read is integrity.safe_load (weights_only
        with the few DeepSpeed types its files hold; DeepSpeed's own engine unpickles them in full). Saving reports
        each finished file to the checkpoint writer through `on_saved` (durable.file_written), which hashes and
        flushes it in the background while the next is written.
        """

        _last: tuple | None = None
        on_saved: Callable[[str], None] | None = None

        def load(self, path: str, map_location=None):
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, _location_key(map_location))
            last, self._last = self._last, None
            if last is not None and last[0] == key:
                return last[1]
            state = safe_load(path, map_location=map_location)
            self._last = (key, state)
            return state

        def forget(self) -> None:
            self._last = None

        def save(self, state_dict, path: str):
            super().save(state_dict, path)
            if self.on_saved is not None:
                self.on_saved(path)  # a background fsync when a checkpoint is being written to local disk

    return ReusingTorchCheckpointEngine


def _use_reusing_loads(ds_engine, on_saved: Callable[[str], None] | None = None) -> None:
    """Swap DeepSpeed's default torch checkpoint engine for the one above (other engines, such as a decoupled or
    Nebula engine a user configured, are left alone)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    if type(ds_engine.checkpoint_engine) is TorchCheckpointEngine:
        ds_engine.checkpoint_engine = _reusing_checkpoint_engine_class()(ds_engine._config)
        ds_engine.checkpoint_engine.on_saved = on_saved


def convert_to_universal(directory: str, names: Iterable[str]) -> None:
    """DeepSpeed's universal-checkpoint conversion of each engine (run by one process; others wait). Engine names
    become paths (one is removed): each must be a safe name and stay inside `directory`. Its reads are
    integrity.checked_loads (weights_only) like every read of a checkpoint."""
    import argparse
    from deepspeed.checkpoint import ds_to_universal

    from .checkpoint.integrity import check_name, checked_loads, join_inside
    for name in names:
        check_name(name, f"{directory}: engine name")
        src = join_inside(directory, f"engines/{name}/{DS_CHECKPOINT_TAG}", directory)
        dst = join_inside(directory, f"engines/{name}/{DS_CHECKPOINT_TAG}_universal", directory)
        if os.path.isfile(os.path.join(dst, ".complete")):
            continue
        shutil.rmtree(dst, ignore_errors=True)  # an earlier conversion that did not finish
        args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), checked_loads():
            ds_to_universal.main(args)
        open(os.path.join(dst, ".complete"), "w").close()
