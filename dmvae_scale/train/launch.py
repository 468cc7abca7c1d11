"""Launch a stage's workers: in this process (`run_local`, world size 1) or under Ray Train (`train`).

Both run the same `worker.run_worker` on DeepSpeed engines, with the same checkpoints, automatic resume, metrics,
precision, stop handling and data readers; the launcher only decides where the workers live. `train`:
    address None     start an embedded Ray on this machine (loopback only), stop it at the end
    address "auto"   join the Ray cluster this machine belongs to
    address "ray://HOST:10001" or "HOST:6379"   a remote cluster
A `TorchTrainer` starts `distributed.num_workers` workers (gloo on CPU, NCCL on GPU). Failure handling: a worker that
dies makes Ray Train restart the worker group (up to `distributed.max_failures` times); every restarted worker
resumes from the run directory's latest complete checkpoint, which our manifest decides (checkpoint.py). With
`num_workers: [min, max]` the group is elastic (Ray Train's `ScalingConfig(num_workers=(min, max))`): a restart
takes as many workers as the cluster has room for (at least min), and a running group is resized up when room
appears (checked every `distributed.resize_check_s`); either way the workers resume through the universal
checkpoint. A user error in a worker (a missing artifact, a refused resume) comes back as a result and fails at once, never retried. The
workers report metrics and a pointer to the latest checkpoint to Ray Train at every log interval. The driver refuses
up front a run directory whose checkpoints mean something else than the config, and forwards SIGTERM/SIGINT to the
workers, which checkpoint and stop; a run that ends before total_images raises, saying how to resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..log import say
from ..config import RunConfig, dump_yaml, is_elastic, require_inputs, worker_range
from ..data import storage
from ..distributed.ray_session import ray_session
from ..errors import UserError
from . import checkpoint as ckpt
from .api import WorkerJob, WorkerResult
from .collectives import single_process_env, stops_off_the_main_thread
from .reporting import import_wandb
from .watchdog import backend_timeout_s
from .worker import ray_train_loop, run_worker


class TrainingStoppedError(UserError):
    """The run stopped before total_images (non-finite losses, a refused resume, a user error in a worker, a stop
    request): retrying would not help; the message says what to do. `result`: the run's TrainResult, when it has
    one (status "stopped", "diverged", "refused" or "error")."""

    def __init__(self, message: str, result: "Optional[TrainResult]" = None):
        super().__init__(message)
        self.result = result


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
    reported: dict[str, Any] = field(default_factory=dict)  # Ray Train's Result.metrics (the last report)

    @property
    def final_metrics(self) -> dict[str, float]:
        """The losses of the last log interval."""
        last = self.history[-1] if self.history else {}
        return {k: v for k, v in last.items() if k not in ("images", "images_per_second", "skipped_steps", "mfu",
                                                            "tflops_per_worker")}

    @property
    def info(self):
        """The ArtifactInfo of the artifact this run wrote (None before one exists)."""
        from ..data.artifact_store import artifact_info
        return artifact_info(self.artifact) if self.artifact else None

    def line(self) -> str:
        last = self.history[-1] if self.history else {}
        loss = ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items())
                         if k not in ("images", "images_per_second", "skipped_steps", "mfu"))
        rate = last.get("images_per_second")
        return (f"train {self.status}: {self.images_seen} images, {self.steps} steps in {self.seconds:.0f} s"
                f"{f' ({rate:.1f} img/s at the end)' if rate else ''}; {self.skipped_steps} non-finite steps skipped"
                f"{'; ' + loss if loss else ''}; checkpoint {self.checkpoint or '-'}"
                f"{'; artifact ' + self.artifact if self.artifact else ''}")


# Where a run trains: ray = DeepSpeed workers under Ray Train (the given cluster, else an embedded loopback Ray);
# local = one worker in this process; auto = ray when the run has several workers or names a cluster, else local.
LAUNCHERS = ("ray", "local", "auto")


def choose_launcher(launcher: str, cfg: RunConfig, address: Optional[str] = None) -> str:
    """'ray' or 'local': the one rule the CLI's `train --launcher` and a pipeline's train steps follow."""
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher {launcher!r} must be one of {', '.join(LAUNCHERS)}")
    workers = cfg.distributed.num_workers
    _, most = worker_range(cfg)
    if launcher == "auto":
        return "ray" if most > 1 or address is not None or cfg.distributed.address is not None else "local"
    if launcher == "local" and most != 1:
        raise UserError(f"launcher local runs one worker in this process, but distributed.num_workers={workers}; "
                        f"use launcher ray or auto")
    return launcher


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
                                     real_score=_absolute(cfg.inputs.real_score),
                                     generator=_absolute(cfg.inputs.generator))
    cfg.reference = dataclasses.replace(cfg.reference, path=_absolute(cfg.reference.path))
    cfg.teacher = dataclasses.replace(cfg.teacher, artifact=_absolute(cfg.teacher.artifact))
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
    if latest is not None:
        ckpt.refuse_changed_meaning(latest, ckpt.meaning_of(cfg, ckpt.upstream_latents(cfg)),
                                    cfg.distributed.zero_stage, models=False)
    return latest


def _save_resolved_config(cfg: RunConfig) -> None:
    storage.write_bytes(storage.join(cfg.run_dir, "config.yaml"), dump_yaml(cfg).encode())


# ----------------------------------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------------------------------

def scaling_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """ScalingConfig's worker count: an int for a fixed group, (min, max) and the resize check for an elastic one."""
    low, high = worker_range(cfg)
    if not is_elastic(cfg):
        return {"num_workers": high}
    return {"num_workers": (low, high), "elastic_resize_monitor_interval_s": float(cfg.distributed.resize_check_s)}


def _on_this_node() -> dict[str, Any]:
    """Actor options that keep a run's helper on the driver's node: a worker node that goes away must not take it
    along (the restarted worker group looks it up; Ray Train's own controller is placed the same way)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}


def _control_actor():
    import ray

    @ray.remote(num_cpus=0)
    class RunControl:
        """What the workers poll every few steps: a stop (the driver's SIGTERM/SIGINT) and a preemption notice
        (given by whoever learns of one before Ray does, and by tests)."""

        def __init__(self):
            self.stop = False
            self.preempt = False

        def request_stop(self) -> None:
            self.stop = True

        def notify_preemption(self) -> None:
            self.preempt = True

        def requests(self) -> tuple[bool, bool]:
            return self.stop, self.preempt

    return RunControl.options(**_on_this_node()).remote()


@contextlib.contextmanager
def _forwarded_stop_signals():
    """SIGTERM / SIGINT call the functions appended to the yielded list (ask the workers to checkpoint and stop)
    instead of killing the driver; the previous handlers come back after the block. Off the main thread the caller
    handles signals."""
    calls: list[Callable[[], Any]] = []

    def forward_stop(signum, frame):
        say("train", f"received signal {signum}: asking the workers to checkpoint and stop")
        for call in calls:
            call()

    previous = {}
    off_main = contextlib.ExitStack()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward_stop)
    else:  # a pipeline step's thread: the pipeline's own handler reaches it through stop_runs_off_the_main_thread
        off_main.enter_context(stops_off_the_main_thread(calls))
    try:
        yield calls
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        off_main.close()


def _root_cause(exc: BaseException) -> str:
    """The workers' own exception line out of Ray Train's wrapped error text (which leads with a generic header)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", ln)
              and "WorkerGroupError" not in ln and "TrainingFailedError" not in ln]
    return causes[-1] if causes else (lines[0] if lines and lines[0] else type(exc).__name__)


def teacher_for(cfg: RunConfig, stage_factory: Optional[Callable], address: Optional[str]):
    """teacher.remote: the launcher starts (or joins) the TeacherService before the workers and stops it after them;
    the launcher, not a worker, owns it because an actor dies with its creator. The workers connect by name."""
    if not cfg.teacher.remote or stage_factory is not None:
        return contextlib.nullcontext()
    from ..distributed.teacher_service import options_from_config, teacher_service
    from .stages import stage_teacher_spec
    spec = stage_teacher_spec(cfg)  # refuses teacher.remote for a stage without a frozen encoder
    return teacher_service(spec, options_from_config(cfg, spec=spec), address=address)


def run_name(cfg: RunConfig) -> str:
    """The Ray Train run name: the same for every launch of one run directory (Ray's own restore finds it)."""
    import hashlib
    return f"{cfg.name}-{hashlib.sha256(cfg.run_dir.encode()).hexdigest()[:8]}"


def _ray_storage(cfg: RunConfig):
    """(storage_path, storage_filesystem) for Ray Train's own files: <run_dir>/ray on the run's storage (an object
    store through the same fsspec filesystem, so S3_ENDPOINT_URL and the credentials apply)."""
    url = storage.join(cfg.run_dir, "ray")
    if not storage.is_remote(url):
        return url, None
    import pyarrow.fs
    fs, root = storage.filesystem(url)
    return root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _prepare(cfg: RunConfig, stage_factory: Optional[Callable]) -> tuple[RunConfig, Optional[str]]:
    """Driver-side checks and files common to both launchers; returns (cfg with absolute paths, W&B project).
    A caller's own stage (stage_factory) reads what it needs; the inputs of `cfg.stage` are demanded otherwise."""
    cfg = absolutize(cfg)
    if stage_factory is None:
        require_inputs(cfg)
    check_run_dir(cfg)
    wandb_project = os.environ.get("WANDB_PROJECT") or None
    if wandb_project:
        import_wandb()  # fail here, not in every worker
    _save_resolved_config(cfg)
    return cfg, wandb_project


def _finish(out: WorkerResult, began: float, cfg: RunConfig, reported: Optional[dict] = None) -> TrainResult:
    res = TrainResult(out.status, out.message, out.images_seen, out.steps, out.skipped_steps, out.checkpoint,
                      out.artifact, time.perf_counter() - began, out.history, dict(reported or {}))
    if out.status != "done":
        raise TrainingStoppedError(out.message or f"the run ended at {out.images_seen} of total_images="
                                                  f"{cfg.total_images} images ({out.status}); run the same command "
                                                  f"again to resume", res)
    say("train", res.line())
    return res


def _local_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: the local launcher takes auto, cpu or cuda (pick a GPU with "
                        f"CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu or auto")
    return device


def run_local(cfg: RunConfig, device: str = "auto", progress: bool = True, *, stage_factory: Optional[Callable] = None,
              dataset_factory: Optional[Callable] = None) -> TrainResult:
    """Train cfg.stage in this process: the worker at world size 1 (DeepSpeed over gloo on loopback), resuming
    automatically from cfg.run_dir, writing checkpoints, metrics and the artifact there."""
    began = time.perf_counter()
    if worker_range(cfg)[1] != 1:
        raise UserError(f"distributed.num_workers={cfg.distributed.num_workers}: the local launcher runs one worker "
                        f"in this process; use --launcher ray (or set it to 1)")
    use_gpu = _local_device(device) == "cuda"
    cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, use_gpu=use_gpu))
    cfg, wandb_project = _prepare(cfg, stage_factory)
    job = WorkerJob(cfg, stage_factory=stage_factory, dataset_factory=dataset_factory, wandb_project=wandb_project,
                    progress=progress)
    with teacher_for(cfg, stage_factory, cfg.distributed.address), single_process_env():
        out = run_worker(job)
    return _finish(out, began, cfg)


def train(cfg: RunConfig, *, address: Optional[str] = None, stage_factory: Optional[Callable] = None,
          dataset_factory: Optional[Callable] = None, shard_frozen_above_bytes: Optional[int] = None,
          cpus_per_worker: Optional[float] = None, control_hook: Optional[Callable] = None) -> TrainResult:
    """Train cfg.stage on cfg.distributed.num_workers Ray Train workers; resume automatically from cfg.run_dir.
    control_hook(control_actor) is called once the run's control actor exists (tests send notices through it).
    cpus_per_worker: Ray's CPU reservation per worker (default distributed.cpus_per_worker)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    began = time.perf_counter()
    address = address if address is not None else cfg.distributed.address
    dcfg = cfg.distributed
    cpus_per_worker = float(dcfg.cpus_per_worker if cpus_per_worker is None else cpus_per_worker)
    cfg, wandb_project = _prepare(cfg, stage_factory)
    _, high = worker_range(cfg)
    num_cpus = max(os.cpu_count() or 1, int(high * cpus_per_worker + 0.999))
    with ray_session(address, num_cpus=num_cpus), _forwarded_stop_signals() as on_stop:
        control = _control_actor()
        if control_hook is not None:
            control_hook(control)
        on_stop.append(control.request_stop.remote)
        job = WorkerJob(cfg, stage_factory=stage_factory, dataset_factory=dataset_factory,
                        shard_frozen_above_bytes=shard_frozen_above_bytes, control=control,
                        wandb_project=wandb_project)
        resources = {"CPU": cpus_per_worker}
        if dcfg.use_gpu:
            resources["GPU"] = 1
        storage_path, storage_fs = _ray_storage(cfg)
        # Ray Train 2.x patches print() in its workers to log each line, and also prints it where sys.stdout is not
        # sys.__stdout__ (so in a Ray worker): every worker line reached the console twice. Ray forwards a worker's
        # plain stdout to the driver already; the driver's setting reaches the workers (Ray Train propagates it).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        trainer = TorchTrainer(
            ray_train_loop, train_loop_config={"job": job},
            scaling_config=ScalingConfig(**scaling_kwargs(cfg), use_gpu=dcfg.use_gpu,
                                         resources_per_worker=resources),
            # Ray Train creates the process group (DeepSpeed then reuses it): its timeout is ours (watchdog.py)
            torch_config=TorchConfig(backend="nccl" if dcfg.use_gpu else "gloo",
                                     timeout_s=int(backend_timeout_s(dcfg.timeout_s) + 0.999)),
            run_config=RayRunConfig(name=run_name(cfg), storage_path=storage_path, storage_filesystem=storage_fs,
                                    failure_config=FailureConfig(max_failures=dcfg.max_failures),
                                    checkpoint_config=CheckpointConfig(num_to_keep=2)))
        try:
            with teacher_for(cfg, stage_factory, address):
                result = trainer.fit()
        except Exception as exc:  # TrainingFailedError after the retries: name the workers' error and the run dir
            raise TrainingStoppedError(
                f"training failed after {dcfg.max_failures} restarts ({_root_cause(exc)}); "
                f"the latest complete checkpoint in {cfg.run_dir} is kept; rerun to resume from it") from exc
        out: WorkerResult = result.return_value
        if out is None:
            raise TrainingStoppedError(f"the workers returned no result (Ray Train error: {result.error})")
    return _finish(out, began, cfg, getattr(result, "metrics", None))
