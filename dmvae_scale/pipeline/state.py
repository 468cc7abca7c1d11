"""Whether a step's output is complete and current. Rerunning a pipeline skips what is complete and resumes what is
not: a train step whose artifact was made by this exact config (the artifact manifest's config hash) from the current
upstream artifacts is skipped, otherwise it runs, resuming from its run directory's newest checkpoint; a trained
output made from an older upstream is refused by name (never silently reused); a derived output (latent cache,
samples, evaluation) made from an older upstream is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..log import say
from ..config import RunConfig, config_hash
from ..data import storage
from ..eval.sources import SAMPLES_FILE
from ..train.launch import absolutize
from .spec import LAYOUT, Pipeline, PipelineError, Step, artifact_id, real_set


def read_json(url: str) -> Optional[dict]:
    try:
        return json.loads(storage.read_bytes(url))
    except storage.StorageError:
        return None
    except json.JSONDecodeError:
        raise PipelineError(f"{url}: not valid JSON; the output is damaged: delete its directory to redo the step") \
            from None


def _upstream_ids(pipe: Pipeline, step: Step) -> dict[str, str]:
    """role -> id of the current upstream artifacts a train step reads."""
    out = {}
    for role in ("tokenizer", "real_score", "teacher"):
        if role in step.spec:
            manifest = read_json(storage.join(pipe.artifact_url(step.spec[role]), "artifact.json"))
            if manifest is None:
                raise PipelineError(f"step {step.name}: its {role} {pipe.artifact_url(step.spec[role])} is missing")
            out[role] = artifact_id(manifest)
    return out


def train_complete(pipe: Pipeline, step: Step, cfg: RunConfig) -> bool:
    manifest = read_json(storage.join(pipe.artifact_url(step.name), "artifact.json"))
    if manifest is None:
        return False
    recorded = set(manifest.get("upstream", {}).values())
    for role, now in _upstream_ids(pipe, step).items():
        if now not in recorded:
            raise PipelineError(f"step {step.name}: its artifact {pipe.artifact_url(step.name)} was trained on "
                                f"{sorted(recorded)}, but the pipeline's {role} is now {now}; delete "
                                f"{pipe.url(step.name)} to retrain it on the new one")
    return manifest.get("config_hash") == config_hash(absolutize(cfg))


def current_artifact(pipe: Pipeline, step_name: str) -> Optional[str]:
    manifest = read_json(storage.join(pipe.artifact_url(step_name), "artifact.json"))
    return artifact_id(manifest) if manifest is not None else None


def _derived_state(pipe: Pipeline, step: Step) -> tuple[Optional[str], Optional[str]]:
    """(the upstream id a derived output was made from, the upstream id now) for cache, sample and eval steps:
    such outputs are pure functions of their upstream, so a stale one is redone, never reused."""
    url, s = pipe.url(step.name), step.spec
    if step.kind == "cache_latents":
        meta = read_json(storage.join(url, "latents.json"))
        made = meta.get("tokenizer") if meta and storage.exists(storage.join(url, "index.json")) else None
        return made, current_artifact(pipe, s["tokenizer"])
    if step.kind == "sample":
        meta = read_json(storage.join(url, "sampling.json"))
        made = meta.get("generator") if meta and storage.exists(storage.join(url, SAMPLES_FILE)) else None
        return made, current_artifact(pipe, s["generator"])
    if step.kind == "classifier":  # made from real images only: nothing upstream can make it stale
        return ("real" if storage.exists(storage.join(url, "classifier.json")) else None), "real"
    if step.kind == "report":  # cheap and made from everything before it: always written again
        return None, "everything"
    meta = read_json(storage.join(url, "inputs.json"))
    made = meta.get("made_from") if meta and storage.exists(storage.join(url, "metrics.json")) else None
    return made, inputs_now(pipe, step)


def inputs_now(pipe: Pipeline, step: Step) -> Optional[str]:
    """What an evaluation is made from now: the sampled generator's id (and the classifier's run), or the
    tokenizer's artifact id."""
    s = step.spec
    if step.kind == "eval_tokenizer":
        return current_artifact(pipe, s["tokenizer"])
    if step.kind == "probe":
        return current_artifact(pipe, s["teacher"])
    if step.kind == "real_stats":  # made from real images only: redone when the set it names changes
        return "real:" + "-".join(str(v) for v in real_set(step))
    samples = read_json(storage.join(pipe.url(s["samples"]), "sampling.json"))
    if samples is None:
        return None
    if "classifier" in s:
        classifier = read_json(storage.join(pipe.url(s["classifier"]), "classifier.json"))
        return f"{samples.get('generator')}+classifier-{(classifier or {}).get('seed')}"
    return samples.get("generator")


def work_dir_for(store: str) -> Path:
    """Local scratch for steps whose tools write local files (samples, evaluation): one per store, kept across
    reruns so a partly sampled set resumes."""
    key = hashlib.sha256(store.encode()).hexdigest()[:12]
    base = Path(os.environ.get("DMVAE_CACHE", Path.home() / ".cache" / "dmvae-scale"))
    return base / "pipeline" / key


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
        say("pipeline", f"step {step.name}: {url} was made from {made or 'an unfinished run'}, the upstream is "
                        f"now {now}: redoing it")
        storage.remove(url)
        local = work_dir_for(pipe.store) / LAYOUT[step.kind] / step.name
        shutil.rmtree(local, ignore_errors=True)
    return False
