"""The stages of docs/method.md behind one interface (train/api.py's Stage): which models, which are frozen, one step,
what the stage needs from the stage before and what it hands on.

    stage      trains                              frozen                       needs (config key)
    teacher    SSL encoder (VICReg; optional,      -                            -
               where no SSL weights exist)
    tokenizer  tokenizer (bottleneck+decoder),     SSL encoder                  -
               discriminator
    reference  real_score (DiT, flow matching)     tokenizer (if the reference  inputs.tokenizer (tokenizer refs)
                                                   is made of its latents)      or reference.path (file ref)
    dmd        tokenizer (all of it), fake_score,  real_score                   inputs.tokenizer, inputs.real_score
               fresh discriminator
    decoder    decoder, discriminator              encoder, bottleneck          inputs.tokenizer
    generator  generator (DiT, flow matching)      tokenizer                    inputs.tokenizer (with latent stats)

Frozen-encoder features: where the tokenizer's encoder is frozen (tokenizer with tokenizer.encoder.frozen, reference
on tokenizer latents, decoder, generator) the stage names the teacher equal to that encoder (`teacher_spec`, and the
module itself as `frozen_encoder`); a batch may then carry its features under "teacher_features" (computed in-process
or by the TeacherService, teacher_features.py wires either) and the stage runs only bottleneck and decoder on them. Stage 1
builds its encoder from the teacher (random_vit: the seeded network's weights; ssl: the teacher stage's), the later stages name the encoder of
their tokenizer artifact, so both sources give the same bits. DMD trains the encoder: no teacher there.

Every declared input is used or the stage refuses to start; a missing artifact, a latent shape or statistics mismatch,
or weights that do not load stop with an error naming the file and the config key. Stages build on the CPU; the
driver moves models to the device, wraps trainable ones in engines and calls prepare(), then step() per batch.
Random draws come from generators seeded by the step's seed, a function of (seed, rank, images seen) that the
loop sets before every step, so a resumed run continues the same noise.

One module per stage family: common.py (input checks, upstream artifacts, seeded step generators, latent statistics,
the teacher a stage names, the stage base class), teacher.py, autoencoder.py (tokenizer, decoder), flow_matching.py
(reference, generator), dmd.py; this module builds the stage a config names and writes its artifact.
"""
from __future__ import annotations

from pathlib import Path

from ...artifacts import ArtifactInfo, save_artifact
from ...config import RunConfig, config_hash, dump_yaml
from ...errors import UserError
from .autoencoder import AutoencoderLosses, AutoencoderStage, discriminator_optim
from .common import (StageInputError, Upstream, measure_latent_stats, no_param_grads, open_upstream, stage_teacher_spec,
                     step_generators)
from .dmd import DMDStage
from .flow_matching import FlowMatchingStage, check_latent_cache, load_reference_samples
from .teacher import TeacherStage


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


__all__ = ['AutoencoderLosses', 'AutoencoderStage', 'DMDStage', 'FlowMatchingStage', 'StageInputError', 'TeacherStage', 'Upstream', 'build_stage', 'check_latent_cache', 'discriminator_optim', 'load_reference_samples', 'measure_latent_stats', 'no_param_grads', 'open_upstream', 'save_stage_artifact', 'stage_teacher_spec', 'step_generators']
