"""Frozen-encoder features for a stage's batches (stages with a frozen tokenizer encoder).

`teacher.remote: false` computes them in this process with the stage's own encoder; `true` asks the TeacherService,
which the launcher starts (or joins, when one serving the same teacher runs on the cluster) before the workers and
stops after them (an actor dies with its creator), one batch ahead. Both compute in fixed-shape chunks with the same
weights, so the artifact is the same bit for bit (same device, dtype and thread count).
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from typing import Callable, Iterable, Iterator

import torch

from ..log import say
from ..config import RunConfig
from ..data.artifact_store import open_artifact
from ..data.latents import LatentSummary, cache_latents, resolve_device
from ..distributed.teacher_service import (LocalFeatures, ServiceOptions, TeacherClient, connect_teacher_service,
                                           options_from_config, service_name, teacher_service)
from ..distributed.teachers import build_teacher, encoder_teacher, tokenizer_encoder_spec

Attach = Callable[[Iterable[dict]], Iterator[dict]]


def _no_features(batches: Iterable[dict]) -> Iterator[dict]:
    yield from batches


def open_stage_features(stage, cfg: RunConfig, device: torch.device, stack: ExitStack, *, rank: int = 0,
                        share_encoder: bool = True) -> Attach:
    """How a run's batches get their frozen-encoder features: from the service (teacher.remote), in-process, or not
    at all (the stage has no frozen encoder). Returns `attach(batches) -> batches with "teacher_features"`.

    A worker connects to the service its launcher started (launch.teacher_for), by name.
    share_encoder: in-process, the stage's own encoder computes the features (no second copy); a DeepSpeed worker
    passes False (its engine may shard or cast that module) and gets a copy built from the spec, equal to the
    service's network.
    """
    spec = stage.teacher_spec
    if spec is None:
        return _no_features
    if cfg.teacher.remote:
        options = options_from_config(cfg, spec=spec)
        pool = connect_teacher_service(spec, options)
        return _remote_attach(TeacherClient(pool, rank), stack, report=rank == 0)
    # In-process on this run's device: the spec's device follows the run, not distributed.use_gpu.
    spec = dataclasses.replace(spec, device=str(device), dtype="bfloat16" if device.type == "cuda" else "float32")
    teacher = encoder_teacher(spec, stage.frozen_encoder) if share_encoder else build_teacher(spec)
    return LocalFeatures(teacher).attach


def _remote_attach(client: TeacherClient, stack: ExitStack, report: bool = True) -> Attach:
    if report:
        stack.callback(lambda: say("teacher", f"service: {client.requests} requests, {client.retries} retries, "
                                              f"{client.wait_s:.1f} s waiting for features"))
    return lambda batches: client.attach(batches, depth=1)


def cache_latents_with_teacher(src: str, dest: str, tokenizer_dir: str, *, remote: bool, weights: str = "ema",
                               batch_size: int = 64, device: str = "auto", options: ServiceOptions | None = None,
                               address: str | None = None, **kwargs) -> LatentSummary:
    """data.latents.cache_latents with the encoder's features from a teacher that is the artifact's frozen encoder:
    the TeacherService (`remote`; `options` default to one CPU-side replica named after the teacher) or the same
    network in this process. Both give the same latents, bit for bit. kwargs go to cache_latents."""
    artifact = open_artifact(tokenizer_dir)  # local or s3://
    info, artifact_cfg = artifact.info, artifact.config()
    # The features are computed where the teacher runs: the service's device, or this process's.
    on_gpu = (options is not None and options.num_gpus > 0) if remote else resolve_device(device).type == "cuda"
    # One chunk holds a batch and its mirrors: a fixed shape whatever the batch, so both sources agree.
    spec = dataclasses.replace(
        tokenizer_encoder_spec(artifact_cfg, tokenizer_dir, weights, info.content_hash), chunk=2 * batch_size,
        device="cuda" if on_gpu else "cpu", dtype="bfloat16" if on_gpu else "float32")
    with ExitStack() as stack:
        if remote:
            options = options or ServiceOptions(name=service_name(spec))
            attach = _remote_attach(TeacherClient(stack.enter_context(teacher_service(spec, options, address))), stack)
        else:
            attach = LocalFeatures(build_teacher(spec)).attach
        return cache_latents(src, dest, tokenizer_dir, weights=weights, batch_size=batch_size, device=device,
                             attach=attach, **kwargs)
