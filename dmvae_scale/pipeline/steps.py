"""What each kind of step does, one function per kind with one signature: `run(ctx, step) -> one summary line`.
Every output goes under the store (pipe.url(step.name)); local files (samples being drawn, evaluation scratch) under
ctx.work, kept across reruns so a partly done step resumes.

The heavy steps (shards, cache_latents, sample, eval, eval_tokenizer, probe) run where resources.resources_of says:
launcher ray sends their work to Ray tasks or actors on the worker nodes (the driver plans, waits and writes small
files: merged indexes, inputs.json, metrics.json, placement.json naming the nodes the work ran on); launcher local runs
it in this process, as before. Both write the same outputs (tests/test_pipeline_cluster.py)."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..log import say
from ..data import storage
from .resources import Resources, ray_call, ray_map, resources_of
from .spec import LAYOUT, Pipeline, PipelineError, Step, real_set
from .state import current_artifact, inputs_now

PLACEMENT_FILE = "placement.json"  # beside a step's output: where its work ran (Ray node ids)
REAL_STATS_DIR = ".real"  # under the store's eval/: real-image FID statistics shared by the eval steps on workers


@dataclass
class StepContext:
    """What every step runner gets besides its step: the pipeline, the local scratch directory and the Ray address
    (None: the job's cluster inside a Ray job, else an embedded one)."""

    pipe: Pipeline
    work: Path
    address: Optional[str] = None


def put_files(local: Path, url: str, files: list[str]) -> None:
    """Copy the named files of a local directory into the store (missing ones are skipped)."""
    for name in files:
        src = local / name
        if src.is_file():
            storage.write_bytes(storage.join(url, name), src.read_bytes())


def fetch_files(url: str, names: list[str], local: Path) -> Path:
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        (local / name).write_bytes(storage.read_bytes(storage.join(url, name)))
    return local


def finish_eval(ctx: StepContext, step: Step, made_from: Optional[str], metrics: dict,
                out: Optional[Path] = None) -> None:
    """An evaluation step's outputs: what it was made from, its files (out/), then metrics.json, written last because
    its presence marks the step complete."""
    url = ctx.pipe.url(step.name)
    storage.write_bytes(storage.join(url, "inputs.json"), json.dumps({"made_from": made_from}).encode())
    if out is not None:
        put_files(out, url, sorted(p.name for p in out.iterdir() if p.is_file()))
    storage.write_bytes(storage.join(url, "metrics.json"), json.dumps(metrics, indent=2, default=str).encode())


def placement(ctx: StepContext, step: Step) -> Resources:
    return resources_of(step, ctx.pipe.launcher, ctx.address)


@contextlib.contextmanager
def on_workers(ctx: StepContext, step: Step, res: Resources) -> Iterator[list]:
    """A Ray connection for the step's work (the job's cluster, --address, or an embedded head); yields the list the
    work appends its node ids to, written to placement.json beside the output at the end."""
    import ray

    from ..distributed.ray_session import ray_session
    nodes: list[str] = []
    with ray_session(ctx.address, num_cpus=max(1, math.ceil(res.cpus * res.workers)), log_to_driver=False):
        say("pipeline", f"step {step.name}: {res.describe(step.kind)}")
        yield nodes
        record = {"step": step.name, "where": "ray", "nodes": sorted(set(nodes)),
                  "driver_node": ray.get_runtime_context().get_node_id()}
        storage.write_bytes(storage.join(ctx.pipe.url(step.name), PLACEMENT_FILE), json.dumps(record).encode())


def work_device(res: Resources) -> str:
    """The device a Ray task of the step computes on: the GPU it was granted, else its CPUs."""
    return "cuda" if res.gpus else "cpu"


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------

def run_shards(ctx: StepContext, step: Step) -> str:
    """Each part of the conversion is one Ray task (launcher ray; at most `workers` at once) or a process of a local
    pool; the driver lists the source, plans the parts and merges their indexes (data/shards.py)."""
    from ..data.shards import DEFAULT_PART_SIZE, write_shards
    s, res = step.spec, placement(ctx, step)
    write = functools.partial(write_shards, str(s.get("source", "fashion-mnist")), ctx.pipe.url(step.name),
                              split=str(s.get("split", "train")), limit=s.get("limit"), workers=res.workers,
                              part_size=int(s.get("part_size", DEFAULT_PART_SIZE)),
                              image_size=s.get("image_size"))
    if res.where == "local":
        return write().line()
    with on_workers(ctx, step, res) as nodes:
        return write(progress=False, run_parts=lambda fn, args: ray_map(step, res, fn, args, nodes)).line()


def run_cache_latents(ctx: StepContext, step: Step) -> str:
    """The whole cache is encoded by one Ray task on a worker (its GPU when the step asks for one), not split into
    ranges: the cache's shard boundaries (one writer's size limit over the whole sequence) and its measured
    statistics (the mean over its batches) are what a cache written in one process holds, byte for byte, so a cache
    made on the cluster equals one made locally and the generator trained on it is the same."""
    from ..data.latents import cache_latents
    s, pipe, res = step.spec, ctx.pipe, placement(ctx, step)
    args = (pipe.url(s["data"]), pipe.url(step.name), pipe.artifact_url(s["tokenizer"]))
    encode = functools.partial(cache_latents, weights=str(s.get("weights", "ema")),
                               batch_size=int(s.get("batch_size", 64)), workers=0, limit=s.get("limit"))
    if res.where == "local":
        return encode(*args).line()
    with on_workers(ctx, step, res) as nodes:
        summary = ray_call(step, res, functools.partial(encode, device=work_device(res), progress=False), *args,
                           nodes=nodes)
    return summary.line()


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------

def run_train(ctx: StepContext, step: Step) -> str:
    from ..train.launch import run_local, train
    cfg = ctx.pipe.train_config(step)
    if ctx.pipe.launcher_of(step, cfg, ctx.address) == "local":  # a stop raises TrainingStoppedError, as under Ray
        res = run_local(cfg, device="cuda" if cfg.distributed.use_gpu else "cpu", progress=False)
    else:
        res = train(cfg, address=ctx.address)
    if res.status != "done":
        raise PipelineError(f"step {step.name}: training ended '{res.status}' ({res.message}); rerun the pipeline "
                            f"to resume")
    return res.line()


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------------------------------

def run_sample(ctx: StepContext, step: Step) -> str:
    from ..eval.sample_run import run_sample as sample
    s, pipe = step.spec, ctx.pipe
    # Keyed by the generator's artifact id: a partly sampled set resumes only for the very same generator.
    made_by = current_artifact(pipe, s["generator"])
    local = ctx.work / "samples" / f"{step.name}-{made_by}"
    generator = pipe.artifact_url(s["generator"])
    if s.get("images") is not None:  # a point on a curve over training: the run's checkpoint at that many images
        from ..train.checkpoint.export import checkpoint_artifact
        generator = checkpoint_artifact(pipe.url(s["generator"]), int(s["images"]),
                                        str(ctx.work / "checkpoint_artifacts" / f"{made_by}-{int(s['images'])}"))
        say("pipeline", f"step {step.name}: sampling {s['generator']}'s checkpoint at {int(s['images'])} images")
    res = placement(ctx, step)
    draw = functools.partial(sample, generator, str(local), num_per_class=s.get("per_class"),
                             num_samples=s.get("num_samples"), batch_size=int(s.get("batch_size", 50)),
                             workers=res.workers, overrides=list(s.get("overrides", [])), address=ctx.address)
    if res.where == "local":
        npz = draw(use_ray=False)
    else:  # sampling actors on the workers; the driver writes their images into the set
        with on_workers(ctx, step, res) as nodes:
            npz = draw(use_ray=True, gpus_per_worker=res.gpus, cpus_per_worker=res.cpus, nodes=nodes)
    put_files(local, pipe.url(step.name), ["sampling.json", "grid.png", Path(npz).name])
    return f"samples -> {pipe.url(step.name)}"


def real_stats_url(pipe) -> str:
    """Where the store keeps the real-image statistics every eval and eval_tokenizer step shares (eval/.real/)."""
    return storage.join(pipe.store, LAYOUT["eval"], REAL_STATS_DIR)


def _real_stats_shared(real, stats_url: str, local: Path, device: str) -> Path:
    """On a worker: the real images' FID statistics from the store's shared copy, else computed here and put there
    (every eval step naming the same set, on whatever node, reuses them)."""
    from ..eval.score import real_statistics
    name = f"{real.key()}.npz"
    path = local / "_real" / name
    if storage.exists(storage.join(stats_url, name)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(storage.join(stats_url, name)))
        return path
    path = real_statistics(real, local / "_real", device=device)
    storage.write_bytes(storage.join(stats_url, name), path.read_bytes())
    return path


def score_on_worker(real, stats_url: str, samples_url: str, classifier_url: Optional[str], out_url: str,
                    device: str) -> dict:
    """An eval step's work as one Ray task: real statistics, the samples' Inception features and scores, the
    classifier's accuracy; its report files go to out_url, its metrics back to the driver."""
    from ..eval.score import score_samples
    from ..eval.sources import SAMPLES_FILE, SAMPLING_SETTINGS_FILE
    with tempfile.TemporaryDirectory(prefix="dmvae-eval-") as tmp:
        local = Path(tmp)
        stats = _real_stats_shared(real, stats_url, local, device)
        fetch_files(samples_url, [SAMPLES_FILE, SAMPLING_SETTINGS_FILE], local)
        classifier = None if classifier_url is None else fetch_files(
            classifier_url, ["classifier.safetensors", "classifier.json"], local / "classifier")
        metrics = score_samples(local / SAMPLES_FILE, stats, local / "out", classifier=classifier, real=real,
                                device=device)
        put_files(local / "out", out_url, sorted(p.name for p in (local / "out").iterdir() if p.is_file()))
    return metrics


def run_eval(ctx: StepContext, step: Step) -> str:
    """gFID of a sample step's images against real images (statistics shared by every eval step that names the
    same set), and the evaluator classifier's accuracy on them when the step names one. Launcher ray: all of it in
    one Ray task on a worker (score_on_worker)."""
    from ..eval.score import RealImages, score_samples
    from ..eval.sources import SAMPLES_FILE, SAMPLING_SETTINGS_FILE
    s, pipe, res = step.spec, ctx.pipe, placement(ctx, step)
    real = RealImages(*real_set(step))
    stats_url = real_stats_url(pipe)
    made_from = inputs_now(pipe, step)
    if res.where == "ray":
        with on_workers(ctx, step, res) as nodes:
            metrics = ray_call(step, res, score_on_worker, real, stats_url, pipe.url(s["samples"]),
                               pipe.url(s["classifier"]) if "classifier" in s else None, pipe.url(step.name),
                               work_device(res), nodes=nodes)
            metrics["tags"] = dict(s.get("tags") or {})
            finish_eval(ctx, step, made_from, metrics)
        return f"FID {metrics['fid']:.2f}"
    local = ctx.work / "eval" / step.name
    local.mkdir(parents=True, exist_ok=True)
    stats = _real_stats_shared(real, stats_url, ctx.work / "eval", None)
    samples = local / SAMPLES_FILE
    samples.write_bytes(storage.read_bytes(storage.join(pipe.url(s["samples"]), SAMPLES_FILE)))
    # beside it, how they were drawn: the FID's protocol (sampler, steps, CFG, shift, labels, dtype) comes from it
    (local / SAMPLING_SETTINGS_FILE).write_bytes(storage.read_bytes(storage.join(pipe.url(s["samples"]),
                                                                                 SAMPLING_SETTINGS_FILE)))
    classifier = None
    if "classifier" in s:
        classifier = fetch_files(pipe.url(s["classifier"]), ["classifier.safetensors", "classifier.json"],
                                 local / "classifier")
    metrics = score_samples(samples, stats, local / "out", classifier=classifier, real=real)
    metrics["tags"] = dict(s.get("tags") or {})
    finish_eval(ctx, step, made_from, metrics, local / "out")
    return f"FID {metrics['fid']:.2f}"


def stats_on_worker(real, stats_url: str, device: Optional[str]) -> dict:
    """A real_stats step's work (one Ray task, or in the driver): the statistics into the store's shared copy;
    returns what they are."""
    import numpy as np
    with tempfile.TemporaryDirectory(prefix="dmvae-real-") as tmp:
        with np.load(_real_stats_shared(real, stats_url, Path(tmp), device)) as npz:
            n = int(npz["num_images"])
    return {"real": real.key(), "num_images": n, "stats": storage.join(stats_url, f"{real.key()}.npz")}


def run_real_stats(ctx: StepContext, step: Step) -> str:
    """The real images' FID statistics, computed once into the store's shared copy (eval/.real/) before the eval
    steps that name this step in `real_stats` start: without it, eval steps running at once would each compute the
    same statistics (2,000 Fashion-MNIST images are ~5 minutes of one CPU core's Inception)."""
    from ..eval.score import RealImages
    pipe, res = ctx.pipe, placement(ctx, step)
    real = RealImages(*real_set(step))
    stats_url = real_stats_url(pipe)
    made_from = inputs_now(pipe, step)
    if res.where == "ray":
        with on_workers(ctx, step, res) as nodes:
            summary = ray_call(step, res, stats_on_worker, real, stats_url, work_device(res), nodes=nodes)
            finish_eval(ctx, step, made_from, summary)
    else:
        summary = stats_on_worker(real, stats_url, None)
        finish_eval(ctx, step, made_from, summary)
    return f"FID statistics of {real.key()} -> {summary['stats']}"


def classifier_on_worker(source: str, split: str, limit, test_split: str, test_limit, epochs: int, seed: int,
                         out_url: str, step_name: str) -> str:
    """A classifier step's work (one Ray task, or in the driver): train the evaluator classifier on real images,
    its files to out_url (the json last: it marks the step's output complete); returns its report line."""
    from ..eval.classifier import save_classifier, train_classifier
    from ..eval.sources import open_image_set

    def load(split, limit):
        images = open_image_set(source, split, None, limit)
        if images.labels is None:
            raise PipelineError(f"step {step_name}: {images.description} has no class labels to train on")
        return images.array(), images.labels[:images.total]

    train_x, train_y = load(split, limit)
    test_x, test_y = load(test_split, test_limit)
    model, report = train_classifier(train_x, train_y, test_x, test_y, epochs=epochs, seed=seed)
    with tempfile.TemporaryDirectory(prefix="dmvae-classifier-") as tmp:
        save_classifier(model, report, Path(tmp))
        put_files(Path(tmp), out_url, ["classifier.safetensors", "classifier.json"])
    return report.line()


def run_classifier(ctx: StepContext, step: Step) -> str:
    """The evaluator classifier, trained on real images only (launcher ray: one Ray task of `cpus` CPUs, so it takes
    a CPU of its own rather than running in the driver beside the workers)."""
    s, res = step.spec, placement(ctx, step)
    args = (str(s.get("source", "fashion-mnist")), str(s.get("split", "train")), s.get("limit"),
            str(s.get("test_split", "test")), s.get("test_limit"), int(s.get("epochs", 3)), int(s.get("seed", 0)),
            ctx.pipe.url(step.name), step.name)
    if res.where == "ray":
        with on_workers(ctx, step, res) as nodes:
            return ray_call(step, res, classifier_on_worker, *args, nodes=nodes)
    return classifier_on_worker(*args)


def eval_tokenizer_on_worker(tokenizer: str, source: str, out_url: str, split: str, limit, weights: str,
                             device: Optional[str], real=None, stats_url: Optional[str] = None) -> dict:
    """rFID/PSNR/SSIM of a tokenizer (eval/commands.eval_tokenizer) into a scratch folder whose files go to out_url;
    with `real` (a real_stats step's images), the originals' statistics come from the store's shared copy."""
    from ..eval.commands import eval_tokenizer
    from ..eval.evaluate import EvalOptions
    with tempfile.TemporaryDirectory(prefix="dmvae-eval-tok-") as tmp:
        out = Path(tmp) / "out"
        reference = None if real is None else str(_real_stats_shared(real, stats_url, Path(tmp), device))
        metrics = eval_tokenizer(tokenizer, source, str(out), split=split, limit=limit, weights=weights,
                                 device=device, opts=EvalOptions(allow_few_samples=True), reference=reference,
                                 reference_image_size=None if real is None else real.image_size)
        put_files(out, out_url, sorted(p.name for p in out.iterdir() if p.is_file()))
    return metrics


def run_eval_tokenizer(ctx: StepContext, step: Step) -> str:
    """A tokenizer's rFID, PSNR and SSIM on real images; with `real_stats`, the originals' Inception statistics are
    that step's (computed once for every tokenizer scored on the same images) rather than computed again here."""
    from ..eval.score import RealImages
    s, pipe, res = step.spec, ctx.pipe, placement(ctx, step)
    made_from = inputs_now(pipe, step)
    args = (pipe.artifact_url(s["tokenizer"]), str(s.get("source", "fashion-mnist")), pipe.url(step.name),
            str(s.get("split", "test")), s.get("limit"), str(s.get("weights", "ema")))
    shared = {}
    if "real_stats" in s:
        shared = {"real": RealImages(*real_set(pipe.step(s["real_stats"]))),
                  "stats_url": real_stats_url(pipe)}
    if res.where == "ray":
        with on_workers(ctx, step, res) as nodes:
            metrics = ray_call(step, res, functools.partial(eval_tokenizer_on_worker, **shared), *args,
                               work_device(res), nodes=nodes)
            metrics["tags"] = dict(s.get("tags") or {})
            finish_eval(ctx, step, made_from, metrics)
    else:
        metrics = eval_tokenizer_on_worker(*args, None, **shared)
        metrics["tags"] = dict(s.get("tags") or {})
        finish_eval(ctx, step, made_from, metrics)
    return f"rFID {metrics['rfid']:.2f}, PSNR {metrics['psnr']:.2f} dB"


def run_probe(ctx: StepContext, step: Step) -> str:
    """The teacher's quality bar: linear probes on its pooled features, a random network's and raw pixels."""
    from ..eval.ssl_probe import format_probe, probe_teacher
    s, pipe, res = step.spec, ctx.pipe, placement(ctx, step)
    made_from = inputs_now(pipe, step)
    probe = functools.partial(probe_teacher, pipe.artifact_url(s["teacher"]), train_images=int(s.get("limit", 10_000)),
                              weights=str(s.get("weights", "ema")), seed=int(s.get("seed", 0)),
                              test_images=None if s.get("test_limit") is None else int(s["test_limit"]))
    if res.where == "ray":
        with on_workers(ctx, step, res) as nodes:
            report = ray_call(step, res, functools.partial(probe, progress=False), nodes=nodes)
            say("pipeline", format_probe(report))
            finish_eval(ctx, step, made_from, {"probe": report, "teacher": s["teacher"]})
    else:
        report = probe()
        say("pipeline", format_probe(report))
        finish_eval(ctx, step, made_from, {"probe": report, "teacher": s["teacher"]})
    return f"SSL teacher vs raw pixels: {report['ssl_minus_pixels_points']:+.2f} points"


def run_report(ctx: StepContext, step: Step) -> str:
    from .report import write_pipeline_report
    return write_pipeline_report(ctx, step)


RUNNERS: dict[str, Callable[[StepContext, Step], str]] = {
    "shards": run_shards, "train": run_train, "cache_latents": run_cache_latents, "sample": run_sample,
    "eval": run_eval, "classifier": run_classifier, "eval_tokenizer": run_eval_tokenizer, "probe": run_probe,
    "real_stats": run_real_stats,
    "report": run_report,
}
