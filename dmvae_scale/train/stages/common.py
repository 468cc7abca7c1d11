"""What every stage shares: input checks and upstream artifacts, seeded step generators, latent statistics,
the frozen-encoder teacher a stage names, and the stage base class."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ...artifacts import Artifact, ArtifactError, ArtifactInfo, LatentSpec, load_into
from ...config import RunConfig, pinned_input, to_dict
from ...data.artifact_store import artifact_info, open_artifact
from ...data.storage import StorageError
from ...distributed.teachers import TeacherSpec, build_teacher, spec_from_config, tokenizer_encoder_spec
from ...errors import UserError
from ...models.tokenizer import Tokenizer
from ..api import ModelSpec
from ..precision import ForwardPrecision


class StageInputError(UserError):
    """A stage's inputs (upstream artifacts, reference files) are missing, unused, or do not fit its config."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _check_same(now: Any, then: Any, section: str, source: str, ignore: set[str]) -> None:
    """A config section must equal the one an upstream artifact was made with (except keys that change nothing
    about the weights' meaning)."""
    a, b = _flat(to_dict(now), section + "."), _flat(to_dict(then), section + ".")
    for key in a:
        if key not in ignore and a[key] != b.get(key):
            raise StageInputError(f"{key}: this run has {a[key]!r} but {source} was made with {b.get(key)!r}; "
                                  f"use the same value")


# tokenizer.kind: a stage that loads inputs.tokenizer builds the kind that artifact holds (DMVAE or the KL-VAE
# baseline, same latent shape and decoder), so one generator config serves both latent spaces.
_TOKENIZER_SETTINGS = {"tokenizer.encoder.weights", "tokenizer.encoder.sha256", "tokenizer.encoder.frozen",
                       "tokenizer.kind"}


_SCORE_SETTINGS = {"score.class_dropout", "score.grad_checkpointing", "score.attention"}


@dataclasses.dataclass
class Upstream:
    key: str  # the config key that named it
    path: str  # as the config names it: a local directory or an s3:// URL
    artifact: Artifact
    cfg: RunConfig
    which: str

    @property
    def info(self) -> ArtifactInfo:
        return self.artifact.info

    def load(self, module: nn.Module, model: str, which: str | None = None) -> None:
        which = which or self.which
        try:
            load_into(module, self.artifact.state(model, which), f"'{model}' from {self.path} ({which} weights)")
        except ArtifactError as exc:
            raise StageInputError(f"{self.key}: {exc}") from None


def open_upstream(key: str, path: str, which: str, pin: Optional[str] = None) -> Upstream:
    """Open an upstream artifact (local or s3://: manifest, config, weights checked against the content hash) or
    fail naming the key and the file. `pin` (inputs.<key>_sha256): the content hash it must have."""
    try:
        artifact = open_artifact(path)
        pinned_input(key, pin, artifact.info.content_hash, path)
        artifact.weights(which)  # read and checked now: a bad input fails before any model is built
        upstream_cfg = artifact.config()
    except (ArtifactError, StorageError) as exc:
        raise StageInputError(f"{key}: {exc}") from None
    return Upstream(key, path, artifact, upstream_cfg, which)


def _tokenizer_from(cfg: RunConfig, up: Upstream) -> Tokenizer:
    _check_same(cfg.tokenizer, up.cfg.tokenizer, "tokenizer", f"{up.key}={up.path}", _TOKENIZER_SETTINGS)
    try:  # builds the kind the artifact records (DMVAE or the KL-VAE baseline)
        return Tokenizer.from_artifact(up.artifact, cfg.inputs.tokenizer_weights, cfg.tokenizer)
    except ArtifactError as exc:
        raise StageInputError(f"{up.key}: {exc}") from None


def _check_score_shape(cfg: RunConfig, shape: tuple[int, ...], source: str) -> None:
    c, h, w = shape
    if cfg.score.in_channels != c:
        raise StageInputError(f"score.in_channels={cfg.score.in_channels} but {source} has {c}-channel latents; "
                              f"set score.in_channels={c}")
    if cfg.score.input_size != h or h != w:
        raise StageInputError(f"score.input_size={cfg.score.input_size} but {source} has a {h}x{w} latent grid; "
                              f"set score.input_size={h}")


def step_generators(device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(generator on `device` for noise and DiffAugment, CPU generator) of the current training step: seeded from
    the step's seed, which the loop sets before every step from (seed, rank, images seen) (seeds.step_seed; torch
    keeps it as torch.initial_seed())."""
    value = torch.initial_seed()
    cpu = torch.Generator().manual_seed(value)
    dev = cpu if device.type == "cpu" else torch.Generator(device=device).manual_seed(value)
    return dev, cpu


@contextmanager
def no_param_grads(module: nn.Module):
    """Run a module's forward without gradients reaching its parameters (the generator side of a GAN loss)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _image_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x.mean(dim=1, keepdim=True) if channels == 1 and x.shape[1] != 1 else x


def measure_latent_stats(sample: Any, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
                         ) -> tuple[float, float]:
    """(mean of batch means, mean of 1/std) of the latents `sample(batch)` makes from the batches (moved to
    `device`; a batch may carry teacher features beside its images)."""
    means, inv_stds = [], []
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            z = sample(batch).float()
            means.append(z.mean())
            inv_stds.append(1.0 / z.std())
    if not means:
        raise UserError("no batches to measure latent statistics on")
    return float(torch.stack(means).mean()), float(torch.stack(inv_stds).mean())


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def stage_teacher_spec(cfg: RunConfig) -> Optional[TeacherSpec]:
    """The teacher whose features equal the stage's frozen encoder's, or None where the stage has none (and then
    teacher.remote is refused). Reads at most an artifact manifest: a driver calls it to start the service.

    tokenizer (frozen encoder): the teacher cfg.teacher names; reference on tokenizer latents, decoder, generator: the
    encoder of inputs.tokenizer (local paths made absolute: the service may run in another directory).
    """
    why = None
    if cfg.stage == "tokenizer" and cfg.tokenizer.kind == "kl_vae":
        why = "the KL-VAE baseline's encoder is a conv net that trains, not a registry teacher"
    elif cfg.stage == "teacher":
        why = "the teacher stage trains the teacher network itself"
    elif cfg.stage == "dmd":
        why = "stage 3 trains the encoder; its features cannot come from a frozen teacher"
    elif cfg.stage == "tokenizer":
        if cfg.tokenizer.encoder.frozen:
            # Checked in full only where a service must rebuild the network from the spec alone.
            return spec_from_config(cfg, check=cfg.teacher.remote)
        why = "tokenizer.encoder.frozen=false: the encoder trains"
    elif cfg.stage == "reference" and cfg.reference.kind not in ("tokenizer", "noisy_tokenizer"):
        why = f"reference.kind={cfg.reference.kind} uses no tokenizer"
    elif cfg.data.latents is not None:
        why = "data.latents: its batches carry cached latents, no encoder runs"
    elif cfg.inputs.tokenizer is None:
        return None  # the stage refuses the missing input itself, naming it
    else:
        try:
            info = artifact_info(cfg.inputs.tokenizer)
        except (ArtifactError, StorageError) as exc:
            raise StageInputError(f"inputs.tokenizer: {exc}") from None
        pinned_input("inputs.tokenizer", cfg.inputs.tokenizer_sha256, info.content_hash, cfg.inputs.tokenizer)
        if info.extra.get("tokenizer_kind", "dmvae") == "kl_vae":
            why = "the KL-VAE baseline's encoder is a conv net of its own, not a registry teacher"
            if cfg.teacher.remote:
                raise StageInputError(f"teacher.remote: stage '{cfg.stage}' has no frozen encoder whose features a "
                                      f"teacher could compute ({why}); set teacher.remote=false")
            return None
        path = cfg.inputs.tokenizer if "://" in cfg.inputs.tokenizer else str(Path(cfg.inputs.tokenizer).resolve())
        return tokenizer_encoder_spec(cfg, path, cfg.inputs.tokenizer_weights, info.content_hash)
    if cfg.teacher.remote:
        raise StageInputError(f"teacher.remote: stage '{cfg.stage}' has no frozen encoder whose features a teacher "
                              f"could compute ({why}); set teacher.remote=false")
    return None


def _seeded_encoder_weights(cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """teacher.name=random_vit or ssl: the encoder IS the teacher's network (seeded, or trained by the `teacher`
    stage), so the service computes its features."""
    spec = dataclasses.replace(spec_from_config(cfg), device="cpu", dtype="float32")
    tokenizer.encoder.load_state_dict(build_teacher(spec).network.state_dict())


class _StageBase:
    name: str
    export: tuple[str, ...] = ()  # models whose weights go into the artifact
    # The frozen encoder whose features a batch may carry, and the teacher that computes exactly those (None: none).
    teacher_spec: Optional[TeacherSpec] = None
    frozen_encoder: Optional[nn.Module] = None

    def __init__(self, cfg: RunConfig, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.upstream: dict[str, str] = {}
        self._models: dict[str, ModelSpec] = {}
        self.autocast = ForwardPrecision()

    def set_precision(self, precision: str, device_type: str) -> None:
        """The driver's resolved precision ('fp32' or 'bf16') and device type: each forward + loss of a step then runs
        in its own autocast region."""
        self.autocast = ForwardPrecision(precision, device_type)
        losses = getattr(self, "losses", None)
        if losses is not None:
            losses.autocast = self.autocast

    def models(self) -> dict[str, ModelSpec]:
        return self._models

    def _rng(self, step: int, x: torch.Tensor) -> tuple[torch.Generator, torch.Generator]:
        return step_generators(x.device)

    def prepare(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Work before training (latent statistics). Every rank must be given the same batches."""

    def needs_prepare(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def artifact(self) -> dict[str, Any]:
        return {"models": list(self.export), "latent": None, "upstream": dict(self.upstream), "extra": {}}


class _MeasuresLatentStats:
    """Stages that measure latent mean/scale before training keep them in their checkpointed state."""

    latent: Optional[LatentSpec]

    def state_dict(self) -> dict:
        return {"latent": dataclasses.asdict(self.latent)} if self.latent is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "latent" in state:
            self.latent = LatentSpec(**state["latent"])


CACHED_LATENTS_KEY = "latent"  # a batch of the latent cache (data/latents.py LatentStreamDataset)
