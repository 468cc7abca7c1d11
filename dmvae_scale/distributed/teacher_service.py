"""`TeacherService`: frozen teacher features for every training worker from one Ray actor (or a pool of replicas).

The service owns its resources (`num_gpus`, fractional allowed; `num_cpus=0` on small machines), gathers the requests
of all workers that arrive within a few milliseconds into one batch, and answers each with its rows. Images go in and
features come out through Ray's object store: the client puts a batch once (kept for retries) and reads the answer as
a zero-copy view of shared memory. The actor restarts on failure (`max_restarts`); a client whose request died with it
sends the same batch again, so a crash costs a retry, never a batch without its features.

A worker sees one interface whether the teacher is remote (`teacher.remote: true`) or in-process:

    source = open_feature_source(cfg, rank, spec=spec)  # TeacherClient or LocalFeatures
    for batch in source.attach(loader):                 # remote: asks for batch k+1 while batch k trains
        feats = batch["teacher_features"]               # (B, grid*grid, D), identical in both modes

(`spec`: the teacher equal to a stage's frozen encoder, train.stages.stage_teacher_spec; `teacher_service(spec)`
starts or joins the service for the duration of a block and stops only what it started.)

Both compute with `Teacher.encode` (fixed-shape chunks), which is what makes the results identical bit for bit.
"""
from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from ..batch_keys import FEATURES_KEY
from ..config import RunConfig
from .teachers import DTYPES, Teacher, TeacherSpec, build_teacher, encoder_teacher, spec_from_config

log = logging.getLogger(__name__)

_READONLY_WARNING = "The given NumPy array is not writable"


class TeacherUnavailableError(RuntimeError):
    """The teacher service did not answer a batch after every retry: the run stops rather than train without it."""


@dataclass(frozen=True)
class ServiceOptions:
    name: str = "dmvae-teacher"
    namespace: Optional[str] = None  # None: the job's own namespace (its driver and workers share it)
    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    max_restarts: int = 4
    max_batch_images: int = 0  # 0: four chunks
    max_wait_ms: float = 2.0  # how long a lone request waits for others to share its batch
    threads: int = 0  # torch intra-op threads in the actor; 0: max(1, num_cpus)


def service_name(spec: TeacherSpec) -> str:
    """A name per teacher: runs that need the same features share one service, others never collide."""
    return f"dmvae-teacher-{spec.key()}"


def options_from_config(cfg: RunConfig, name: Optional[str] = None,
                        spec: Optional[TeacherSpec] = None) -> ServiceOptions:
    """Service options from cfg.teacher; named after `spec` when given (else `name`, else dmvae-teacher)."""
    t = cfg.teacher
    name = name or (service_name(spec) if spec is not None else "dmvae-teacher")
    return ServiceOptions(name=name, replicas=t.replicas, num_gpus=t.num_gpus, num_cpus=t.num_cpus)


# ----------------------------------------------------------------------------------------------------------------------
# Wire format: numpy arrays (Ray stores them without pickling and reads them back zero-copy)
# ----------------------------------------------------------------------------------------------------------------------

def _to_wire(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # the object store's buffers are read-only; features are never written to
        warnings.filterwarnings("ignore", message=_READONLY_WARNING)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


# ----------------------------------------------------------------------------------------------------------------------
# The actor
# ----------------------------------------------------------------------------------------------------------------------

class TeacherActor:
    """One replica. Async: requests queue on the event loop; the network runs on one executor thread."""

    def __init__(self, spec: TeacherSpec, max_batch_images: int, max_wait_ms: float, threads: int):
        import ray
        torch.set_num_threads(threads)
        warnings.filterwarnings("ignore", message=_READONLY_WARNING)
        self.spec = spec
        self.teacher: Teacher = build_teacher(spec)
        self.max_batch = max_batch_images or 4 * spec.chunk
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue: deque = deque()
        self.queued_images = 0
        self.arrived: Optional[asyncio.Event] = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="teacher")
        self.latencies: deque = deque(maxlen=20000)
        self.counts = {"requests": 0, "batches": 0, "images": 0}
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    async def features(self, images: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.arrived is None:  # the event loop exists only once a call runs
            self.arrived = asyncio.Event()
            loop.create_task(self._serve())
        done = loop.create_future()
        self.queue.append((images, done, time.perf_counter()))
        self.queued_images += len(images)
        self.arrived.set()
        return await done

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            if self.queued_images < self.max_batch and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)  # let the other workers' requests join this batch
            taken, n = [], 0
            while self.queue and (not taken or n + len(self.queue[0][0]) <= self.max_batch):
                item = self.queue.popleft()
                taken.append(item)
                n += len(item[0])
            self.queued_images -= n
            if not self.queue:
                self.arrived.clear()
            try:
                x = taken[0][0] if len(taken) == 1 else np.concatenate([item[0] for item in taken])
                out = await loop.run_in_executor(self.executor, self._encode, x)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller, the service stays up
                for _, done, _ in taken:
                    if not done.done():
                        done.set_exception(exc)
                continue
            offset, now = 0, time.perf_counter()
            for images, done, t0 in taken:
                if not done.done():
                    done.set_result(out[offset:offset + len(images)])
                offset += len(images)
                self.latencies.append(now - t0)
            self.counts["requests"] += len(taken)
            self.counts["batches"] += 1
            self.counts["images"] += n

    def _encode(self, images: np.ndarray) -> np.ndarray:
        return _to_wire(self.teacher.encode(torch.from_numpy(images)))

    async def info(self) -> dict[str, Any]:
        import os
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"spec_key": self.spec.key(), "pid": os.getpid(), "restarted": self.restarted,
                "feature_dim": self.teacher.feature_dim, **self.counts,
                "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99))}


# ----------------------------------------------------------------------------------------------------------------------
# Starting, finding and stopping the service
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class TeacherPool:
    """The handle workers use: the replicas' actor handles and the spec they serve. Picklable."""

    spec: TeacherSpec
    options: ServiceOptions
    handles: list = field(default_factory=list)

    def info(self, timeout_s: float = 60.0) -> list[dict]:
        import ray
        return ray.get([h.info.remote() for h in self.handles], timeout=timeout_s)


def _replica_name(options: ServiceOptions, i: int) -> str:
    return f"{options.name}-{i}"


def _check_identity(pool: TeacherPool, timeout_s: float) -> None:
    for i, info in enumerate(pool.info(timeout_s)):
        if info["spec_key"] != pool.spec.key():
            raise RuntimeError(f"teacher service '{_replica_name(pool.options, i)}' already runs another teacher "
                               f"(spec {info['spec_key']}, this run needs {pool.spec.key()}); stop it or pick "
                               f"another service name")


def start_teacher_service(spec: TeacherSpec, options: ServiceOptions = ServiceOptions(),
                          ready_timeout_s: float = 600.0) -> TeacherPool:
    """Start the replicas (or join those already running under the same names) and wait until they serve.

    Call it from the job's driver: an actor dies with its owner, so the driver, not a worker, must own it.
    """
    import ray
    threads = options.threads or max(1, int(options.num_cpus))
    actor = ray.remote(TeacherActor)
    handles = [actor.options(name=_replica_name(options, i), namespace=options.namespace, get_if_exists=True,
                             max_restarts=options.max_restarts, max_task_retries=0, num_cpus=options.num_cpus,
                             num_gpus=options.num_gpus, max_concurrency=1000)
               .remote(spec, options.max_batch_images, options.max_wait_ms, threads)
               for i in range(options.replicas)]
    pool = TeacherPool(spec, options, handles)
    _check_identity(pool, ready_timeout_s)
    return pool


def connect_teacher_service(spec: TeacherSpec, options: ServiceOptions = ServiceOptions(),
                            wait_s: float = 120.0) -> TeacherPool:
    """Find a running service by name (workers do this), waiting for the driver to have started it."""
    import ray
    deadline = time.monotonic() + wait_s
    handles = []
    for i in range(options.replicas):
        while True:
            try:
                handles.append(ray.get_actor(_replica_name(options, i), namespace=options.namespace))
                break
            except ValueError:  # not (yet) registered
                if time.monotonic() > deadline:
                    raise TeacherUnavailableError(
                        f"no teacher service '{_replica_name(options, i)}' after {wait_s:.0f} s; the driver starts "
                        f"it with start_teacher_service() when teacher.remote is true") from None
                time.sleep(0.5)
    pool = TeacherPool(spec, options, handles)
    _check_identity(pool, wait_s)
    return pool


def stop_teacher_service(pool: TeacherPool) -> None:
    import ray
    for h in pool.handles:
        ray.kill(h, no_restart=True)


def _running(options: ServiceOptions) -> bool:
    import ray
    try:
        ray.get_actor(_replica_name(options, 0), namespace=options.namespace)
        return True
    except ValueError:
        return False


@contextmanager
def teacher_service(spec: TeacherSpec, options: ServiceOptions = ServiceOptions(), address: Optional[str] = None,
                    ready_timeout_s: float = 600.0) -> Iterator[TeacherPool]:
    """The service for `spec` for the duration of a block: joined when it already runs under options.name, else
    started here. On exit it stops only what it started: the actors, and the Ray connection when this process was
    not connected yet (then it connects to `address`: None means RAY_ADDRESS or a Ray started in this process)."""
    from .ray_session import ray_session
    # A fixed namespace for a connection of our own: another run on the same cluster finds (and shares) the
    # service by name.
    with ray_session(address, namespace="dmvae-scale", log_to_driver=False):
        joined = _running(options)
        pool = start_teacher_service(spec, options, ready_timeout_s)
        log.info("teacher service '%s' %s", options.name, "joined" if joined else "started")
        try:
            yield pool
        finally:
            if not joined:
                stop_teacher_service(pool)


# ----------------------------------------------------------------------------------------------------------------------
# Feature sources: the remote client and the in-process teacher, one interface
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class _Pending:
    images_ref: Any  # the batch in the object store, kept so a retry sends it again without a new copy
    replica: int
    ref: Any
    sent: float


class TeacherClient:
    """A worker's connection to the service: submit / result with retries, and `attach` with prefetch."""

    def __init__(self, pool: TeacherPool, rank: int = 0, max_retries: int = 8, retry_wait_s: float = 0.5,
                 timeout_s: float = 300.0):
        self.pool, self.rank = pool, rank
        self.max_retries, self.retry_wait_s, self.timeout_s = max_retries, retry_wait_s, timeout_s
        self.dtype = DTYPES[pool.spec.dtype]
        self._next = rank
        self.requests = 0
        self.retries = 0
        self.wait_s = 0.0  # time the worker spent blocked on features (what prefetch hides)
        self.latencies: list[float] = []  # submit -> features in hand, per request

    def _send(self, images_ref, replica: int):
        return self.pool.handles[replica].features.remote(images_ref)

    def submit(self, images: torch.Tensor) -> _Pending:
        import ray
        arr = images.detach().to("cpu", torch.float32).contiguous().numpy()
        replica = self._next % len(self.pool.handles)
        self._next += 1
        images_ref = ray.put(arr)
        self.requests += 1
        return _Pending(images_ref, replica, self._send(images_ref, replica), time.perf_counter())

    def result(self, pending: _Pending) -> torch.Tensor:
        """The features of a submitted batch; re-sends the batch when the replica died or restarted meanwhile."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError
        t0 = time.perf_counter()
        attempt = 0
        while True:
            try:
                arr = ray.get(pending.ref, timeout=self.timeout_s)
                break
            except (RayActorError, GetTimeoutError) as exc:
                attempt += 1
                self.retries += 1
                if attempt > self.max_retries:
                    raise TeacherUnavailableError(
                        f"teacher service '{self.pool.options.name}' failed {attempt} times for one batch "
                        f"({type(exc).__name__}); stopping instead of training without features") from exc
                log.warning("teacher replica %d failed (%s); retry %d/%d for this batch", pending.replica,
                            type(exc).__name__, attempt, self.max_retries)
                time.sleep(min(self.retry_wait_s * 2 ** (attempt - 1), 10.0))
                pending.replica = (pending.replica + 1) % len(self.pool.handles)
                pending.ref = self._send(pending.images_ref, pending.replica)
        now = time.perf_counter()
        self.wait_s += now - t0
        self.latencies.append(now - pending.sent)
        return _from_wire(arr, self.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.result(self.submit(images))

    def attach(self, batches: Iterable[dict], key: str = "image", out_key: str = FEATURES_KEY,
               depth: int = 1) -> Iterator[dict]:
        """Yield each batch with its features under `out_key`, keeping `depth` later batches in flight."""
        window: deque = deque()
        for batch in batches:
            window.append((batch, self.submit(batch[key])))
            if len(window) > depth:
                ready, pending = window.popleft()
                ready[out_key] = self.result(pending)
                yield ready
        while window:
            ready, pending = window.popleft()
            ready[out_key] = self.result(pending)
            yield ready

    def stats(self) -> dict[str, float]:
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"requests": self.requests, "retries": self.retries, "wait_s": self.wait_s,
                "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99))}


class LocalFeatures:
    """The in-process teacher behind the same interface."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.encode(images)

    def attach(self, batches: Iterable[dict], key: str = "image", out_key: str = FEATURES_KEY,
               depth: int = 1) -> Iterator[dict]:
        for batch in batches:
            batch[out_key] = self.teacher.encode(batch[key])
            yield batch


def open_feature_source(cfg: RunConfig, rank: int = 0, start: bool = False,
                        options: Optional[ServiceOptions] = None, spec: Optional[TeacherSpec] = None,
                        network: Optional[torch.nn.Module] = None) -> TeacherClient | LocalFeatures:
    """The feature source a run's config asks for: the remote service (teacher.remote) or the in-process teacher.

    `spec`: the teacher (default: the one cfg.teacher names); `network`: in-process, use this module (a stage's own
    frozen encoder, equal to the spec's network) instead of building a second copy. `start=True` starts the service
    when it is not running (the driver, or a single-process run); workers connect. The service is named after the
    spec unless `options` say otherwise.
    """
    spec = spec or spec_from_config(cfg)
    if not cfg.teacher.remote:
        return LocalFeatures(encoder_teacher(spec, network) if network is not None else build_teacher(spec))
    options = options or options_from_config(cfg, spec=spec)
    pool = start_teacher_service(spec, options) if start else connect_teacher_service(spec, options)
    return TeacherClient(pool, rank)
