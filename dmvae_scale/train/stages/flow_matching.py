"""Stage 2 (reference: the real score) and stage 5 (generator): flow matching on latents, and the reference
sample sources."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...artifacts import LatentSpec
from ...config import RunConfig, check_stage_inputs
from ..api import FEATURES_KEY
from ...method.flow import drop_labels, flow_matching_loss
from ...method.references import (FileSamples, GaussianMixture, NoisyTokenizerLatents, ReferenceSource,
                                 StandardGaussian, TokenizerLatents, random_means)
from ...models.dit import LightningDiT
from ...models.tokenizer import Tokenizer
from ..api import ModelSpec, StepOutput
from .common import (CACHED_LATENTS_KEY, StageInputError, Upstream, _MeasuresLatentStats, _StageBase,
                     _check_score_shape, _device_of, _image_channels, _tokenizer_from,
                     measure_latent_stats, open_upstream, stage_teacher_spec)


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


def check_latent_cache(cfg: RunConfig, up: Upstream, latent: Optional[LatentSpec]) -> LatentSpec:
    """The cache named by data.latents must hold latents of the tokenizer inputs.tokenizer names, with the same
    statistics; returns the normalisation to train with (the artifact's, else the one measured over the cache)."""
    from ...data.latents import read_latent_info
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
        check_stage_inputs(cfg)  # config.validate refuses data.latents where no tokenizer's latents are trained on
        self.cached = cfg.data.latents is not None  # batches carry cached latents: no encoder runs here
        self.teacher_spec = None if self.cached else stage_teacher_spec(cfg)
        if uses_tokenizer:
            up = open_upstream("inputs.tokenizer", cfg.inputs.tokenizer, cfg.inputs.tokenizer_weights,
                               cfg.inputs.tokenizer_sha256)
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
