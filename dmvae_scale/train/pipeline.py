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
`tokenizer:total_images=640`, or another step's fields, e.g. `samples:per_class=5`), `key=value` for every train step.

Rerunning skips what is complete and resumes what is not: a train step whose artifact was made by this exact config
(the artifact manifest's config hash) from the current upstream artifacts is skipped; otherwise it runs, resuming from
the run directory's newest checkpoint. A step whose output was made from an older upstream is refused by name, never
silently reused.
"""
from __future__ import annotations

import dataclasses
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
LAYOUT = {"shards": "data", "train": "runs", "cache_latents": "latents", "sample": "samples", "eval": "eval"}
# Which fields name an earlier step, and what kind that step must be.
REFERENCES = {"data": "shards", "latents": "cache_latents", "tokenizer": "train", "real_score": "train",
              "generator": "train", "samples": "sample"}
FIELDS = {"shards": {"source", "split", "limit", "workers"},
          "train": {"config", "data", "latents", "tokenizer", "real_score"},
          "cache_latents": {"data", "tokenizer", "weights", "batch_size", "limit"},
          "sample": {"generator", "per_class", "num_samples", "batch_size", "workers", "overrides"},
          "eval": {"samples", "source", "split", "limit", "image_size"}}


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
        if "real_score" in s:
            key = "real_score" if "real_score" in {f.name for f in dataclasses.fields(RunConfig().inputs)} \
                else "reference"
            wiring.append(f"inputs.{key}={self.artifact_url(s['real_score'])}")
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
    raw = read_yaml(path).get("steps")
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
    pipe = Pipeline(config_dir, store.rstrip("/") if storage.is_remote(store) else os.path.abspath(store), steps)
    for text in overrides:
        head, sep, rest = text.partition(":")
        if not sep or "=" in head:
            pipe.global_overrides.append(text)
            continue
        if not any(s.name == head for s in steps):
            raise PipelineError(f"override {text!r}: no step named {head!r}; steps: {', '.join(s.name for s in steps)}")
        target = pipe.step(head)
        if target.kind == "train":
            target.spec["overrides"].append(rest)
        else:
            from ..config import parse_override
            key, value = rest.split("=", 1) if "=" in rest else (rest, "")
            if key not in FIELDS[target.kind] or key in REFERENCES:
                raise PipelineError(f"override {text!r}: a {target.kind} step's settings are "
                                    f"{sorted(FIELDS[target.kind] - set(REFERENCES))}")
            target.spec[key] = parse_override(f"x={value}")[1]
    for step in steps:  # every stage config loads and validates here, before any resource is used
        if step.kind == "train":
            try:
                pipe.train_config(step)
            except ConfigError as exc:
                raise PipelineError(f"step {step.name} ({step.spec['config']}): {exc}") from None
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
    for role in ("tokenizer", "real_score"):
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
    meta = _json(storage.join(url, "inputs.json"))
    made = meta.get("samples_of") if meta and storage.exists(storage.join(url, "metrics.json")) else None
    samples = _json(storage.join(pipe.url(s["samples"]), "sampling.json"))
    return made, samples.get("generator") if samples else None


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


def _run_train(pipe: Pipeline, step: Step, cfg: RunConfig, address: Optional[str]) -> str:
    from .launch import train
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
    local = work / "samples" / step.name
    npz = run_sample(pipe.artifact_url(s["generator"]), str(local), num_per_class=s.get("per_class"),
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
    ref = local / f"ref-{s.get('source', 'fashion-mnist')}-{s.get('split', 'test')}-{s.get('limit')}.npz"
    if not ref.is_file():
        eval_ref(str(s.get("source", "fashion-mnist")), str(ref), split=str(s.get("split", "test")),
                 image_size=s.get("image_size"), limit=s.get("limit"), opts=opts)
    samples = local / SAMPLES_FILE
    samples.write_bytes(storage.read_bytes(storage.join(pipe.url(s["samples"]), SAMPLES_FILE)))
    made_from = _json(storage.join(pipe.url(s["samples"]), "sampling.json"))["generator"]
    metrics = eval_samples(str(samples), str(ref), str(local / "out"), opts=opts)
    storage.write_bytes(storage.join(pipe.url(step.name), "inputs.json"),
                        json.dumps({"samples_of": made_from}).encode())
    _put_dir(local / "out", pipe.url(step.name), sorted(p.name for p in (local / "out").iterdir() if p.is_file()))
    storage.write_bytes(storage.join(pipe.url(step.name), "metrics.json"),  # last: marks the step complete
                        json.dumps(metrics, indent=2, default=str).encode())
    fid = metrics.get("fid") if isinstance(metrics, dict) else None
    return f"FID {fid:.2f}" if isinstance(fid, (int, float)) else "evaluated"


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
        else:
            detail = _run_eval(pipe, step, work)
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
