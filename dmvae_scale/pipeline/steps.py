"""What each kind of step does, one function per kind with one signature: `run(ctx, step) -> one summary line`.
Every output goes under the store (pipe.url(step.name)); local files (samples being drawn, evaluation scratch) under
ctx.work, kept across reruns so a partly done step resumes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..log import say
from ..data import storage
from .spec import Pipeline, PipelineError, Step
from .state import current_artifact, inputs_now


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


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------

def run_shards(ctx: StepContext, step: Step) -> str:
    from ..data.shards import write_shards
    s = step.spec
    summary = write_shards(str(s.get("source", "fashion-mnist")), ctx.pipe.url(step.name),
                           split=str(s.get("split", "train")), limit=s.get("limit"), workers=int(s.get("workers", 1)),
                           image_size=s.get("image_size"))
    return summary.line()


def run_cache_latents(ctx: StepContext, step: Step) -> str:
    from ..data.latents import cache_latents
    s, pipe = step.spec, ctx.pipe
    summary = cache_latents(pipe.url(s["data"]), pipe.url(step.name), pipe.artifact_url(s["tokenizer"]),
                            weights=str(s.get("weights", "ema")), batch_size=int(s.get("batch_size", 64)),
                            workers=0, limit=s.get("limit"))
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
    npz = sample(generator, str(local), num_per_class=s.get("per_class"), num_samples=s.get("num_samples"),
                 batch_size=int(s.get("batch_size", 50)), workers=int(s.get("workers", 1)),
                 overrides=list(s.get("overrides", [])), address=ctx.address)
    put_files(local, pipe.url(step.name), ["sampling.json", "grid.png", Path(npz).name])
    return f"samples -> {pipe.url(step.name)}"


def run_eval(ctx: StepContext, step: Step) -> str:
    """gFID of a sample step's images against real images (statistics shared by every eval step that names the
    same set), and the evaluator classifier's accuracy on them when the step names one."""
    from ..eval.score import RealImages, real_statistics, score_samples
    from ..eval.sources import SAMPLES_FILE, SAMPLING_SETTINGS_FILE
    s, pipe = step.spec, ctx.pipe
    local = ctx.work / "eval" / step.name
    local.mkdir(parents=True, exist_ok=True)
    real = RealImages(str(s.get("source", "fashion-mnist")), str(s.get("split", "test")), s.get("limit"),
                      s.get("image_size"))
    stats = real_statistics(real, ctx.work / "eval" / "_real")
    samples = local / SAMPLES_FILE
    samples.write_bytes(storage.read_bytes(storage.join(pipe.url(s["samples"]), SAMPLES_FILE)))
    # beside it, how they were drawn: the FID's protocol (sampler, steps, CFG, shift, labels, dtype) comes from it
    (local / SAMPLING_SETTINGS_FILE).write_bytes(storage.read_bytes(storage.join(pipe.url(s["samples"]),
                                                                                 SAMPLING_SETTINGS_FILE)))
    made_from = inputs_now(pipe, step)
    classifier = None
    if "classifier" in s:
        classifier = fetch_files(pipe.url(s["classifier"]), ["classifier.safetensors", "classifier.json"],
                                 local / "classifier")
    metrics = score_samples(samples, stats, local / "out", classifier=classifier)
    metrics["tags"] = dict(s.get("tags") or {})
    finish_eval(ctx, step, made_from, metrics, local / "out")
    return f"FID {metrics['fid']:.2f}"


def run_classifier(ctx: StepContext, step: Step) -> str:
    import numpy as np

    from ..eval.classifier import save_classifier, train_classifier
    from ..eval.sources import open_image_set
    s = step.spec
    source = str(s.get("source", "fashion-mnist"))

    def load(split, limit):
        images = open_image_set(source, split, None, limit)
        if images.labels is None:
            raise PipelineError(f"step {step.name}: {images.description} has no class labels to train on")
        return np.concatenate(list(images.batches(1024))), images.labels[:images.total]

    train_x, train_y = load(str(s.get("split", "train")), s.get("limit"))
    test_x, test_y = load(str(s.get("test_split", "test")), s.get("test_limit"))
    model, report = train_classifier(train_x, train_y, test_x, test_y, epochs=int(s.get("epochs", 3)),
                                     seed=int(s.get("seed", 0)))
    local = ctx.work / "eval" / step.name
    save_classifier(model, report, local)
    put_files(local, ctx.pipe.url(step.name), ["classifier.safetensors", "classifier.json"])  # json last: complete
    return report.line()


def run_eval_tokenizer(ctx: StepContext, step: Step) -> str:
    from ..eval.commands import eval_tokenizer
    from ..eval.evaluate import EvalOptions
    s, pipe = step.spec, ctx.pipe
    local = ctx.work / "eval" / step.name
    made_from = inputs_now(pipe, step)
    metrics = eval_tokenizer(pipe.artifact_url(s["tokenizer"]), str(s.get("source", "fashion-mnist")),
                             str(local / "out"), split=str(s.get("split", "test")), limit=s.get("limit"),
                             weights=str(s.get("weights", "ema")), opts=EvalOptions(allow_few_samples=True))
    metrics["tags"] = dict(s.get("tags") or {})
    finish_eval(ctx, step, made_from, metrics, local / "out")
    return f"rFID {metrics['rfid']:.2f}, PSNR {metrics['psnr']:.2f} dB"


def run_probe(ctx: StepContext, step: Step) -> str:
    """The teacher's quality bar: linear probes on its pooled features, a random network's and raw pixels."""
    from ..eval.ssl_probe import format_probe, probe_teacher
    s, pipe = step.spec, ctx.pipe
    made_from = inputs_now(pipe, step)
    report = probe_teacher(pipe.artifact_url(s["teacher"]), train_images=int(s.get("limit", 10_000)),
                           weights=str(s.get("weights", "ema")), seed=int(s.get("seed", 0)))
    say("pipeline", format_probe(report))
    finish_eval(ctx, step, made_from, {"probe": report, "teacher": s["teacher"]})
    return f"SSL teacher vs raw pixels: {report['ssl_minus_pixels_points']:+.2f} points"


def run_report(ctx: StepContext, step: Step) -> str:
    from .report import write_pipeline_report
    return write_pipeline_report(ctx, step)


RUNNERS: dict[str, Callable[[StepContext, Step], str]] = {
    "shards": run_shards, "train": run_train, "cache_latents": run_cache_latents, "sample": run_sample,
    "eval": run_eval, "classifier": run_classifier, "eval_tokenizer": run_eval_tokenizer, "probe": run_probe,
    "report": run_report,
}
