"""Where a pipeline's heavy steps run and with what: the data, latent-cache, sampling, classifier and evaluation steps
as Ray work on the cluster's worker nodes (launcher ray), or in the pipeline's own process (launcher local).

A step's resource fields (pipeline.yaml, or `STEP:cpus=4`):
    launcher   ray | local | auto (the pipeline's `launcher:` unless the step says; auto: ray when the pipeline was
               given an --address, else local, the rule one-worker train steps follow; a sample step's auto is ray)
    cpus       CPUs per Ray task or actor (default 1; more than 0, so the work never lands on a head offering none)
    gpus       GPUs per task or actor (default 0; sample: 1 where the cluster has GPUs, else 0)
    workers    how many tasks or actors at once (shards: parts written at once, also the local process pool's size;
               sample: sampling actors)

A request no node of the cluster can ever hold would wait forever in Ray's queue: while nothing that fits is alive
for FIT_WAIT_S (an autoscaler adds nodes within minutes), the step stops with one line saying so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from ..distributed.placement import FitWatch, largest_nodes
from ..errors import UserError
from .spec import Pipeline, PipelineError, Step

HEAVY = ("shards", "cache_latents", "sample", "eval", "eval_tokenizer", "probe", "real_stats", "classifier")
DEFAULT_WORKERS = {"shards": 1, "sample": 1}
FIT_WAIT_S = 600.0  # how long a request may find no alive node that holds it (autoscaling) before the step fails


@dataclass(frozen=True)
class Resources:
    where: str  # "ray" | "local"
    cpus: float
    gpus: Optional[float]  # None: sample's default (one GPU per actor where the cluster has GPUs)
    workers: int

    def describe(self, kind: str) -> str:
        if self.where == "local":
            what = {"shards": f"{self.workers} process(es)", "sample": "1 process"}.get(kind, "in-process")
            return f"driver (local): {what}"
        gpus = "1 GPU if the cluster has GPUs" if self.gpus is None else f"{self.gpus:g} GPU"
        unit = {"shards": "tasks", "sample": "actors"}.get(kind, "task")
        return f"ray workers: {self.workers} {unit} x {self.cpus:g} CPU, {gpus}"


def _number(step: Step, key: str, default: Any, least: float, integer: bool = False, strict: bool = False):
    value = step.spec.get(key, default)
    if value is None and key == "gpus":
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > least if strict else
                                                                             value >= least)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a whole number" if integer else "a number"
        bound = f"{'>' if strict else '>='} {least:g}"
        raise PipelineError(f"step {step.name}: {key}={value!r} must be {kind} {bound}; set e.g. "
                            f"{step.name}:{key}={default if default is not None else 1}")
    return int(value) if integer else float(value)


def check_resources(step: Step, pipeline_launcher: str) -> None:
    """The resource fields of a heavy step, refused with one line naming the field and the fix."""
    if step.kind in HEAVY:
        resources_of(step, pipeline_launcher, None)


def resources_of(step: Step, pipeline_launcher: str, address: Optional[str]) -> Resources:
    launcher = str(step.spec.get("launcher", pipeline_launcher))
    if launcher not in ("ray", "local", "auto"):
        raise PipelineError(f"step {step.name}: launcher {launcher!r} must be one of ray, local, auto")
    if launcher == "auto":  # sample: Ray actors, as it always ran; the rest: as a one-worker train step would
        where = "ray" if address is not None or step.kind == "sample" else "local"
    else:
        where = launcher
    cpus = _number(step, "cpus", 1, 0, strict=True)
    gpus = _number(step, "gpus", None if step.kind == "sample" else 0, 0)
    workers = _number(step, "workers", DEFAULT_WORKERS.get(step.kind, 1), 1, integer=True)
    return Resources(where, cpus, gpus, workers)


def describe(pipe: Pipeline, step: Step, address: Optional[str]) -> str:
    """Where `pipeline --check` says a step runs."""
    if step.kind in HEAVY:
        return resources_of(step, pipe.launcher, address).describe(step.kind)
    if step.kind == "train":
        cfg = pipe.train_config(step)
        if pipe.launcher_of(step, cfg, address) == "local":
            return "driver (local): 1 worker in-process"
        d = cfg.distributed
        workers = "-".join(map(str, d.num_workers)) if isinstance(d.num_workers, list) else d.num_workers
        return f"ray train: {workers} workers x {1 if d.use_gpu else 0} GPU"
    return "driver (local)"


# ----------------------------------------------------------------------------------------------------------------------
# Running on workers
# ----------------------------------------------------------------------------------------------------------------------

def _on_node(fn: Callable, args: tuple) -> tuple[Any, str]:
    """Runs on the worker: the function's result and the id of the node it ran on."""
    import ray
    from ..distributed.placement import threads_as_reserved
    threads_as_reserved()
    return fn(*args), ray.get_runtime_context().get_node_id()


def _unwrap(exc: Exception) -> Exception:
    from ray.exceptions import RayTaskError
    if isinstance(exc, RayTaskError):
        cause = exc.as_instanceof_cause()
        if isinstance(cause, UserError):
            return cause
    return exc


def ray_map(step: Step, res: Resources, fn: Callable, arg_tuples: Iterable[tuple],
            nodes: Optional[list] = None) -> Iterator[Any]:
    """fn(*args) for each args as Ray tasks (res.cpus, res.gpus each), at most res.workers at once; yields results as
    they finish and appends each task's node id to `nodes`. Needs a Ray connection (ray_session)."""
    import ray
    gpus = res.gpus or 0.0
    task = ray.remote(num_cpus=res.cpus, num_gpus=gpus, max_retries=0)(_on_node)
    queue, inflight = list(arg_tuples), []
    watch = FitWatch(res.cpus, gpus)
    try:
        while queue or inflight:
            while queue and len(inflight) < res.workers:
                inflight.append(task.remote(fn, queue.pop(0)))
            done, inflight = ray.wait(inflight, num_returns=1, timeout=2.0)
            if not done:
                if watch.unfit_for() >= FIT_WAIT_S:
                    raise PipelineError(
                        f"step {step.name}: asks for {res.cpus:g} CPU and {gpus:g} GPU per task, but no node of the "
                        f"Ray cluster holds that (nodes: {largest_nodes()}) after {FIT_WAIT_S:.0f} s; lower {step.name}:cpus / "
                        f"{step.name}:gpus or add larger worker nodes")
                continue
            try:
                result, node = ray.get(done[0])
            except Exception as exc:  # a worker's UserError reaches the user as itself
                raise _unwrap(exc) from None
            if nodes is not None:
                nodes.append(node)
            yield result
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)


def ray_call(step: Step, res: Resources, fn: Callable, *args, nodes: Optional[list] = None) -> Any:
    """fn(*args) as one Ray task on a worker (see ray_map)."""
    return list(ray_map(step, res, fn, [args], nodes))[0]
