"""`dmvae-scale sample`: a generator artifact's samples spread over Ray workers (or this process), resumable.

The driver checks everything it can without weights (artifacts, tokenizer id, settings against an existing output),
then hands fixed batches to workers; each worker loads the generator and tokenizer once and returns uint8 images,
which the driver writes as PNGs (workers need no shared filesystem). Finally samples.npz and grid.png are written.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..log import progress as show_progress, say
from dmvae_scale.config import load_config
from dmvae_scale.data.artifact_store import artifact_info, open_artifact
from dmvae_scale.distributed.placement import largest_nodes, node_fits
from dmvae_scale.errors import UserError

from .report import save_grid
from .sampling import (LABEL_SAMPLING, LatentImageSampler, SamplingPlan, assemble_npz, pending_batches, png_path,
                       prepare_output, record_precision, write_pngs)


def _sampler_overrides(overrides: Sequence[str]) -> list[str]:
    bad = [o for o in overrides if not o.startswith("sampler.")]
    if bad:
        raise UserError(f"sample: only sampler.* settings can be overridden (the model is the artifact's), got {bad}")
    return list(overrides)


def plan_for(generator: str | Path, num_per_class: Optional[int], num_samples: Optional[int], batch_size: int,
             overrides: Sequence[str] = (), weights: str = "ema", tokenizer: Optional[str] = None
             ) -> tuple[SamplingPlan, str]:
    """The sampling plan from the generator artifact's config (+ sampler overrides), and its tokenizer's location.
    Checks the manifests (and fetches a remote generator into the node's cache, where its workers find it)."""
    path = str(generator)
    artifact = open_artifact(path)  # local, or its manifest and files fetched once into the node's cache
    info = artifact.info
    if "generator" not in info.models or info.latent is None:
        raise UserError(f"{path}: a '{info.stage}' artifact (models {info.models}); `sample` needs a generator-stage "
                        f"artifact")
    cfg = load_config(artifact.directory / "config.yaml", _sampler_overrides(overrides))
    tok = str(tokenizer) if tokenizer else cfg.inputs.tokenizer
    if tok is None:
        raise UserError(f"{path}: its config names no inputs.tokenizer; pass the tokenizer artifact (--tokenizer)")
    found, expected = artifact_info(tok).id, info.upstream.get("tokenizer")
    if expected and found != expected:
        raise UserError(f"tokenizer artifact {tok} is {found}, but generator {path} was trained on the latents of "
                        f"{expected}; pass that tokenizer (--tokenizer)")
    classes = cfg.score.num_classes
    if num_samples is None:
        num_samples = (50 if num_per_class is None else num_per_class) * classes
    elif num_per_class is not None:
        raise UserError("sample: give either --per-class or --num-samples, not both")
    s = cfg.sampler
    plan = SamplingPlan(num_samples, classes, batch_size, s.seed, s.method, s.steps, float(s.cfg_scale),
                        list(s.guidance_interval) if s.guidance_interval else None, info.id, weights,
                        time_shift=float(s.time_shift))
    return plan, tok


def build_sampler(generator: str, tokenizer: str, weights: str, plan: SamplingPlan,
                  device: str | torch.device) -> LatentImageSampler:
    from .artifact_models import load_generator

    bundle = load_generator(generator, weights, tokenizer)
    if bundle.info.id != plan.generator:
        raise UserError(f"{generator} changed since sampling started (now {bundle.info.id}, was {plan.generator})")
    dit, tok = bundle.generator.to(device), bundle.tokenizer.to(device)
    return LatentImageSampler(dit, tok.decode, bundle.latent, plan, dit.null_label, device)


class _SamplerActor:
    """One Ray worker: loads the models once, then turns batch numbers into images."""

    def __init__(self, generator: str, tokenizer: str, weights: str, plan: dict, use_gpu: bool):
        if use_gpu and not torch.cuda.is_available():  # never a silent CPU run on a GPU request
            raise UserError("a sampling worker was granted a GPU by Ray but torch sees no CUDA device here "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); check the node's "
                            "driver and torch build, or sample with --gpus-per-worker 0")
        from ..distributed.placement import threads_as_reserved
        threads_as_reserved()
        device = "cuda" if use_gpu else "cpu"
        self.sampler = build_sampler(generator, tokenizer, weights, SamplingPlan(**plan), device)

    def batch(self, batch: int):
        return self.sampler.batch(batch)

    def precision(self) -> str:
        return self.sampler.precision

    def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()


def gpus_for_workers(requested: Optional[float], cluster_gpus: float) -> float:
    """GPUs per sampling worker, decided from the CLUSTER's resources (a CPU laptop submitting to a GPU cluster must
    still get GPU actors): one each when the cluster has GPUs and none was asked for; a request the cluster cannot
    meet is an error, never a silent CPU run."""
    if requested is None:
        return 1.0 if cluster_gpus >= 1 else 0.0
    if requested < 0:
        raise UserError(f"--gpus-per-worker: must be >= 0, got {requested}")
    if requested > 0 and cluster_gpus < requested:
        raise UserError(f"--gpus-per-worker {requested}: the Ray cluster has {cluster_gpus:g} GPUs; use "
                        f"--gpus-per-worker 0 to sample on CPUs, or a cluster with GPUs")
    return float(requested)


def _run_ray(args: tuple, pending: list[int], workers: int, gpus_per_worker: Optional[float],
             address: Optional[str], on_result, cpus_per_worker: float = 1.0,
             nodes: Optional[list] = None) -> set[str]:
    import ray
    from ray.exceptions import RayTaskError

    from ..distributed.ray_session import ray_session
    actors = []
    with ray_session(address, num_cpus=max(1, workers), log_to_driver=False), contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [ray.kill(actor) for actor in actors])
        gpus_per_worker = gpus_for_workers(gpus_per_worker, float(ray.cluster_resources().get("GPU", 0.0)))
        say("sample", f"{min(workers, len(pending))} Ray workers, {gpus_per_worker:g} GPU each")
        if not node_fits(cpus_per_worker, gpus_per_worker):  # an actor no node holds would wait forever
            raise UserError(f"sample: {cpus_per_worker:g} CPU and {gpus_per_worker:g} GPU per sampling worker, but "
                            f"no node of the Ray cluster holds that (nodes: {largest_nodes()}); ask for less (the "
                            f"step's cpus / gpus)")
        actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_SamplerActor)
        actors = [actor_cls.remote(*args, gpus_per_worker > 0) for _ in range(min(workers, len(pending)))]
        queue, inflight = list(pending), {}
        for actor in actors:
            if queue:
                inflight[actor.batch.remote(queue.pop(0))] = actor
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(done[0])
            try:
                on_result(*ray.get(done[0]))
            except RayTaskError as exc:  # a worker's UserError (bad artifact, ...) reaches the user as itself
                cause = exc.as_instanceof_cause()
                raise (cause if isinstance(cause, UserError) else exc) from None
            if queue:
                inflight[actor.batch.remote(queue.pop(0))] = actor
        if nodes is not None:
            nodes.extend(ray.get([actor.node.remote() for actor in actors]))
        return set(ray.get([actor.precision.remote() for actor in actors]))  # the arithmetic they sampled in


def run_sample(generator: str, out: str, num_per_class: Optional[int] = None, num_samples: Optional[int] = None,
               batch_size: int = 64, workers: int = 1, overrides: Sequence[str] = (), tokenizer: Optional[str] = None,
               weights: str = "ema", use_ray: bool = True, address: Optional[str] = None,
               gpus_per_worker: Optional[float] = None, device: Optional[str] = None, progress: bool = True,
               cpus_per_worker: float = 1.0, nodes: Optional[list] = None) -> Path:
    """Sample (or finish sampling) into `out`; returns the path of samples.npz. With Ray, `nodes` (a list) gets the
    node id of each sampling actor."""
    started = time.perf_counter()
    plan, tok = plan_for(generator, num_per_class, num_samples, batch_size, overrides, weights, tokenizer)
    out_dir = prepare_output(out, plan, {"tokenizer": str(tok), "generator_path": str(generator),
                                         "label_sampling": LABEL_SAMPLING})
    pending = pending_batches(out_dir, plan)
    todo = sum(len(plan.batch_indices(b)) for b in pending)
    say("sample", f"{plan.num_samples} samples ({plan.num_classes} classes), {plan.method} {plan.steps} steps, "
                  f"CFG {plan.cfg_scale} interval {plan.guidance_interval}; {todo} to do in {len(pending)} batches")
    written = 0
    bar = show_progress(total=todo, desc="sample", unit="img", enabled=progress)

    def on_result(indices, images):
        nonlocal written
        written += write_pngs(out_dir, indices, images)
        bar.update(len(indices))

    if pending:
        args = (str(generator), str(tok), weights, asdict(plan))
        if use_ray:
            record_precision(out_dir, _run_ray(args, pending, workers, gpus_per_worker, address, on_result,
                                               cpus_per_worker, nodes))
        else:
            dev = torch.device(device if device not in (None, "auto") else
                               ("cuda" if torch.cuda.is_available() else "cpu"))
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise UserError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
            sampler = build_sampler(args[0], args[1], weights, plan, dev)
            for b in pending:
                on_result(*sampler.batch(b))
            record_precision(out_dir, {sampler.precision})
    bar.close()
    npz = assemble_npz(out_dir, plan)
    first = [np.asarray(Image.open(png_path(out_dir, i)).convert("RGB")) for i in range(min(64, plan.num_samples))]
    save_grid(np.stack(first), out_dir / "grid.png")
    elapsed = time.perf_counter() - started
    say("sample", f"wrote {written} new images ({plan.num_samples} total) in {elapsed:.1f} s "
                  f"({written / elapsed:.2f} img/s) -> {npz}")
    return npz
