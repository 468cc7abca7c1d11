"""`dmvae-scale pipeline CONFIG_DIR --store URL`: a whole recipe (shards, the stages, the latent cache, sampling and
evaluation) as one command, every output under one store (a local directory or s3://bucket/prefix).

CONFIG_DIR holds the stage configs and `pipeline.yaml`, an ordered list of named steps:

    steps:
      - {name: shards, kind: shards, source: fashion-mnist, split: train, limit: 2048}
      - {name: tokenizer, kind: train, config: tokenizer.yaml, data: shards}
      - {name: reference, kind: train, config: reference.yaml, data: shards, tokenizer: tokenizer}
      - {name: latents, kind: cache_latents, data: shards, tokenizer: decoder}
      - {name: generator, kind: train, config: generator.yaml, tokenizer: decoder, latents: latents}
      - {name: samples, kind: sample, generator: generator, per_class: 10}
      - {name: fid, kind: eval, samples: samples, source: fashion-mnist, split: test, limit: 500}

A step names the earlier steps it reads (data, latents, tokenizer, real_score, generator, samples); the store layout
is fixed: data/NAME (shards), runs/NAME (run directory; its artifact at runs/NAME/artifact), latents/NAME,
samples/NAME, eval/NAME. Overrides: `STEP:key=value` for one step (a train step's config keys, e.g.
`tokenizer:total_images=640`, or another step's fields, e.g. `samples:per_class=5`), `*:key=value` for every other
step that has that field (`*:per_class=2`, `*:launcher=ray`), `key=value` for every train step. `launcher:` (top
level, or a train step's field) says where a train step runs: ray (Ray Train workers, the default), local (one worker
in this process) or auto (local for one worker, else ray).
A sample step with `images: N` samples the generator run's checkpoint at N images seen (it must be kept) instead of its
final artifact: a point on a gFID-over-training curve.

Rerunning skips what is complete and resumes what is not: a train step whose artifact was made by this exact config
(the artifact manifest's config hash) from the current upstream artifacts is skipped; otherwise it runs, resuming from
the run directory's newest checkpoint. A step whose output was made from an older upstream is refused by name, never
silently reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, RunConfig, config_hash, load_config, read_yaml
from ..data import storage
from ..errors import UserError

PIPELINE_FILE = "pipeline.yaml"
LAYOUT = {"shards": "data", "train": "runs", "cache_latents": "latents", "sample": "samples", "eval": "eval",
          "classifier": "eval", "eval_tokenizer": "eval", "probe": "eval", "report": "report"}
# Which fields name an earlier step, and what kind that step must be.
REFERENCES = {"data": "shards", "latents": "cache_latents", "tokenizer": "train", "real_score": "train",
              "teacher": "train", "generator": "train", "samples": "sample", "classifier": "classifier"}
FIELDS = {"shards": {"source", "split", "limit", "workers"},
          "train": {"config", "data", "latents", "tokenizer", "real_score", "teacher", "launcher"},
          "cache_latents": {"data", "tokenizer", "weights", "batch_size", "limit"},
          "sample": {"generator", "per_class", "num_samples", "batch_size", "workers", "overrides", "images"},
          "eval": {"samples", "source", "split", "limit", "image_size", "classifier", "tags"},
          "classifier": {"source", "split", "limit", "test_split", "test_limit", "epochs", "seed"},
          "eval_tokenizer": {"tokenizer", "source", "split", "limit", "weights", "tags"},
          "probe": {"teacher", "limit", "weights", "seed"},
          "report": {"title", "group_by", "ours", "baseline"}}
# How a train step runs: ray = DeepSpeed workers under Ray Train (the given cluster, else an embedded loopback one);
# local = in the pipeline's own process (one worker); auto = local for a one-worker step, else ray.
LAUNCHERS = ("ray", "local", "auto")


class PipelineError(UserError):
    """pipeline.yaml, a step's reference, or a stale output: names the step and what would be right."""


@dataclass
class Step:
    name: str
    kind: str
    spec: dict[str, Any]


@dataclass
class StepReport:
    name: str
    kind: str
    status: str  # "done" | "skipped"
    seconds: float
    output: str
    detail: str = ""


@dataclass
class Pipeline:
    config_dir: Path
    store: str
    steps: list[Step]
    global_overrides: list[str] = field(default_factory=list)
    launcher: str = "ray"  # pipeline.yaml's `launcher:`; a train step's own `launcher` field wins

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def url(self, name: str) -> str:
        step = self.step(name)
        return storage.join(self.store, LAYOUT[step.kind], name)

    def artifact_url(self, name: str) -> str:
        return storage.join(self.url(name), "artifact")

    def train_config(self, step: Step) -> RunConfig:
        """The step's run config: its file, the pipeline's wiring (run_dir, data, inputs), then the overrides."""
        s = step.spec
        wiring = [f"run_dir={self.url(step.name)}", f"name={step.name}"]
        if "data" in s:
            wiring += [f"data.source={self.url(s['data'])}", "data.limit=null"]  # the shards step sets the size
        if "latents" in s:
            wiring.append(f"data.latents={self.url(s['latents'])}")
        if "tokenizer" in s:
            wiring.append(f"inputs.tokenizer={self.artifact_url(s['tokenizer'])}")
        if "teacher" in s:  # the `teacher` stage's network is this tokenizer's frozen encoder
            wiring += ["teacher.name=ssl", f"teacher.artifact={self.artifact_url(s['teacher'])}"]
        if "real_score" in s:
            wiring.append(f"inputs.real_score={self.artifact_url(s['real_score'])}")
        overrides = wiring + self.global_overrides + s.get("overrides", [])
        return load_config(self.config_dir / s["config"], overrides)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and checking (on the user's machine, before anything runs)
# ----------------------------------------------------------------------------------------------------------------------

def load_pipeline(config_dir: str | Path, store: str, overrides: list[str] = ()) -> Pipeline:
    config_dir = Path(config_dir)
    path = config_dir / PIPELINE_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: not found; a pipeline directory holds {PIPELINE_FILE} and the stage configs "
                            f"it names (see configs/demo/{PIPELINE_FILE})")
    doc = read_yaml(path)
    raw = doc.get("steps")
    launcher = str(doc.get("launcher", "ray"))
    if launcher not in LAUNCHERS:
        raise PipelineError(f"{path}: launcher {launcher!r} must be one of {', '.join(LAUNCHERS)}")
    if not isinstance(raw, list) or not raw:
        raise PipelineError(f"{path}: 'steps' must be a non-empty list of steps")
    steps: list[Step] = []
    for i, item in enumerate(raw):
        where = f"{path} step {i + 1}"
        if not isinstance(item, dict) or "name" not in item or "kind" not in item:
            raise PipelineError(f"{where}: each step is a mapping with 'name' and 'kind'")
        name, kind = str(item["name"]), str(item["kind"])
        if kind not in LAYOUT:
            raise PipelineError(f"{where} ({name}): kind {kind!r} is not one of {', '.join(LAYOUT)}")
        if any(s.name == name for s in steps) or not name.replace("_", "").replace("-", "").isalnum():
            raise PipelineError(f"{where}: step name {name!r} is taken by an earlier step or is not made of letters, "
                                f"digits, '-' and '_'; choose another")
        spec = {k: v for k, v in item.items() if k not in ("name", "kind")}
        unknown = sorted(set(spec) - FIELDS[kind] - {"overrides"})
        if unknown:
            raise PipelineError(f"{where} ({name}): unknown field(s) {unknown}; a {kind} step takes "
                                f"{sorted(FIELDS[kind])}")
        for ref, want in REFERENCES.items():
            if ref in spec:
                target = next((s for s in steps if s.name == spec[ref]), None)
                if target is None or target.kind != want:
                    raise PipelineError(f"{where} ({name}): {ref}={spec[ref]!r} must name an earlier {want} step")
        if kind == "train" and "config" not in spec:
            raise PipelineError(f"{where} ({name}): a train step needs 'config' (a YAML file in {config_dir})")
        spec.setdefault("overrides", [])
        steps.append(Step(name, kind, spec))
    pipe = Pipeline(config_dir, store.rstrip("/") if storage.is_remote(store) else os.path.abspath(store), steps,
                    launcher=launcher)
    for text in overrides:
        head, sep, rest = text.partition(":")
        if not sep or "=" in head:
            pipe.global_overrides.append(text)
            continue
        if head == "*":  # `*:key=value`: every step that has this setting (e.g. *:per_class=2, *:launcher=ray)
            from ..config import parse_override
            key, value = rest.split("=", 1) if "=" in rest else (rest, "")
            targets = [st for st in steps if key in FIELDS[st.kind] and key not in REFERENCES
                       and (st.kind != "train" or key == "launcher")]
            if not targets:
                raise PipelineError(f"override {text!r}: no step has a setting {key!r}")
            for st in targets:
                st.spec[key] = parse_override(f"x={value}")[1]
            continue
        if not any(s.name == head for s in steps):
            raise PipelineError(f"override {text!r}: no step named {head!r}; steps: {', '.join(s.name for s in steps)}")
        target = pipe.step(head)
        if target.kind == "train" and not rest.startswith("launcher="):  # the rest are the stage config's keys
            target.spec["overrides"].append(rest)
        else:
            from ..config import parse_override
            key, value = rest.split("=", 1) if "=" in rest else (rest, "")
            if key not in FIELDS[target.kind] or key in REFERENCES:
                raise PipelineError(f"override {text!r}: a {target.kind} step's settings are "
                                    f"{sorted(FIELDS[target.kind] - set(REFERENCES))}")
            target.spec[key] = parse_override(f"x={value}")[1]
    for step in steps:  # every stage config loads and validates here, before any resource is used
        if str(step.spec.get("launcher", launcher)) not in LAUNCHERS:
            raise PipelineError(f"step {step.name}: launcher {step.spec['launcher']!r} must be one of "
                                f"{', '.join(LAUNCHERS)}")
        if step.kind == "train":
            try:
                pipe.train_config(step)
            except ConfigError as exc:
                raise PipelineError(f"step {step.name} ({step.spec['config']}): {exc}") from None
    for step in steps:  # a checkpoint to sample from: one the generator's run will have written (and kept)
        if step.kind == "sample" and step.spec.get("images") is not None:
            gen = pipe.train_config(pipe.step(step.spec["generator"]))
            images = step.spec["images"]
            if not isinstance(images, int) or not 0 < images < gen.total_images or images % gen.ckpt_every_images:
                raise PipelineError(f"step {step.name}: images={images!r} must be a checkpoint of "
                                    f"{step.spec['generator']} before its end: a multiple of its ckpt_every_images="
                                    f"{gen.ckpt_every_images} below its total_images={gen.total_images}")
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# Completion checks
# ----------------------------------------------------------------------------------------------------------------------

def _json(url: str) -> Optional[dict]:
    try:
        return json.loads(storage.read_bytes(url))
    except storage.StorageError:
        return None
    except json.JSONDecodeError:
        raise PipelineError(f"{url}: not valid JSON; the output is damaged: delete its directory to redo the step") \
            from None


def artifact_id(manifest: dict) -> str:
    return f"{manifest['stage']}-{manifest['content_hash'][:12]}"


def _upstream_ids(pipe: Pipeline, step: Step) -> dict[str, str]:
    """role -> id of the current upstream artifacts a train step reads."""
    out = {}
    for role in ("tokenizer", "real_score", "teacher"):
        if role in step.spec:
            manifest = _json(storage.join(pipe.artifact_url(step.spec[role]), "artifact.json"))
            if manifest is None:
                raise PipelineError(f"step {step.name}: its {role} {pipe.artifact_url(step.spec[role])} is missing")
            out[role] = artifact_id(manifest)
    return out


def train_complete(pipe: Pipeline, step: Step, cfg: RunConfig) -> bool:
    from .launch import absolutize
    manifest = _json(storage.join(pipe.artifact_url(step.name), "artifact.json"))
    if manifest is None:
        return False
    recorded = set(manifest.get("upstream", {}).values())
    for role, now in _upstream_ids(pipe, step).items():
        if now not in recorded:
            raise PipelineError(f"step {step.name}: its artifact {pipe.artifact_url(step.name)} was trained on "
                                f"{sorted(recorded)}, but the pipeline's {role} is now {now}; delete "
                                f"{pipe.url(step.name)} to retrain it on the new one")
    return manifest.get("config_hash") == config_hash(absolutize(cfg))


def _current_artifact(pipe: Pipeline, step_name: str) -> Optional[str]:
    manifest = _json(storage.join(pipe.artifact_url(step_name), "artifact.json"))
    return artifact_id(manifest) if manifest is not None else None


def _derived_state(pipe: Pipeline, step: Step) -> tuple[Optional[str], Optional[str]]:
    """(the upstream id a derived output was made from, the upstream id now) for cache, sample and eval steps:
    such outputs are pure functions of their upstream, so a stale one is redone, never reused."""
    url, s = pipe.url(step.name), step.spec
    if step.kind == "cache_latents":
        meta = _json(storage.join(url, "latents.json"))
        made = meta.get("tokenizer") if meta and storage.exists(storage.join(url, "index.json")) else None
        return made, _current_artifact(pipe, s["tokenizer"])
    if step.kind == "sample":
        from ..eval.sources import SAMPLES_FILE
        meta = _json(storage.join(url, "sampling.json"))
        made = meta.get("generator") if meta and storage.exists(storage.join(url, SAMPLES_FILE)) else None
        return made, _current_artifact(pipe, s["generator"])
    if step.kind == "classifier":  # made from real images only: nothing upstream can make it stale
        return ("real" if storage.exists(storage.join(url, "classifier.json")) else None), "real"
    if step.kind == "report":  # cheap and made from everything before it: always written again
        return None, "everything"
    meta = _json(storage.join(url, "inputs.json"))
    made = meta.get("made_from") if meta and storage.exists(storage.join(url, "metrics.json")) else None
    return made, _inputs_now(pipe, step)


def _inputs_now(pipe: Pipeline, step: Step) -> Optional[str]:
    """What an evaluation is made from now: the sampled generator's id (and the classifier's run), or the
    tokenizer's artifact id."""
    s = step.spec
    if step.kind == "eval_tokenizer":
        return _current_artifact(pipe, s["tokenizer"])
    if step.kind == "probe":
        return _current_artifact(pipe, s["teacher"])
    samples = _json(storage.join(pipe.url(s["samples"]), "sampling.json"))
    if samples is None:
        return None
    if "classifier" in s:
        classifier = _json(storage.join(pipe.url(s["classifier"]), "classifier.json"))
        return f"{samples.get('generator')}+classifier-{(classifier or {}).get('seed')}"
    return samples.get("generator")


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------

def work_dir_for(store: str) -> Path:
    """Local scratch for steps whose tools write local files (samples, evaluation): one per store, kept across
    reruns so a partly sampled set resumes."""
    key = hashlib.sha256(store.encode()).hexdigest()[:12]
    base = Path(os.environ.get("DMVAE_CACHE", Path.home() / ".cache" / "dmvae-scale"))
    return base / "pipeline" / key


def _put_dir(local: Path, url: str, files: list[str]) -> None:
    for name in files:
        src = local / name
        if src.is_file():
            storage.write_bytes(storage.join(url, name), src.read_bytes())


def _run_shards(pipe: Pipeline, step: Step) -> str:
    from ..data.shards import write_shards
    s = step.spec
    summary = write_shards(str(s.get("source", "fashion-mnist")), pipe.url(step.name), split=str(s.get("split", "train")),
                           limit=s.get("limit"), workers=int(s.get("workers", 1)))
    return summary.line()


def step_launcher(pipe: Pipeline, step: Step, cfg: RunConfig) -> str:
    """'ray' or 'local' for a train step: its `launcher` field, else the pipeline's; auto = local for one worker."""
    launcher = str(step.spec.get("launcher", pipe.launcher))
    if launcher == "auto":
        return "local" if cfg.distributed.num_workers == 1 else "ray"
    if launcher == "local" and cfg.distributed.num_workers != 1:
        raise PipelineError(f"step {step.name}: launcher local runs one worker in the pipeline's process, but "
                            f"distributed.num_workers={cfg.distributed.num_workers}; use launcher ray or auto")
    return launcher


def _run_train(pipe: Pipeline, step: Step, cfg: RunConfig, address: Optional[str]) -> str:
    from .launch import run_local, train
    if step_launcher(pipe, step, cfg) == "local":  # a stopped run raises TrainingStoppedError, as under Ray
        res = run_local(cfg, device="cuda" if cfg.distributed.use_gpu else "cpu", progress=False)
    else:
        res = train(cfg, address=address)
    if res.status != "done":
        raise PipelineError(f"step {step.name}: training ended '{res.status}' ({res.message}); rerun the pipeline "
                            f"to resume")
    return res.line()


def _run_cache(pipe: Pipeline, step: Step) -> str:
    from ..data.latents import cache_latents
    s = step.spec
    summary = cache_latents(pipe.url(s["data"]), pipe.url(step.name), pipe.artifact_url(s["tokenizer"]),
                            weights=str(s.get("weights", "ema")), batch_size=int(s.get("batch_size", 64)),
                            workers=0, limit=s.get("limit"))
    return summary.line()


def _run_sample(pipe: Pipeline, step: Step, work: Path, address: Optional[str]) -> str:
    from ..eval.sample_run import run_sample
    s = step.spec
    # Keyed by the generator's artifact id: a partly sampled set resumes only for the very same generator.
    made_by = _current_artifact(pipe, s["generator"])
    local = work / "samples" / f"{step.name}-{made_by}"
    generator = pipe.artifact_url(s["generator"])
    if s.get("images") is not None:  # a point on a curve over training: the run's checkpoint at that many images
        from .export import checkpoint_artifact
        generator = checkpoint_artifact(pipe.url(s["generator"]), int(s["images"]),
                                        str(work / "checkpoint_artifacts" / f"{made_by}-{int(s['images'])}"))
        print(f"step {step.name}: sampling {s['generator']}'s checkpoint at {int(s['images'])} images", flush=True)
    npz = run_sample(generator, str(local), num_per_class=s.get("per_class"),
                     num_samples=s.get("num_samples"), batch_size=int(s.get("batch_size", 50)),
                     workers=int(s.get("workers", 1)), overrides=list(s.get("overrides", [])), address=address)
    _put_dir(local, pipe.url(step.name), ["sampling.json", "grid.png", Path(npz).name])
    return f"samples -> {pipe.url(step.name)}"


def _run_eval(pipe: Pipeline, step: Step, work: Path) -> str:
    from ..eval.commands import eval_ref, eval_samples
    from ..eval.evaluate import EvalOptions
    from ..eval.sources import SAMPLES_FILE
    s = step.spec
    local = work / "eval" / step.name
    local.mkdir(parents=True, exist_ok=True)
    opts = EvalOptions(allow_few_samples=True)
    # The real images' feature statistics: one file per reference set, shared by every eval step that names it
    # (Inception runs at ~12 img/s on 2 cores: 2,000 reference images cost ~3 minutes each time they are redone).
    source, split = str(s.get("source", "fashion-mnist")), str(s.get("split", "test"))
    ref = work / "eval" / "_reference" / f"{source.replace('/', '_')}-{split}-{s.get('limit')}-{s.get('image_size')}.npz"
    if not ref.is_file():
        ref.parent.mkdir(parents=True, exist_ok=True)
        partial = ref.with_name(ref.stem + ".partial.npz")  # renamed when whole: an interrupted one is redone
        eval_ref(source, str(partial), split=split, image_size=s.get("image_size"), limit=s.get("limit"), opts=opts)
        partial.replace(ref)
    samples = local / SAMPLES_FILE
    samples.write_bytes(storage.read_bytes(storage.join(pipe.url(s["samples"]), SAMPLES_FILE)))
    made_from = _inputs_now(pipe, step)
    metrics = eval_samples(str(samples), str(ref), str(local / "out"), opts=opts)
    if "classifier" in s:
        metrics.update(_classifier_accuracy(pipe, s["classifier"], samples, local))
    metrics["tags"] = dict(s.get("tags") or {})
    _finish_eval(pipe, step, made_from, metrics, local / "out")
    fid = metrics.get("fid") if isinstance(metrics, dict) else None
    return f"FID {fid:.2f}" if isinstance(fid, (int, float)) else "evaluated"


def _finish_eval(pipe: Pipeline, step: Step, made_from: Optional[str], metrics: dict,
                 out: Optional[Path] = None) -> None:
    """An evaluation step's outputs: what it was made from, its files (out/), then metrics.json, written last because
    its presence marks the step complete."""
    url = pipe.url(step.name)
    storage.write_bytes(storage.join(url, "inputs.json"), json.dumps({"made_from": made_from}).encode())
    if out is not None:
        _put_dir(out, url, sorted(p.name for p in out.iterdir() if p.is_file()))
    storage.write_bytes(storage.join(url, "metrics.json"), json.dumps(metrics, indent=2, default=str).encode())


def _fetch(url: str, names: list[str], local: Path) -> Path:
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        (local / name).write_bytes(storage.read_bytes(storage.join(url, name)))
    return local


def _classifier_accuracy(pipe: Pipeline, classifier_step: str, samples_npz: Path, local: Path) -> dict:
    import numpy as np

    from ..eval.classifier import accuracy, load_classifier
    model, info = load_classifier(_fetch(pipe.url(classifier_step), ["classifier.safetensors", "classifier.json"],
                                         local / "classifier"))
    with np.load(samples_npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    acc = accuracy(model, images, labels)
    print(f"evaluator classifier: {acc:.1%} of {len(images)} samples are classified as the class they were drawn "
          f"for (it scores {info['test_accuracy']:.1%} on real test images)", flush=True)
    return {"classifier_accuracy": acc, "classifier_real_test_accuracy": info["test_accuracy"]}


def _run_classifier(pipe: Pipeline, step: Step, work: Path) -> str:
    from ..eval.classifier import save_classifier, train_classifier
    from ..eval.sources import open_image_set
    s = step.spec
    source = str(s.get("source", "fashion-mnist"))

    def load(split, limit):
        import numpy as np
        images = open_image_set(source, split, None, limit)
        if images.labels is None:
            raise PipelineError(f"step {step.name}: {images.description} has no class labels to train on")
        return np.concatenate(list(images.batches(1024))), images.labels[:images.total]

    train_x, train_y = load(str(s.get("split", "train")), s.get("limit"))
    test_x, test_y = load(str(s.get("test_split", "test")), s.get("test_limit"))
    model, report = train_classifier(train_x, train_y, test_x, test_y, epochs=int(s.get("epochs", 3)),
                                     seed=int(s.get("seed", 0)))
    local = work / "eval" / step.name
    save_classifier(model, report, local)
    _put_dir(local, pipe.url(step.name), ["classifier.safetensors", "classifier.json"])  # json last: complete
    return report.line()


def _run_eval_tokenizer(pipe: Pipeline, step: Step, work: Path) -> str:
    from ..eval.commands import eval_tokenizer
    from ..eval.evaluate import EvalOptions
    s = step.spec
    local = work / "eval" / step.name
    made_from = _inputs_now(pipe, step)
    metrics = eval_tokenizer(pipe.artifact_url(s["tokenizer"]), str(s.get("source", "fashion-mnist")),
                             str(local / "out"), split=str(s.get("split", "test")), limit=s.get("limit"),
                             weights=str(s.get("weights", "ema")), opts=EvalOptions(allow_few_samples=True))
    metrics["tags"] = dict(s.get("tags") or {})
    _finish_eval(pipe, step, made_from, metrics, local / "out")
    return f"rFID {metrics['rfid']:.2f}, PSNR {metrics['psnr']:.2f} dB"


def _run_probe(pipe: Pipeline, step: Step) -> str:
    """The teacher's quality bar: linear probes on its pooled features, a random network's and raw pixels."""
    from ..eval.ssl_probe import format_probe, probe_teacher
    s = step.spec
    made_from = _inputs_now(pipe, step)
    report = probe_teacher(pipe.artifact_url(s["teacher"]), train_images=int(s.get("limit", 10_000)),
                           weights=str(s.get("weights", "ema")), seed=int(s.get("seed", 0)))
    print(format_probe(report), flush=True)
    _finish_eval(pipe, step, made_from, {"probe": report, "teacher": s["teacher"]})
    return f"SSL teacher vs raw pixels: {report['ssl_minus_pixels_points']:+.2f} points"


def _metrics_curve(run_url: str, key: str) -> list[tuple[float, float]]:
    try:
        text = storage.read_bytes(storage.join(run_url, "metrics.jsonl")).decode()
    except storage.StorageError:
        return []
    points = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            if key in row:
                points[float(row["images"])] = float(row[key])  # a resumed run's rows replace the same images
    return sorted(points.items())


def _run_report(pipe: Pipeline, step: Step, work: Path) -> str:
    from ..eval.study_report import write_study_report
    s = step.spec
    local = work / "report" / step.name
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    rows, tokenizers, grids = [], [], {}
    curves: dict[str, dict[str, list]] = {"generator fm_loss": {}, "tokenizer l1": {}}
    settings: dict[str, Any] = {"store": pipe.store, "overrides": " ".join(pipe.global_overrides) or "-"}
    probes, points = [], []
    for ev in pipe.steps:
        metrics = _json(storage.join(pipe.url(ev.name), "metrics.json")) \
            if ev.kind in ("eval", "eval_tokenizer", "probe") else None
        if metrics is None:
            continue
        if ev.kind == "probe":
            probes.append({"teacher": metrics["teacher"], **metrics["probe"]})
            continue
        tags = metrics.get("tags", {})
        if ev.kind == "eval_tokenizer":
            tok = ev.spec["tokenizer"]
            tokenizers.append({"name": tok, **tags, "rfid": metrics.get("rfid"), "psnr": metrics.get("psnr"),
                               "ssim": metrics.get("ssim"), "images": metrics.get("num_images")})
            curves["tokenizer l1"][tok] = _metrics_curve(pipe.url(tok), "l1")
            continue
        sample_step = pipe.step(ev.spec["samples"])
        gen = sample_step.spec["generator"]
        cfg = pipe.train_config(pipe.step(gen))
        if sample_step.spec.get("images") is not None:  # an earlier checkpoint: a point on the gFID-vs-images curve
            points.append({"name": gen, **tags, "images": int(sample_step.spec["images"]),
                           "total_images": cfg.total_images, "fid": metrics.get("fid"),
                           "classifier_accuracy": metrics.get("classifier_accuracy")})
            continue
        points.append({"name": gen, **tags, "images": cfg.total_images, "total_images": cfg.total_images,
                       "fid": metrics.get("fid"), "classifier_accuracy": metrics.get("classifier_accuracy")})
        curve = _metrics_curve(pipe.url(gen), "fm_loss")
        curves["generator fm_loss"][gen] = curve
        rows.append({"name": gen, **tags, "samples": metrics.get("num_samples"), "fid": metrics.get("fid"),
                     "classifier_accuracy": metrics.get("classifier_accuracy"),
                     "final_loss": curve[-1][1] if curve else None})
        settings[f"{gen}"] = (f"DiT depth {cfg.score.depth} width {cfg.score.hidden_size} patch {cfg.score.patch_size},"
                              f" {cfg.total_images} images, batch {cfg.batch_size}, lr {cfg.optim.lr}, seed {cfg.seed},"
                              f" latents {cfg.data.latents}")
        settings[f"{ev.name} sampler"] = json.dumps({k: v for k, v in (_json(storage.join(
            pipe.url(sample_step.name), "sampling.json")) or {}).items() if k in ("method", "steps", "cfg_scale",
                                                                                  "guidance_interval", "num_samples")})
        grid = local / f"grid-{gen}.png"
        try:
            grid.write_bytes(storage.read_bytes(storage.join(pipe.url(sample_step.name), "grid.png")))
            grids[gen] = grid
        except storage.StorageError:
            pass
    report = write_study_report(local, title=str(s.get("title", "dmvae-scale study")), rows=rows,
                                tokenizers=tokenizers, curves=curves, grids=grids, settings=settings,
                                group_by=str(s.get("group_by", "latent_space")), ours=str(s.get("ours", "dmvae")),
                                baseline=str(s.get("baseline", "kl_vae")), probes=probes, points=points)
    _put_dir(local, pipe.url(step.name), sorted(p.name for p in local.iterdir() if p.is_file()))
    met = ", ".join(f"{t['target']}: {'met' if t['met'] else 'MISSED'} ({t['measured']})" for t in report["targets"])
    return f"report {pipe.url(step.name)}/report.html" + (f"; {met}" if met else "")


def step_complete(pipe: Pipeline, step: Step, cfg: Optional[RunConfig], clean: bool = True) -> bool:
    """Complete and current. With `clean`, a derived output (cache, samples, evaluation) made from an older upstream
    is removed here, so the step runs again."""
    url = pipe.url(step.name)
    if step.kind == "shards":
        return storage.exists(storage.join(url, "index.json"))
    if step.kind == "train":
        return train_complete(pipe, step, cfg)
    made, now = _derived_state(pipe, step)
    if made is not None and made == now:
        return True
    if clean and (made is not None or storage.exists(url)):
        print(f"step {step.name}: {url} was made from {made or 'an unfinished run'}, the upstream is now {now}: "
              f"redoing it", flush=True)
        storage.remove(url)
        local = work_dir_for(pipe.store) / LAYOUT[step.kind] / step.name
        shutil.rmtree(local, ignore_errors=True)
    return False


def run_pipeline(pipe: Pipeline, *, address: Optional[str] = None, work_dir: Optional[str] = None,
                 only: Optional[list[str]] = None) -> list[StepReport]:
    """Run the steps in order (or those named in `only`), skipping complete ones; returns one report per step."""
    work = Path(work_dir) if work_dir else work_dir_for(pipe.store)
    work.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(pipe.store):
        storage.check_reachable(pipe.store)
    reports: list[StepReport] = []
    total = len(pipe.steps)
    if only:  # a selected step may read an unselected one only if that one is already complete
        for step in pipe.steps:
            for ref in (r for r in REFERENCES if r in step.spec and step.name in only):
                needed = pipe.step(step.spec[ref])
                if needed.name not in only and not step_complete(
                        pipe, needed, pipe.train_config(needed) if needed.kind == "train" else None, clean=False):
                    raise PipelineError(f"--only: step {step.name} reads step {needed.name} ({ref}), which is not "
                                        f"complete and not selected; add {needed.name} to --only")
    import torch
    print(f"[pipeline] {total} steps -> {pipe.store}; torch CPU threads: {torch.get_num_threads()}", flush=True)
    began = time.perf_counter()
    for i, step in enumerate(pipe.steps, 1):
        if only and step.name not in only:
            continue
        cfg = pipe.train_config(step) if step.kind == "train" else None
        t0 = time.perf_counter()
        if step_complete(pipe, step, cfg):
            print(f"[pipeline {i}/{total}] {step.name} ({step.kind}): complete, skipped -> {pipe.url(step.name)}",
                  flush=True)
            reports.append(StepReport(step.name, step.kind, "skipped", 0.0, pipe.url(step.name)))
            continue
        print(f"[pipeline {i}/{total}] {step.name} ({step.kind}) -> {pipe.url(step.name)}", flush=True)
        if step.kind == "shards":
            detail = _run_shards(pipe, step)
        elif step.kind == "train":
            detail = _run_train(pipe, step, cfg, address)
        elif step.kind == "cache_latents":
            detail = _run_cache(pipe, step)
        elif step.kind == "sample":
            detail = _run_sample(pipe, step, work, address)
        elif step.kind == "classifier":
            detail = _run_classifier(pipe, step, work)
        elif step.kind == "eval_tokenizer":
            detail = _run_eval_tokenizer(pipe, step, work)
        elif step.kind == "report":
            detail = _run_report(pipe, step, work)
        elif step.kind == "probe":
            detail = _run_probe(pipe, step)
        else:
            detail = _run_eval(pipe, step, work)
        print(f"[pipeline {i}/{total}] {step.name}: {detail}", flush=True)
        reports.append(StepReport(step.name, step.kind, "done", time.perf_counter() - t0, pipe.url(step.name),
                                  detail))
    print(format_reports(reports, time.perf_counter() - began), flush=True)
    return reports


def format_reports(reports: list[StepReport], seconds: float) -> str:
    lines = [f"{'step':<14} {'kind':<14} {'status':<8} {'seconds':>8}  output"]
    for r in reports:
        lines.append(f"{r.name:<14} {r.kind:<14} {r.status:<8} {r.seconds:>8.1f}  {r.output}")
    done = sum(r.status == "done" for r in reports)
    lines.append(f"pipeline: {done} steps run, {len(reports) - done} complete and skipped, in {seconds:.0f} s")
    return "\n".join(lines)


def copy_config_dir(config_dir: Path, dest: Path) -> None:
    """The pipeline directory as a job ships it: pipeline.yaml and the YAML files it names."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in config_dir.iterdir():
        if p.suffix in (".yaml", ".yml") and p.is_file():
            shutil.copy2(p, dest / p.name)
