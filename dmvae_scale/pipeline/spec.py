"""The specification of a pipeline, apart from running it: pipeline.yaml's steps, which earlier steps each one reads,
the store layout, overrides, and the stage configs of its train steps (every one loaded and validated here, on the
user's machine, before anything runs).

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
level, or a step's field) says where a step runs: a train step by train/launch.py's choose_launcher (ray, local or
auto); a shards, cache_latents, sample or evaluation step as Ray work on the workers or in this process, with the
step's cpus/gpus/workers (pipeline/resources.py).
A sample step with `images: N` samples the generator run's checkpoint at N images seen (it must be kept) instead of its
final artifact: a point on a gFID-over-training curve.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, RunConfig, load_config, parse_override, read_yaml, require_inputs
from ..data import storage
from ..errors import UserError
from ..train.launch import LAUNCHERS, choose_launcher

PIPELINE_FILE = "pipeline.yaml"
# Where each kind of step writes under the store.
LAYOUT = {"shards": "data", "train": "runs", "cache_latents": "latents", "sample": "samples", "eval": "eval",
          "classifier": "eval", "eval_tokenizer": "eval", "probe": "eval", "real_stats": "eval", "report": "report"}
# The fields of a step that name an earlier step it reads, and what kind that step must be.
STEP_INPUTS = {"data": "shards", "latents": "cache_latents", "tokenizer": "train", "real_score": "train",
               "teacher": "train", "generator": "train", "samples": "sample", "classifier": "classifier",
               "real_stats": "real_stats"}
# Where a heavy step runs and with what (pipeline/resources.py): launcher (ray, local, auto), cpus and gpus per task or
# actor, workers at once.
PLACED = {"launcher", "cpus", "gpus"}
# The real images of an eval or real_stats step when it does not say (eval/score.RealImages' fields).
REAL_SET_DEFAULTS = {"source": "fashion-mnist", "split": "test", "limit": None, "image_size": None}
FIELDS = {"shards": {"source", "split", "limit", "workers", "part_size", "image_size"} | PLACED,
          "train": {"config", "data", "latents", "tokenizer", "real_score", "teacher", "launcher"},
          "cache_latents": {"data", "tokenizer", "weights", "batch_size", "limit"} | PLACED,
          "sample": {"generator", "per_class", "num_samples", "batch_size", "workers", "overrides", "images"} | PLACED,
          "eval": {"samples", "source", "split", "limit", "image_size", "classifier", "tags", "real_stats"} | PLACED,
          # the real images' FID statistics, computed once for every eval step that names this step in `real_stats`
          "real_stats": {"source", "split", "limit", "image_size"} | PLACED,
          "classifier": {"source", "split", "limit", "test_split", "test_limit", "epochs", "seed"} | PLACED,
          "eval_tokenizer": {"tokenizer", "source", "split", "limit", "weights", "tags", "real_stats"} | PLACED,
          "probe": {"teacher", "limit", "test_limit", "weights", "seed"} | PLACED,
          "report": {"title", "group_by", "ours", "baseline"}}


def real_set(step: "Step") -> tuple:
    """(source, split, limit, image_size) of the real images an eval or real_stats step names."""
    return tuple(step.spec.get(k, default) for k, default in REAL_SET_DEFAULTS.items())


class PipelineError(UserError):
    """pipeline.yaml, a step's input, or a stale output: names the step and what would be right."""


@dataclass
class Step:
    name: str
    kind: str
    spec: dict[str, Any]

    def inputs(self) -> dict[str, str]:
        """field -> the name of the earlier step it reads."""
        return {field: self.spec[field] for field in STEP_INPUTS if field in self.spec}


@dataclass
class Pipeline:
    config_dir: Path
    store: str
    steps: list[Step]
    global_overrides: list[str] = field(default_factory=list)
    launcher: str = "ray"  # pipeline.yaml's `launcher:`; a train step's own `launcher` field wins
    max_concurrent: int = 1  # pipeline.yaml's `max_concurrent:`: steps that may run at once (--max-concurrent wins)

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

    def launcher_of(self, step: Step, cfg: RunConfig, address: Optional[str] = None) -> str:
        """'ray' or 'local' for a train step: its `launcher` field, else the pipeline's (launch.choose_launcher)."""
        try:
            return choose_launcher(str(step.spec.get("launcher", self.launcher)), cfg, address)
        except UserError as exc:
            raise PipelineError(f"step {step.name}: {exc}") from None

    def config_files(self) -> list[Path]:
        """What a job ships of the pipeline directory: pipeline.yaml and the YAML files beside it."""
        return sorted(p for p in self.config_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_pipeline(config_dir: str | Path, store: str, overrides: list[str] = ()) -> Pipeline:
    """Read, override and check a pipeline directory: every step's fields and inputs, and every train step's stage
    config (loaded and validated), so nothing fails later for a reason known now."""
    storage.check_location(store, "--store")  # ftp://, s3:/bucket: refused before anything is read
    config_dir = Path(config_dir)
    path = config_dir / PIPELINE_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: not found; a pipeline directory holds {PIPELINE_FILE} and the stage configs "
                            f"it names (see configs/demo/{PIPELINE_FILE})")
    doc = read_yaml(path)
    launcher = str(doc.get("launcher", "ray"))
    if launcher not in LAUNCHERS:
        raise PipelineError(f"{path}: launcher {launcher!r} must be one of {', '.join(LAUNCHERS)}")
    max_concurrent = doc.get("max_concurrent", 1)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
        raise PipelineError(f"{path}: max_concurrent {max_concurrent!r} must be a positive whole number of steps")
    steps = _parse_steps(path, doc.get("steps"))
    pipe = Pipeline(config_dir, store.rstrip("/") if storage.is_remote(store) else os.path.abspath(store), steps,
                    launcher=launcher, max_concurrent=max_concurrent)
    for text in overrides:
        _apply_override(pipe, text)
    _check_steps(pipe)
    return pipe


def _parse_steps(path: Path, raw: Any) -> list[Step]:
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
        for ref, want in STEP_INPUTS.items():
            if ref in spec:
                target = next((s for s in steps if s.name == spec[ref]), None)
                if target is None or target.kind != want:
                    raise PipelineError(f"{where} ({name}): {ref}={spec[ref]!r} must name an earlier {want} step")
        if kind == "train" and "config" not in spec:
            raise PipelineError(f"{where} ({name}): a train step needs 'config' (a YAML file in {path.parent})")
        spec.setdefault("overrides", [])
        steps.append(Step(name, kind, spec))
    return steps


def _setting(text: str, rest: str) -> tuple[str, Any]:
    key, value = rest.split("=", 1) if "=" in rest else (rest, "")
    return key, parse_override(f"x={value}")[1]


def _apply_override(pipe: Pipeline, text: str) -> None:
    """`key=value` (every train step's config), `STEP:key=value` (one step) or `*:key=value` (every step that has
    that setting, e.g. *:per_class=2, *:launcher=ray)."""
    head, sep, rest = text.partition(":")
    if not sep or "=" in head:
        pipe.global_overrides.append(text)
        return
    if head == "*":
        key, value = _setting(text, rest)
        targets = [st for st in pipe.steps if key in FIELDS[st.kind] and key not in STEP_INPUTS
                   and (st.kind != "train" or key == "launcher")]
        if not targets:
            raise PipelineError(f"override {text!r}: no step has a setting {key!r}")
        for st in targets:
            st.spec[key] = value
        return
    if not any(s.name == head for s in pipe.steps):
        raise PipelineError(f"override {text!r}: no step named {head!r}; steps: "
                            f"{', '.join(s.name for s in pipe.steps)}")
    target = pipe.step(head)
    if target.kind == "train" and not rest.startswith("launcher="):  # the rest are the stage config's keys
        target.spec["overrides"].append(rest)
        return
    key, value = _setting(text, rest)
    if key not in FIELDS[target.kind] or key in STEP_INPUTS:
        raise PipelineError(f"override {text!r}: a {target.kind} step's settings are "
                            f"{sorted(FIELDS[target.kind] - set(STEP_INPUTS))}")
    target.spec[key] = value


def _check_steps(pipe: Pipeline) -> None:
    from .resources import check_resources
    for step in pipe.steps:  # every stage config loads and validates here, before any resource is used
        if str(step.spec.get("launcher", pipe.launcher)) not in LAUNCHERS:
            raise PipelineError(f"step {step.name}: launcher {step.spec['launcher']!r} must be one of "
                                f"{', '.join(LAUNCHERS)}")
        check_resources(step, pipe.launcher)  # cpus, gpus, workers: one line naming the field and the fix
        if step.kind == "train":
            try:
                cfg = pipe.train_config(step)
                require_inputs(cfg)
                pipe.launcher_of(step, cfg)
            except ConfigError as exc:
                raise PipelineError(f"step {step.name} ({step.spec['config']}): {exc}") from None
    for step in pipe.steps:  # an eval step's precomputed statistics: of the very images it compares against
        if step.kind == "eval" and "real_stats" in step.spec:
            ref = pipe.step(step.spec["real_stats"])
            if real_set(step) != real_set(ref):
                ours, theirs = (", ".join(f"{k} {v}" for k, v in zip(REAL_SET_DEFAULTS, real_set(st)))
                                for st in (step, ref))
                raise PipelineError(f"step {step.name}: real_stats={ref.name!r} holds the statistics of other real "
                                    f"images ({theirs}) than this step compares against ({ours}); give both the same "
                                    f"source, split, limit and image_size, or drop real_stats")
    for step in pipe.steps:  # a tokenizer's originals: the same images, at the size the tokenizer reads (run time)
        if step.kind == "eval_tokenizer" and "real_stats" in step.spec:
            ref = pipe.step(step.spec["real_stats"])
            ours, theirs = real_set(step)[:3], real_set(ref)[:3]
            if ours != theirs or real_set(ref)[3] is None:
                names = ("source", "split", "limit")
                raise PipelineError(
                    f"step {step.name}: real_stats={ref.name!r} holds the statistics of "
                    f"{', '.join(f'{k} {v}' for k, v in zip(names, theirs))} at image_size {real_set(ref)[3]}; this "
                    f"step reconstructs {', '.join(f'{k} {v}' for k, v in zip(names, ours))}: give both the same "
                    f"source, split and limit, and {ref.name} the tokenizer's image_size, or drop real_stats")
    for step in pipe.steps:  # a checkpoint to sample from: one the generator's run will have written (and kept)
        if step.kind == "sample" and step.spec.get("images") is not None:
            gen = pipe.train_config(pipe.step(step.spec["generator"]))
            images = step.spec["images"]
            if not isinstance(images, int) or not 0 < images < gen.total_images or images % gen.ckpt_every_images:
                raise PipelineError(f"step {step.name}: images={images!r} must be a checkpoint of "
                                    f"{step.spec['generator']} before its end: a multiple of its ckpt_every_images="
                                    f"{gen.ckpt_every_images} below its total_images={gen.total_images}")


def artifact_id(manifest: dict) -> str:
    """The id an artifact's manifest gives it: its stage and the start of its weights hash (format 2; format 1:
    its content hash, which covers the weights alone). ArtifactInfo.id says the same."""
    return f"{manifest['stage']}-{(manifest.get('weights_hash') or manifest['content_hash'])[:12]}"
