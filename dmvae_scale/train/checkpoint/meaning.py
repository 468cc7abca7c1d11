"""What a checkpoint means, and the refusal of a resume that would change it: the config keys that define what the
saved tensors are (shapes, the trained objective), the upstream artifacts' latent statistics, and every parameter's
shape. A resume that changes any of them is refused, naming the first key that differs."""
from __future__ import annotations

from typing import Any

from ...artifacts import DIT_STAGES, METHOD_VERSION, method_refusal
from ...config import RunConfig, to_dict
from ...data.artifact_store import artifact_info
from ...errors import UserError

# Config keys that may change between a checkpoint and its resume: how long/how often, where, on what hardware.
# Everything else under these sections defines what the saved tensors are (shapes, the trained objective).
MEANING_SECTIONS = ("stage", "tokenizer", "score", "discriminator", "reference", "ssl")
RUNTIME_ONLY_KEYS = {
    "score.grad_checkpointing", "score.attention", "tokenizer.encoder.weights", "tokenizer.encoder.sha256",
    "reference.path",
}


METHOD_KEY = "method.version"  # artifacts.METHOD_VERSION of the code that saved the checkpoint; absent: 1


class ResumeRefusedError(UserError):
    """The run directory holds checkpoints of something else than this config describes; names the key."""


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def meaning_of(cfg: RunConfig, upstream_latents: dict[str, dict[str, float]] | None = None,
               param_shapes: dict[str, dict[str, list[int]]] | None = None) -> dict[str, Any]:
    """Flat {key: value} of everything a resume must not change, in the order keys are reported."""
    flat: dict[str, Any] = {}
    data = to_dict(cfg)
    for section in MEANING_SECTIONS:
        _flatten(section, data[section], flat)
    out = {k: v for k, v in flat.items() if k not in RUNTIME_ONLY_KEYS}
    out[METHOD_KEY] = METHOD_VERSION
    for role, latent in sorted((upstream_latents or {}).items()):
        for stat, v in latent.items():
            out[f"inputs.{role}.latent.{stat}"] = v
    for model, shapes in sorted((param_shapes or {}).items()):
        for pname, shape in shapes.items():
            out[f"model.{model}.{pname}"] = list(shape)
    return out


def check_zero_stage(saved_stage: int, stage: int, where: str) -> None:
    """Other worker counts and ZeRO stages 1-3 convert through the universal checkpoint; stage 0 saves none."""
    if saved_stage != stage and 0 in (saved_stage, stage):
        raise ResumeRefusedError(f"{where} was saved with distributed.zero_stage={saved_stage}; resuming it with "
                                 f"distributed.zero_stage={stage} is not supported (stage 0 has no universal "
                                 f"checkpoint): use distributed.zero_stage={saved_stage} or a new run_dir")


def refuse_changed_meaning(latest, current: dict[str, Any], zero_stage: int, models: bool = True) -> None:
    """Refuse to resume checkpoint `latest` (a CheckpointInfo) when the config changes what it means, naming the
    key; models=False skips the parameter shapes (known only once the models are built)."""
    saved = latest.meaning if models else {k: v for k, v in latest.meaning.items() if not k.startswith("model.")}
    saved = check_method_version(saved, current, f"checkpoint {latest.url}")
    check_resume(saved, current, f"checkpoint {latest.url}")
    check_zero_stage(latest.zero_stage, zero_stage, f"checkpoint {latest.url}")


def check_method_version(saved: dict[str, Any], current: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse a checkpoint of a DiT-training stage saved before the current method version (its DiT computes another
    function now), with the reason; the other stages' checkpoints mean what they meant, and resume. Returns `saved`
    with the version it is taken at."""
    version = int(saved.get(METHOD_KEY, 1))
    refusal = method_refusal(version, where) if saved.get("stage") in DIT_STAGES else None
    if refusal:
        raise ResumeRefusedError(refusal)
    return {**saved, METHOD_KEY: current.get(METHOD_KEY, version)}


def check_resume(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse, naming the first key whose value differs (or that exists on one side only)."""
    for key in list(saved) + [k for k in current if k not in saved]:
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            what = "a parameter shape" if key.startswith("model.") else "what the checkpoint means"
            raise ResumeRefusedError(
                f"{where} was saved with {key}={old!r} but this config gives {key}={new!r}; that changes "
                f"{what}, so it cannot resume: restore {key}={old!r} or use a new run_dir")




def upstream_latents(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Latent shape and statistics of every upstream artifact the config names (part of what a checkpoint means)."""
    out = {}
    for role in ("tokenizer", "real_score", "generator"):
        path = getattr(cfg.inputs, role)
        if path is None:
            continue
        info = artifact_info(path)  # local or s3://
        if info.latent is not None:
            out[role] = {"mean": info.latent.mean, "scale": info.latent.scale, "channels": info.latent.channels,
                         "height": info.latent.height, "width": info.latent.width}
    return out


def param_shapes(models: dict) -> dict[str, dict[str, list[int]]]:
    return {name: {n: list(p.shape) for n, p in spec.module.named_parameters()} for name, spec in models.items()}
