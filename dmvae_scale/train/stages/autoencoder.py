"""Stage 1 (tokenizer) and stage 4 (decoder): reconstruction + GAN losses and the autoencoder stage."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...artifacts import LatentSpec
from ...config import OptimConfig, RunConfig, check_stage_inputs
from ...data.artifact_store import artifact_info
from ..api import FEATURES_KEY
from ...method.gan import adaptive_weight, hinge_d_loss, hinge_g_loss
from ...method.kl import gaussian_kl
from ...models.discriminator import DiffAugment, PatchDiscriminator, consistency_term
from ...models.kl_vae import KLTokenizer
from ...models.tokenizer import build_tokenizer
from ..api import Engine, ModelSpec, StepOutput
from ..precision import ForwardPrecision
from .common import (_MeasuresLatentStats, _StageBase, _device_of, _image_channels,
                     _seeded_encoder_weights, _tokenizer_from, measure_latent_stats, no_param_grads, open_upstream,
                     stage_teacher_spec)


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
            from ...models.perceptual import build_perceptual
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
            check_stage_inputs(cfg)
            self.teacher_spec = stage_teacher_spec(cfg)
            self.tokenizer = build_tokenizer(cfg.tokenizer)
            if cfg.tokenizer.kind == "dmvae" and cfg.teacher.name in ("random_vit", "ssl"):
                _seeded_encoder_weights(cfg, self.tokenizer)
            if cfg.teacher.name == "ssl":
                self.upstream = {"teacher": artifact_info(cfg.teacher.artifact).id}
        else:
            check_stage_inputs(cfg)
            self.teacher_spec = stage_teacher_spec(cfg)
            up = open_upstream("inputs.tokenizer", cfg.inputs.tokenizer, cfg.inputs.tokenizer_weights,
                               cfg.inputs.tokenizer_sha256)
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
        g, _ = self._rng(step, x)  # the device generator: DiffAugment draws where the images are
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
