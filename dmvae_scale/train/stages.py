"""The stages of docs/method.md behind one interface (train/api.py's Stage): which models, which are frozen, one step,
what the stage needs from the stage before and what it hands on.

    stage      trains                              frozen                       needs (config key)
    teacher    SSL encoder (VICReg; optional,      -                            -
               where no SSL weights exist)
    tokenizer  tokenizer (bottleneck+decoder),     SSL encoder                  -
               discriminator
    reference  real_score (DiT, flow matching)     tokenizer (if the reference  inputs.tokenizer (tokenizer refs)
                                                   is made of its latents)      or reference.path (file ref)
    dmd        tokenizer (all of it), fake_score,  real_score                   inputs.tokenizer, inputs.reference
               fresh discriminator
    decoder    decoder, discriminator              encoder, bottleneck          inputs.tokenizer
    generator  generator (DiT, flow matching)      tokenizer                    inputs.tokenizer (with latent stats)

Frozen-encoder features: where the tokenizer's encoder is frozen (tokenizer with tokenizer.encoder.frozen, reference
on tokenizer latents, decoder, generator) the stage names the teacher equal to that encoder (`teacher_spec`, and the
module itself as `frozen_encoder`); a batch may then carry its features under "teacher_features" (computed in-process
or by the TeacherService, features.py wires either) and the stage runs only bottleneck and decoder on them. Stage 1
builds its encoder from the teacher (random_vit: the seeded network's weights), the later stages name the encoder of
their tokenizer artifact, so both sources give the same bits. DMD trains the encoder: no teacher there.

Every declared input is used or the stage refuses to start; a missing artifact, a latent shape or statistics mismatch,
or weights that do not load stop with an error naming the file and the config key. Stages build on the CPU; the
driver moves models to the device, wraps trainable ones in engines and calls prepare(), then step() per batch.
Random draws come from generators seeded by (seed, rank, step), so a resumed run continues the same noise.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..artifacts import Artifact, ArtifactError, ArtifactInfo, LatentSpec, load_into, save_artifact
from ..config import OptimConfig, RunConfig, config_hash, dump_yaml, to_dict
from ..data.artifact_store import artifact_info, open_artifact
from ..data.storage import StorageError
from ..distributed.teacher_service import FEATURES_KEY
from ..distributed.teachers import TeacherSpec, build_teacher, spec_from_config, tokenizer_encoder_spec
from ..errors import UserError
from ..method.dm_loss import annealed_t_range, dm_loss
from ..method.flow import drop_labels, flow_matching_loss
from ..method.gan import adaptive_weight, hinge_d_loss, hinge_g_loss
from ..method.references import (FileSamples, GaussianMixture, NoisyTokenizerLatents, ReferenceSource,
                                 StandardGaussian, TokenizerLatents, random_means)
from ..method.ssl import ViewAugment, vicreg_loss
from ..models.discriminator import DiffAugment, PatchDiscriminator, consistency_term
from ..models.dit import LightningDiT
from ..models.ssl import SSLEncoder
from ..method.kl import gaussian_kl
from ..models.kl_vae import KLTokenizer
from ..models.tokenizer import Tokenizer, build_tokenizer
from .api import Engine, ModelSpec, StepOutput
from .precision import ForwardPrecision


class StageInputError(UserError):
    """A stage's inputs (upstream artifacts, reference files) are missing, unused, or do not fit its config."""


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: what each stage may name, and loading upstream artifacts with checks that name the key
# ----------------------------------------------------------------------------------------------------------------------

def _reject_unused(cfg: RunConfig, used: set[str]) -> None:
    """Every input given must be used: name the first one this stage would ignore."""
    given = {"inputs.tokenizer": cfg.inputs.tokenizer, "inputs.reference": cfg.inputs.reference,
             "inputs.generator": cfg.inputs.generator, "reference.path": cfg.reference.path,
             "tokenizer.encoder.weights": cfg.tokenizer.encoder.weights}
    for key, value in given.items():
        if value is not None and key not in used:
            why = " (the tokenizer's weights come from inputs.tokenizer)" if key == "tokenizer.encoder.weights" \
                and cfg.stage != "tokenizer" else ""
            raise StageInputError(f"{key}: stage '{cfg.stage}' does not use it{why}; remove it (got {value!r})")
    for key in sorted(used):
        if key.startswith("inputs.") and given[key] is None:
            raise StageInputError(f"{key}: stage '{cfg.stage}' needs it: the artifact directory of "
                                  f"{_PRODUCER[key]}")


_PRODUCER = {"inputs.tokenizer": "a tokenizer-producing stage (tokenizer, dmd or decoder)",
             "inputs.reference": "the reference stage (its real_score)", "inputs.generator": "a generator stage"}


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


def open_upstream(key: str, path: str, which: str) -> Upstream:
    """Open an upstream artifact (local or s3://: manifest, config, weights checked against the content hash) or
    fail naming the key and the file."""
    try:
        artifact = open_artifact(path)
        upstream_cfg = artifact.config()
        artifact.weights(which)  # read and checked now: a bad input fails before any model is built
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


def load_reference_samples(path: str, key: str = "reference.path") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reference samples from a file: .pt/.pth (a tensor, or a dict with 'samples' and optional 'labels'),
    .npy (an array), .npz or .safetensors (entries 'samples' and optional 'labels')."""
    p = Path(path)
    if not p.is_file():
        raise StageInputError(f"{key}: file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            data = torch.load(p, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            import numpy as np
            data = torch.from_numpy(np.load(p))
        elif suffix == ".npz":
            import numpy as np
            with np.load(p) as z:
                data = {k: torch.from_numpy(z[k]) for k in z.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(p))
        else:
            raise StageInputError(f"{key}: {p} has an unsupported type; use .pt, .npy, .npz or .safetensors")
    except StageInputError:
        raise
    except Exception as exc:  # a corrupt file: name it and why, never a traceback
        raise StageInputError(f"{key}: cannot read {p}: {exc}") from None
    if torch.is_tensor(data):
        return data.float(), None
    if not isinstance(data, dict) or "samples" not in data:
        raise StageInputError(f"{key}: {p} must hold a tensor or a mapping with key 'samples' "
                              f"(and optionally 'labels')")
    labels = data.get("labels")
    return data["samples"].float(), (labels.long() if labels is not None else None)


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------

def step_generators(seed: int, rank: int, step: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(generator on `device` for noise, CPU generator for augmentation), both functions of (seed, rank, step)."""
    value = ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2 ** 63)
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


class AutoencoderLosses:
    """Reconstruction (L1 + perceptual) + adaptive-weight hinge GAN for the tokenizer side, and the discriminator's
    hinge loss with DiffAugment and the consistency term. Shared by the tokenizer, dmd and decoder stages."""

    def __init__(self, cfg: RunConfig):
        self.loss = cfg.loss
        self.disc_cfg = cfg.discriminator
        self.augment = DiffAugment() if cfg.discriminator.diffaug else None
        self.autocast = ForwardPrecision()  # the stage's, set by Stage.set_precision
        self.perceptual = None
        if cfg.loss.perceptual_weight > 0:
            from ..models.perceptual import build_perceptual
            self.perceptual = build_perceptual(cfg.loss)

    def gan_active(self, step: int) -> bool:
        return self.loss.gan_weight > 0 and step >= self.loss.gan_start_step

    def _aug(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.augment(x, g) if self.augment is not None else x

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        rec = self.loss.l1_weight * l1
        metrics = {"l1": l1.detach()}
        if self.perceptual is not None:
            with self.autocast():
                perc = self.perceptual(recon, x).float().mean()
            rec = rec + self.loss.perceptual_weight * perc
            metrics["perceptual"] = perc.detach()
        return rec, metrics

    def tokenizer_loss(self, x, recon, step: int, discriminator: Engine, last_layer: torch.Tensor,
                       g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec, metrics = self.reconstruction(x, recon)
        if not self.gan_active(step):
            return rec, metrics
        with no_param_grads(discriminator.module), self.autocast():
            gan = hinge_g_loss(discriminator(self._aug(recon, g)).float())
        weight = adaptive_weight(rec, gan, last_layer, self.loss.adaptive_weight_max)  # outside autocast: a backward
        metrics.update(gan_g=gan.detach(), gan_weight=weight)
        return rec + self.loss.gan_weight * weight * gan, metrics

    def discriminator_step(self, x, recon, discriminator: Engine, g: torch.Generator) -> dict[str, torch.Tensor]:
        fake = recon.detach().float()
        with self.autocast():
            loss = hinge_d_loss(discriminator(self._aug(x, g)).float(), discriminator(self._aug(fake, g)).float())
            metrics = {"gan_d": loss.detach()}
            if self.disc_cfg.consistency_weight > 0:
                cons = consistency_term(discriminator, torch.cat([x, fake]), self.augment, g).float()
                loss = loss + self.disc_cfg.consistency_weight * cons
                metrics["gan_consistency"] = cons.detach()
        discriminator.backward(loss)
        discriminator.step()
        return metrics


def discriminator_optim(cfg: RunConfig) -> OptimConfig:
    """The run's optimiser settings with the discriminator's own weight decay where the config sets one (the official
    DMD recipe: 0.005 for the tokenizer and fake score, 0.0005 for the discriminator)."""
    wd = cfg.discriminator.weight_decay
    return cfg.optim if wd is None else dataclasses.replace(cfg.optim, weight_decay=wd)


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


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------

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
        return step_generators(self.cfg.seed, self.rank, step, x.device)

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


class AutoencoderStage(_MeasuresLatentStats, _StageBase):
    """Stage 1 (tokenizer) and stage 4 (decoder): train the tokenizer's trainable part + the discriminator.

    Stage 1 builds the tokenizer fresh (SSL encoder weights from tokenizer.encoder.weights, frozen per
    tokenizer.encoder.frozen); stage 4 loads it from inputs.tokenizer, freezes encoder and bottleneck, and measures the
    final latent mean/scale in prepare().
    """

    export = ("tokenizer", "discriminator")

    def __init__(self, cfg: RunConfig, rank: int = 0):
        super().__init__(cfg, rank)
        self.name = cfg.stage
        self.losses = AutoencoderLosses(cfg)
        self.discriminator = PatchDiscriminator(cfg.discriminator, in_channels=cfg.tokenizer.in_channels)
        self.latent: Optional[LatentSpec] = None
        if cfg.stage == "tokenizer":
            _reject_unused(cfg, {"tokenizer.encoder.weights"})
            self.teacher_spec = stage_teacher_spec(cfg)
            self.tokenizer = build_tokenizer(cfg.tokenizer)
            if cfg.tokenizer.kind == "kl_vae":
                if cfg.tokenizer.encoder.frozen:
                    raise StageInputError("tokenizer.encoder.frozen: the KL-VAE baseline trains its encoder from "
                                          "scratch; set it false")
            elif cfg.teacher.name in ("random_vit", "ssl"):
                _seeded_encoder_weights(cfg, self.tokenizer)
            if cfg.teacher.name == "ssl":
                self.upstream = {"teacher": artifact_info(cfg.teacher.artifact).id}
        else:
            _reject_unused(cfg, {"inputs.tokenizer"})
            self.teacher_spec = stage_teacher_spec(cfg)
            up = open_upstream("inputs.tokenizer", cfg.inputs.tokenizer, cfg.inputs.tokenizer_weights)
            self.tokenizer = _tokenizer_from(cfg, up)
            if "discriminator" in up.info.models:  # "decoder + GAN trained further": continue the upstream critic
                up.load(self.discriminator, "discriminator", "raw")
            self.tokenizer.set_encoder_trainable(False)
            self.tokenizer.bottleneck.requires_grad_(False)
            self.upstream = {"tokenizer": up.info.id}
        if self.teacher_spec is not None:
            self.frozen_encoder = self.tokenizer.encoder
        self._models = {"tokenizer": ModelSpec(self.tokenizer, True, cfg.optim, ema=True),
                        "discriminator": ModelSpec(self.discriminator, True, discriminator_optim(cfg))}
        if self.losses.perceptual is not None:
            self._models["perceptual"] = ModelSpec(self.losses.perceptual, False)

    def needs_prepare(self) -> bool:
        return self.cfg.stage == "decoder" and self.latent is None

    def prepare(self, batches):
        if not self.needs_prepare():
            return
        c, h, w = self.tokenizer.latent_shape
        channels = self.cfg.tokenizer.in_channels

        def latents(batch):
            if FEATURES_KEY in batch:
                return self.tokenizer.encode_from_features(batch[FEATURES_KEY])
            return self.tokenizer.encode(_image_channels(batch["image"], channels))

        mean, scale = measure_latent_stats(latents, batches, _device_of(self.tokenizer))
        self.latent = LatentSpec(c, h, w, mean, scale)

    def step(self, batch, step, engines):
        x = _image_channels(batch["image"], self.cfg.tokenizer.in_channels)
        _, g = self._rng(step, x)
        tok, disc = engines["tokenizer"], engines["discriminator"]
        kl = None
        with self.autocast():
            if isinstance(tok.module, KLTokenizer):  # sample the posterior while the encoder trains, else its mean
                recon, _, mean, logvar = tok(x, generator=self._rng(step, x)[0], sample=self.cfg.stage == "tokenizer")
                kl = gaussian_kl(mean, logvar)
            else:
                recon, _ = tok(x, features=batch.get(FEATURES_KEY))
        loss, metrics = self.losses.tokenizer_loss(x, recon, step, disc, tok.module.last_layer, g)
        if kl is not None:
            metrics["kl"] = kl.detach()
            if self.cfg.stage == "tokenizer" and self.cfg.loss.kl_weight > 0:
                loss = loss + self.cfg.loss.kl_weight * kl
        tok.backward(loss)
        tok.step()
        metrics["loss"] = loss.detach()
        if self.losses.gan_active(step):
            metrics.update(self.losses.discriminator_step(x, recon, disc, g))
        return StepOutput(metrics, images=len(x))

    def artifact(self):
        out = super().artifact()
        out["latent"] = self.latent
        out["extra"] = {"latent_shape": list(self.tokenizer.latent_shape),
                        "tokenizer_kind": "kl_vae" if isinstance(self.tokenizer, KLTokenizer) else "dmvae"}
        return out


def _latents_of(tokenizer: Tokenizer, channels: int):
    """encode(x) for a reference source: x is a batch of images (B, C, H, W) or of the frozen encoder's features
    (B, N, D) computed by its teacher; the rank tells them apart."""
    def encode(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return tokenizer.encode_from_features(x)
        return tokenizer.encode(_image_channels(x, channels))
    return encode


def _reference_source(cfg: RunConfig, tokenizer: Optional[Tokenizer]) -> ReferenceSource:
    kind = cfg.reference.kind
    shape = (cfg.score.in_channels, cfg.score.input_size, cfg.score.input_size)
    channels = cfg.tokenizer.in_channels
    if kind == "tokenizer":
        return TokenizerLatents(_latents_of(tokenizer, channels), tokenizer.latent_shape)
    if kind == "noisy_tokenizer":
        return NoisyTokenizerLatents(_latents_of(tokenizer, channels), tokenizer.latent_shape, cfg.reference.noise_t)
    if kind == "gaussian":
        return StandardGaussian(shape)
    if kind == "gmm":
        return GaussianMixture(random_means(cfg.reference.gmm_components, shape, cfg.seed), cfg.reference.gmm_std)
    samples, labels = load_reference_samples(cfg.reference.path)
    if tuple(samples.shape[1:]) != shape:
        raise StageInputError(f"reference.path: {cfg.reference.path} holds samples of shape "
                              f"{tuple(samples.shape[1:])}, but score.in_channels/input_size make {shape}")
    if labels is not None and (labels.min() < 0 or labels.max() >= cfg.score.num_classes):
        raise StageInputError(f"reference.path: {cfg.reference.path} has labels outside "
                              f"[0, score.num_classes={cfg.score.num_classes})")
    return FileSamples(samples, labels)


CACHED_LATENTS_KEY = "latent"  # a batch of the latent cache (data/latents.py LatentStreamDataset)


def check_latent_cache(cfg: RunConfig, up: Upstream, latent: Optional[LatentSpec]) -> LatentSpec:
    """The cache named by data.latents must hold latents of the tokenizer inputs.tokenizer names, with the same
    statistics; returns the normalisation to train with (the artifact's, else the one measured over the cache)."""
    from ..data.latents import read_latent_info
    info = read_latent_info(cfg.data.latents)
    if info["tokenizer"] != up.info.id:
        raise StageInputError(f"data.latents: {cfg.data.latents} holds latents of tokenizer {info['tokenizer']}, but "
                              f"inputs.tokenizer={up.path} is tokenizer {up.info.id}; re-run `dmvae-scale data "
                              f"cache-latents` with this tokenizer, or name the tokenizer the cache was made with")
    if info.get("weights", cfg.inputs.tokenizer_weights) != cfg.inputs.tokenizer_weights:
        raise StageInputError(f"data.latents: {cfg.data.latents} was encoded with the {info['weights']} weights, but "
                              f"inputs.tokenizer_weights={cfg.inputs.tokenizer_weights}; use the same weights")
    cached = LatentSpec(**info["latent"])
    want = latent if latent is not None else cached
    same = (cached.channels, cached.height, cached.width) == (want.channels, want.height, want.width) and \
        abs(cached.mean - want.mean) <= 1e-6 * max(1.0, abs(want.mean)) and \
        abs(cached.scale - want.scale) <= 1e-6 * max(1.0, abs(want.scale))
    if not same:
        raise StageInputError(f"data.latents: {cfg.data.latents} carries latent statistics {cached} but "
                              f"inputs.tokenizer={up.path} has {want}; re-run `dmvae-scale data cache-latents`")
    if latent is None:  # the reference stage on a cache: the statistics measured over the whole cache
        measured = info.get("measured", info["latent"])
        return LatentSpec(**measured)
    return latent


class FlowMatchingStage(_MeasuresLatentStats, _StageBase):
    """Stage 2 (reference: the real score on p_r's samples, latent statistics measured first) and stage 5
    (generator: a DiT on the final tokenizer's normalised latents, statistics from its artifact)."""

    def __init__(self, cfg: RunConfig, rank: int = 0):
        super().__init__(cfg, rank)
        self.name = cfg.stage
        self.model_name = "real_score" if cfg.stage == "reference" else "generator"
        self.export = (self.model_name,)
        self.tokenizer: Optional[Tokenizer] = None
        self.latent: Optional[LatentSpec] = None
        uses_tokenizer = cfg.stage == "generator" or cfg.reference.kind in ("tokenizer", "noisy_tokenizer")
        used = {"inputs.tokenizer"} if uses_tokenizer else set()
        if cfg.stage == "reference" and cfg.reference.kind == "file":
            used.add("reference.path")
        _reject_unused(cfg, used)
        self.cached = cfg.data.latents is not None  # batches carry cached latents: no encoder runs here
        if self.cached and not (cfg.stage == "generator" or cfg.reference.kind == "tokenizer"):
            raise StageInputError(f"data.latents: reference.kind={cfg.reference.kind} does not train on a tokenizer's "
                                  f"latents; remove data.latents")
        self.teacher_spec = None if self.cached else stage_teacher_spec(cfg)
        if uses_tokenizer:
            up = open_upstream("inputs.tokenizer", cfg.inputs.tokenizer, cfg.inputs.tokenizer_weights)
            self.tokenizer = _tokenizer_from(cfg, up).eval().requires_grad_(False)
            _check_score_shape(cfg, self.tokenizer.latent_shape, f"the tokenizer of inputs.tokenizer={up.path}")
            self.upstream = {"tokenizer": up.info.id}
            self.frozen_encoder = None if self.cached else self.tokenizer.encoder
            if cfg.stage == "generator":
                if up.info.latent is None:
                    raise StageInputError(
                        f"inputs.tokenizer: {up.path}/artifact.json has no measured latent statistics (key "
                        f"'latent'); the generator needs them: hand it a decoder-stage artifact")
                self.latent = up.info.latent
            if self.cached:
                self.latent = check_latent_cache(cfg, up, self.latent)
        self.source = _reference_source(cfg, self.tokenizer) if cfg.stage == "reference" else \
            TokenizerLatents(_latents_of(self.tokenizer, cfg.tokenizer.in_channels), self.tokenizer.latent_shape)
        self.score = LightningDiT(cfg.score)
        self._models = {self.model_name: ModelSpec(self.score, True, cfg.optim, ema=True)}
        if self.tokenizer is not None and not self.cached:
            self._models["tokenizer"] = ModelSpec(self.tokenizer, False)

    def needs_prepare(self) -> bool:
        return self.latent is None

    def prepare(self, batches):
        if not self.needs_prepare():
            return
        device = _device_of(self.score)
        g = torch.Generator(device=device).manual_seed(self.cfg.seed)
        mean, scale = measure_latent_stats(
            lambda b: self.source.sample(len(b["image"]), g, images=b.get(FEATURES_KEY, b["image"]),
                                         labels=b["label"])[0], batches, device)
        self.latent = LatentSpec(*self.source.shape, mean=mean, scale=scale)

    def step(self, batch, step, engines):
        if self.latent is None:
            raise RuntimeError("prepare() must measure the latent statistics before the first step")
        y = batch["label"]
        if CACHED_LATENTS_KEY in batch:  # data.latents: encoded once by this very tokenizer (checked at build)
            z = x = batch[CACHED_LATENTS_KEY]
            labels = y
            g, _ = self._rng(step, z)
        else:
            x = batch["image"]
            g, _ = self._rng(step, x)
            with torch.no_grad(), self.autocast():  # the frozen tokenizer's forward (for tokenizer references)
                z, labels = self.source.sample(len(x), g, images=batch.get(FEATURES_KEY, x), labels=y)
        z = self.latent.normalize(z)  # float32 from here on
        if labels is not None:
            labels = drop_labels(labels, self.cfg.score.num_classes, self.cfg.score.class_dropout, g)
        with self.autocast():
            loss = flow_matching_loss(engines[self.model_name], z, labels, g)
        engines[self.model_name].backward(loss)
        engines[self.model_name].step()
        return StepOutput({"fm_loss": loss.detach()}, images=len(x))

    def artifact(self):
        out = super().artifact()
        out["latent"] = self.latent
        if self.cfg.stage == "reference":
            out["extra"] = {"reference_kind": self.cfg.reference.kind, "conditional": bool(self.source.conditional)}
        return out


class DMDStage(_StageBase):
    """Stage 3: the tokenizer (encoder unfrozen per tokenizer.encoder.frozen) trains with reconstruction + GAN +
    lambda_DM * L_DM every k-th iteration; the fake score (initialised from the real one) takes a flow-matching step
    on detached latents every iteration; the real score stays frozen; the discriminator starts fresh."""

    name = "dmd"
    export = ("tokenizer", "fake_score", "discriminator")

    def __init__(self, cfg: RunConfig, rank: int = 0):
        super().__init__(cfg, rank)
        stage_teacher_spec(cfg)  # none: refuses teacher.remote
        _reject_unused(cfg, {"inputs.tokenizer", "inputs.reference"})
        up_tok = open_upstream("inputs.tokenizer", cfg.inputs.tokenizer, cfg.inputs.tokenizer_weights)
        self.tokenizer = _tokenizer_from(cfg, up_tok)  # trainability of the encoder: tokenizer.encoder.frozen
        _check_score_shape(cfg, self.tokenizer.latent_shape, f"the tokenizer of inputs.tokenizer={up_tok.path}")
        up_ref = open_upstream("inputs.reference", cfg.inputs.reference, "ema")
        if up_ref.info.latent is None:
            raise StageInputError(f"inputs.reference: {up_ref.path}/artifact.json has no latent statistics "
                                  f"(key 'latent'); re-run the reference stage, which measures them")
        ref_shape = (up_ref.info.latent.channels, up_ref.info.latent.height, up_ref.info.latent.width)
        if ref_shape != tuple(self.tokenizer.latent_shape):
            raise StageInputError(f"inputs.reference: {up_ref.path} models latents of shape {ref_shape} but the "
                                  f"tokenizer of inputs.tokenizer makes {tuple(self.tokenizer.latent_shape)}")
        _check_same(cfg.score, up_ref.cfg.score, "score", f"inputs.reference={up_ref.path}", _SCORE_SETTINGS)
        same_tokenizer = up_ref.info.upstream.get("tokenizer") == up_tok.info.id
        if same_tokenizer and up_ref.cfg.inputs.tokenizer_weights != cfg.inputs.tokenizer_weights:
            # One explicit choice: the reference latents and DMD's starting point come from the same weights.
            raise StageInputError(
                f"inputs.tokenizer_weights={cfg.inputs.tokenizer_weights} but the reference of inputs.reference="
                f"{up_ref.path} was trained on the {up_ref.cfg.inputs.tokenizer_weights} weights of the same "
                f"tokenizer; use inputs.tokenizer_weights={up_ref.cfg.inputs.tokenizer_weights}")
        self.latent = up_ref.info.latent  # z' = (z - mean) * scale in the reference's own normalisation
        self.conditional = bool(up_ref.info.extra.get("conditional", True))
        self.real_score = LightningDiT(cfg.score)
        up_ref.load(self.real_score, "real_score", "ema")
        self.real_score.eval().requires_grad_(False)
        self.fake_score = LightningDiT(cfg.score)
        up_ref.load(self.fake_score, "real_score", "ema")
        self.discriminator = PatchDiscriminator(cfg.discriminator, in_channels=cfg.tokenizer.in_channels)
        self.losses = AutoencoderLosses(cfg)
        self.upstream = {"tokenizer": up_tok.info.id, "reference": up_ref.info.id}
        self._models = {"tokenizer": ModelSpec(self.tokenizer, True, cfg.optim, ema=True),
                        "fake_score": ModelSpec(self.fake_score, True, cfg.optim),
                        "discriminator": ModelSpec(self.discriminator, True, discriminator_optim(cfg)),
                        "real_score": ModelSpec(self.real_score, False)}
        if self.losses.perceptual is not None:
            self._models["perceptual"] = ModelSpec(self.losses.perceptual, False)

    def t_range(self, step: int) -> tuple[float, float]:
        dm = self.cfg.dm
        return annealed_t_range(step, dm.t_min, dm.t_max, dm.t_anneal_steps, dm.t_anneal_min_final)

    def step(self, batch, step, engines):
        cfg = self.cfg
        x = _image_channels(batch["image"], cfg.tokenizer.in_channels)
        g, g_cpu = self._rng(step, x)
        labels = batch["label"] if self.conditional else None
        null = cfg.score.num_classes
        tok, fake = engines["tokenizer"], engines["fake_score"]
        metrics: dict[str, torch.Tensor] = {}
        k = cfg.dm.tokenizer_every
        if step % k == k - 1:  # the fake score has had k-1 updates on the current latents first
            with self.autocast():
                recon, z = tok(x)
            z = self.latent.normalize(z)  # float32: the DM difference must not be taken in bf16
            with self.autocast():  # both score forwards run under no_grad inside dm_loss
                ldm, dm_stats = dm_loss(z, labels, self.real_score, fake, cfg.dm.cfg_scale, null,
                                        self.t_range(step), g)
            loss, metrics = self.losses.tokenizer_loss(x, recon, step, engines["discriminator"],
                                                       tok.module.last_layer, g_cpu)
            loss = loss + cfg.dm.lambda_dm * ldm
            tok.backward(loss)
            tok.step()
            metrics.update(dm_stats, dm_loss=ldm.detach(), loss=loss.detach())
            if self.losses.gan_active(step):
                metrics.update(self.losses.discriminator_step(x, recon, engines["discriminator"], g_cpu))
            z = z.detach()
        else:
            with torch.no_grad(), self.autocast():
                z = tok.module.encode(x)
            z = self.latent.normalize(z)
        fake_labels = drop_labels(labels, null, cfg.score.class_dropout, g) if labels is not None else None
        with self.autocast():  # x_t and the model input share one float32 t (flow_matching_loss)
            fake_loss = flow_matching_loss(fake, z, fake_labels, g)
        fake.backward(fake_loss)
        fake.step()
        metrics["fake_fm_loss"] = fake_loss.detach()
        return StepOutput(metrics, images=len(x))

    def artifact(self):
        out = super().artifact()
        # The latents changed: their statistics are stale until the decoder stage measures them again.
        out["extra"] = {"latent_shape": list(self.tokenizer.latent_shape),
                        "normalised_with": dataclasses.asdict(self.latent), "conditional": self.conditional}
        return out


class TeacherStage(_StageBase):
    """Stage 0 (teacher): train the tokenizer's encoder network self-supervised (VICReg) on the images, where no SSL
    weights can be had. Geometry from the tokenizer section (encoder arch and patch size, image size), so the
    artifact's network is the `ssl` registry teacher and loads into a tokenizer's encoder as it is."""

    export = ("teacher",)

    def __init__(self, cfg: RunConfig, rank: int = 0):
        super().__init__(cfg, rank)
        self.name = cfg.stage
        _reject_unused(cfg, set())
        self.teacher_spec = stage_teacher_spec(cfg)  # None; refuses teacher.remote
        enc = cfg.tokenizer.encoder
        self.network = SSLEncoder(enc.arch, cfg.tokenizer.image_size, enc.patch_size, cfg.ssl.expander_dim)
        self.augment = ViewAugment(scale=(cfg.ssl.crop_min, 1.0))
        self._models = {"teacher": ModelSpec(self.network, True, cfg.optim, ema=True)}

    def step(self, batch, step, engines):
        x = batch["image"]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        _, g = self._rng(step, x)
        views = torch.cat([self.augment(x, g), self.augment(x, g)])
        net, s = engines["teacher"], self.cfg.ssl
        with self.autocast():
            z1, z2 = net(views).chunk(2)
        loss, terms = vicreg_loss(z1, z2, s.invariance_weight, s.variance_weight, s.covariance_weight)
        net.backward(loss)
        net.step()
        return StepOutput({"loss": loss.detach(), **terms}, images=len(x))


def build_stage(cfg: RunConfig, rank: int = 0):
    """The stage cfg.stage names, with its inputs checked and loaded (on the CPU)."""
    if cfg.stage == "teacher":
        return TeacherStage(cfg, rank)
    if cfg.stage in ("tokenizer", "decoder"):
        return AutoencoderStage(cfg, rank)
    if cfg.stage in ("reference", "generator"):
        return FlowMatchingStage(cfg, rank)
    if cfg.stage == "dmd":
        return DMDStage(cfg, rank)
    raise UserError(f"stage: unknown stage {cfg.stage!r}")


def save_stage_artifact(stage, emas: dict, cfg: RunConfig, directory: str | Path) -> ArtifactInfo:
    """Write what the stage hands on: raw weights of its exported models, EMA weights where kept, latent
    statistics, upstream ids, the resolved config and its hash."""
    plan = stage.artifact()
    modules = {name: stage.models()[name].module for name in plan["models"]}
    weights = {name: m.state_dict() for name, m in modules.items()}
    ema = {name: emas[name].module_state_dict(m) for name, m in modules.items() if name in emas}
    info = ArtifactInfo(stage=cfg.stage, models=list(weights), config_hash=config_hash(cfg), latent=plan["latent"],
                        upstream=plan["upstream"], extra=plan["extra"])
    return save_artifact(directory, info, weights, ema=ema or None, config_yaml=dump_yaml(cfg))
