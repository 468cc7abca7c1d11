"""Launch a stage on DeepSpeed workers through Ray Train (`dmvae-scale train CONFIG ... --address ...`).

    address None     start an embedded Ray on this machine (loopback only), stop it at the end
    address "auto"   join the Ray cluster this machine belongs to
    address "ray://HOST:10001" or "HOST:6379"   a remote cluster
A `TorchTrainer` starts `distributed.num_workers` workers (gloo on CPU, NCCL on GPU), each running
`worker.run_worker`. Failure handling: a worker that dies makes Ray Train restart the worker group (up to
`max_failures` times); every restarted worker resumes from the run directory's latest complete checkpoint, which our
manifest decides (checkpoint.py). The driver refuses up front a run directory whose checkpoints mean something else
than the config, and forwards SIGTERM/SIGINT to the workers, which checkpoint and stop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..config import RunConfig, dump_yaml
from ..data import storage
from ..errors import UserError
from . import checkpoint as ckpt
from .worker import WorkerJob, WorkerResult, import_wandb, ray_train_loop, upstream_latents


class TrainingStoppedError(UserError):
    """The run stopped itself (non-finite losses, a refused resume): retrying would not help."""


@dataclass
class TrainResult:
    status: str
    message: str
    images_seen: int
    steps: int
    skipped_steps: int
    checkpoint: str
    artifact: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def line(self) -> str:
        last = self.history[-1] if self.history else {}
        loss = ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items())
                         if k not in ("images", "images_per_second", "skipped_steps", "mfu"))
        rate = last.get("images_per_second")
        return (f"train {self.status}: {self.images_seen} images, {self.steps} steps in {self.seconds:.0f} s"
                f"{f' ({rate:.1f} img/s at the end)' if rate else ''}; {self.skipped_steps} non-finite steps skipped"
                f"{'; ' + loss if loss else ''}; checkpoint {self.checkpoint or '-'}"
                f"{'; artifact ' + self.artifact if self.artifact else ''}")


# ----------------------------------------------------------------------------------------------------------------------
# Driver-side preparation
# ----------------------------------------------------------------------------------------------------------------------

def _absolute(path: Optional[str]) -> Optional[str]:
    if path is None or storage.is_remote(path) or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def absolutize(cfg: RunConfig) -> RunConfig:
    """Workers do not share the driver's working directory: resolve every relative local path now."""
    cfg = dataclasses.replace(cfg)
    cfg.run_dir = _absolute(cfg.run_dir)
    cfg.inputs = dataclasses.replace(cfg.inputs, tokenizer=_absolute(cfg.inputs.tokenizer),
                                     reference=_absolute(cfg.inputs.reference),
                                     generator=_absolute(cfg.inputs.generator))
    cfg.reference = dataclasses.replace(cfg.reference, path=_absolute(cfg.reference.path))
    cfg.loss = dataclasses.replace(cfg.loss, perceptual_weights=_absolute(cfg.loss.perceptual_weights))
    enc = dataclasses.replace(cfg.tokenizer.encoder, weights=_absolute(cfg.tokenizer.encoder.weights))
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, encoder=enc)
    if os.path.exists(cfg.data.source):
        cfg.data = dataclasses.replace(cfg.data, source=os.path.abspath(cfg.data.source))
    if cfg.data.latents is not None:
        cfg.data = dataclasses.replace(cfg.data, latents=_absolute(cfg.data.latents))
    return cfg


def check_run_dir(cfg: RunConfig) -> Optional[ckpt.CheckpointInfo]:
    """Refuse before any worker starts when the latest checkpoint means something else (config keys and upstream
    latent statistics here; parameter shapes again in the workers, which build the models)."""
    latest = ckpt.CheckpointStore(cfg.run_dir, keep=cfg.keep_checkpoints).latest()
    if latest is None:
        return None
    current = ckpt.meaning_of(cfg, upstream_latents(cfg))
    saved = {k: v for k, v in latest.meaning.items() if not k.startswith("model.")}
    ckpt.check_resume(saved, current, f"checkpoint {latest.url}")
    ckpt.check_zero_stage(latest.zero_stage, cfg.distributed.zero_stage, f"checkpoint {latest.url}")
    return latest


def _save_resolved_config(cfg: RunConfig) -> None:
    storage.write_bytes(storage.join(cfg.run_dir, "config.yaml"), dump_yaml(cfg).encode())


# ----------------------------------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------------------------------

def connect(address: Optional[str], num_cpus: int) -> bool:
    """Connect this driver to Ray; returns True when we started an embedded instance (and must shut it down)."""
    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None and os.environ.get("RAY_ADDRESS"):  # inside a Ray job: its cluster
        address = "auto"
    if address is None:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                 log_to_driver=True, configure_logging=False)
        return True
    ray.init(address=address, log_to_driver=True)
    return False


def _control_actor():
    import ray

    @ray.remote(num_cpus=0)
    class RunControl:
        """A stop flag the workers poll (every few steps): set by the driver on SIGTERM/SIGINT."""

        def __init__(self):
            self.stop = False

        def request_stop(self) -> None:
            self.stop = True

        def stop_requested(self) -> bool:
            return self.stop

    return RunControl.remote()


def _root_cause(exc: BaseException) -> str:
    """The workers' own exception line out of Ray Train's wrapped error text (which leads with a generic header)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", ln)
              and "WorkerGroupError" not in ln and "TrainingFailedError" not in ln]
    return causes[-1] if causes else (lines[0] if lines and lines[0] else type(exc).__name__)


def _teacher_for(cfg: RunConfig, stage_factory: Optional[Callable], address: Optional[str]):
    """teacher.remote: the driver starts (or joins) the TeacherService before the workers and stops it after them;
    the driver, not a worker, owns it because an actor dies with its creator. The workers connect by name."""
    if not cfg.teacher.remote or stage_factory is not None:
        return contextlib.nullcontext()
    from ..distributed.teacher_service import options_from_config, teacher_service
    from .stages import stage_teacher_spec
    spec = stage_teacher_spec(cfg)  # refuses teacher.remote for a stage without a frozen encoder
    return teacher_service(spec, options_from_config(cfg, spec=spec), address=address)


def train(cfg: RunConfig, *, address: Optional[str] = None, max_failures: int = 2,
          stage_factory: Optional[Callable] = None, dataset_factory: Optional[Callable] = None,
          shard_frozen_above_bytes: Optional[int] = None, cpus_per_worker: float = 1.0) -> TrainResult:
    """Train cfg.stage on cfg.distributed.num_workers Ray Train workers; resume automatically from cfg.run_dir."""
    import ray
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    began = time.perf_counter()
    cfg = absolutize(cfg)
    address = address if address is not None else cfg.distributed.address
    dcfg = cfg.distributed
    check_run_dir(cfg)
    wandb_project = os.environ.get("WANDB_PROJECT") or None
    if wandb_project:
        import_wandb()  # fail here, not in every worker
    _save_resolved_config(cfg)
    started = connect(address, num_cpus=max(os.cpu_count() or 1, int(dcfg.num_workers * cpus_per_worker + 0.999)))
    previous = {}
    try:
        control = _control_actor()

        def forward_stop(signum, frame):
            print(f"received signal {signum}: asking the workers to checkpoint and stop", flush=True)
            control.request_stop.remote()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, forward_stop)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        job = WorkerJob(cfg, stage_factory=stage_factory, dataset_factory=dataset_factory,
                        shard_frozen_above_bytes=shard_frozen_above_bytes, control=control,
                        wandb_project=wandb_project)
        resources = {"CPU": cpus_per_worker}
        if dcfg.use_gpu:
            resources["GPU"] = 1
        ray_storage = storage.join(cfg.run_dir, "ray") if not storage.is_remote(cfg.run_dir) else \
            os.path.join(ckpt.CheckpointStore(cfg.run_dir).cache_dir, "ray")
        trainer = TorchTrainer(
            ray_train_loop, train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=dcfg.num_workers, use_gpu=dcfg.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if dcfg.use_gpu else "gloo"),
            run_config=RayRunConfig(name=f"{cfg.name}-{int(time.time())}", storage_path=ray_storage,
                                    failure_config=FailureConfig(max_failures=max_failures)))
        try:
            with _teacher_for(cfg, stage_factory, address):
                result = trainer.fit()
        except Exception as exc:  # TrainingFailedError after the retries: name the workers' error and the run dir
            raise TrainingStoppedError(
                f"training failed after {max_failures} restarts ({_root_cause(exc)}); "
                f"the latest complete checkpoint in {cfg.run_dir} is kept; rerun to resume from it") from exc
        out: WorkerResult = result.return_value
        if out is None:
            raise TrainingStoppedError(f"the workers returned no result (Ray Train error: {result.error})")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            ray.shutdown()
    res = TrainResult(out.status, out.message, out.images_seen, out.steps, out.skipped_steps, out.checkpoint,
                      out.artifact, time.perf_counter() - began, out.history)
    if out.status in ("diverged", "refused"):
        raise TrainingStoppedError(out.message)
    print(res.line(), flush=True)
    return res
