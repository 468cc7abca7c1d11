"""Stage 3: distribution-matching joint training of the tokenizer (docs/method.md)."""
from __future__ import annotations

import dataclasses

import torch

from ...config import RunConfig, check_stage_inputs
from ...method.dm_loss import annealed_t_range, dm_loss
from ...method.flow import drop_labels, flow_matching_loss
from ...models.discriminator import PatchDiscriminator
from ...models.dit import LightningDiT
from ..api import ModelSpec, StepOutput
from .autoencoder import AutoencoderLosses, discriminator_optim
from .common import (StageInputError, _SCORE_SETTINGS, _StageBase, _check_same, _check_score_shape, _image_channels,
                     _tokenizer_from, open_upstream, stage_teacher_spec)


class DMDStage(_StageBase):
    """Stage 3: the tokenizer (encoder unfrozen per tokenizer.encoder.frozen) trains with reconstruction + GAN +
    lambda_DM * L_DM every k-th iteration; the fake score (initialised from the real one) takes a flow-matching step
    on detached latents every iteration; the real score stays frozen; the discriminator starts fresh."""

    name = "dmd"
    export = ("tokenizer", "fake_score", "discriminator")

    def __init__(self, cfg: RunConfig, rank: int = 0):
        super().__init__(cfg, rank)
        stage_teacher_spec(cfg)  # none: refuses teacher.remote
        check_stage_inputs(cfg)
        up_tok = open_upstream("inputs.tokenizer", cfg.inputs.tokenizer, cfg.inputs.tokenizer_weights,
                               cfg.inputs.tokenizer_sha256)
        self.tokenizer = _tokenizer_from(cfg, up_tok)  # trainability of the encoder: tokenizer.encoder.frozen
        _check_score_shape(cfg, self.tokenizer.latent_shape, f"the tokenizer of inputs.tokenizer={up_tok.path}")
        up_ref = open_upstream("inputs.real_score", cfg.inputs.real_score, "ema", cfg.inputs.real_score_sha256)
        if up_ref.info.latent is None:
            raise StageInputError(f"inputs.real_score: {up_ref.path}/artifact.json has no latent statistics "
                                  f"(key 'latent'); re-run the reference stage, which measures them")
        ref_shape = (up_ref.info.latent.channels, up_ref.info.latent.height, up_ref.info.latent.width)
        if ref_shape != tuple(self.tokenizer.latent_shape):
            raise StageInputError(f"inputs.real_score: {up_ref.path} models latents of shape {ref_shape} but the "
                                  f"tokenizer of inputs.tokenizer makes {tuple(self.tokenizer.latent_shape)}")
        _check_same(cfg.score, up_ref.cfg.score, "score", f"inputs.real_score={up_ref.path}", _SCORE_SETTINGS)
        same_tokenizer = up_ref.info.upstream.get("tokenizer") == up_tok.info.id
        if same_tokenizer and up_ref.cfg.inputs.tokenizer_weights != cfg.inputs.tokenizer_weights:
            # One explicit choice: the reference latents and DMD's starting point come from the same weights.
            raise StageInputError(
                f"inputs.tokenizer_weights={cfg.inputs.tokenizer_weights} but the reference of inputs.real_score="
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
        self.upstream = {"tokenizer": up_tok.info.id, "real_score": up_ref.info.id}
        # raw tokenizer weights go forward (the official DMD keeps no tokenizer EMA); an EMA only on dm.tokenizer_ema
        self._models = {"tokenizer": ModelSpec(self.tokenizer, True, cfg.optim, ema=cfg.dm.tokenizer_ema),
                        "fake_score": ModelSpec(self.fake_score, True, cfg.optim),
                        "discriminator": ModelSpec(self.discriminator, True, discriminator_optim(cfg)),
                        "real_score": ModelSpec(self.real_score, False)}
        if self.losses.perceptual is not None:
            self._models["perceptual"] = ModelSpec(self.losses.perceptual, False)

    @property
    def flop_cycle(self) -> int:
        """Steps after which the step costs repeat (k-1 fake-score steps, then one tokenizer step): the FLOP count
        (train/reporting.py FlopCounter) averages over one cycle."""
        return self.cfg.dm.tokenizer_every

    def t_range(self, step: int) -> tuple[float, float]:
        dm = self.cfg.dm
        return annealed_t_range(step, dm.t_min, dm.t_max, dm.t_anneal_steps, dm.t_anneal_min_final)

    def step(self, batch, step, engines):
        cfg = self.cfg
        x = _image_channels(batch["image"], cfg.tokenizer.in_channels)
        g, _ = self._rng(step, x)  # one device generator for noise and DiffAugment (no host copies)
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
                                                       tok.module.last_layer, g)
            loss = loss + cfg.dm.lambda_dm * ldm
            tok.backward(loss)
            tok.step()
            metrics.update(dm_stats, dm_loss=ldm.detach(), loss=loss.detach())
            if self.losses.gan_active(step):
                metrics.update(self.losses.discriminator_step(x, recon, engines["discriminator"], g))
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
