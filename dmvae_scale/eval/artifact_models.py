"""Models rebuilt from stage artifacts (local or s3://) for evaluation and sampling: the generator with the tokenizer
its latents belong to. Every loaded file is checked (hash, keys, shapes, upstream id); nothing is silently skipped.
The tokenizer alone: data.artifact_store.open_tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dmvae_scale.artifacts import ArtifactError, ArtifactInfo, LatentSpec, load_into
from dmvae_scale.config import RunConfig
from dmvae_scale.data.artifact_store import artifact_info, open_artifact, open_tokenizer
from dmvae_scale.errors import UserError


@dataclass
class GeneratorBundle:
    generator: object  # LightningDiT
    tokenizer: object  # Tokenizer
    latent: LatentSpec
    cfg: RunConfig  # the generator run's config (sampler section, score model shape)
    info: ArtifactInfo
    tokenizer_path: str


def load_generator(path: str | Path, which: str = "ema", tokenizer_path: Optional[str | Path] = None
                   ) -> GeneratorBundle:
    """The generator DiT, its latent normalisation and the tokenizer that decodes its latents.

    The tokenizer is the generator's upstream artifact (its config's inputs.tokenizer unless `tokenizer_path` says
    where it lies now); its id must equal the one recorded in the generator's artifact.json.
    """
    from dmvae_scale.models.dit import LightningDiT

    artifact = open_artifact(path)
    info = artifact.info
    if info.latent is None:
        raise ArtifactError(f"{path}/artifact.json: no latent statistics; not a generator-stage artifact")
    cfg = artifact.config()
    generator = LightningDiT(cfg.score)
    load_into(generator, artifact.state("generator", which), f"'generator' from {path} ({which} weights)")
    tok_path = str(tokenizer_path) if tokenizer_path else cfg.inputs.tokenizer
    if tok_path is None:
        raise UserError(f"{path}: its config names no inputs.tokenizer; pass the tokenizer artifact (--tokenizer)")
    expected = info.upstream.get("tokenizer")
    found = artifact_info(tok_path).id
    if expected and found != expected:
        raise UserError(f"tokenizer artifact {tok_path} is {found}, but generator {path} was trained on the latents "
                        f"of {expected}; pass that tokenizer (--tokenizer)")
    tokenizer, _ = open_tokenizer(tok_path, cfg.inputs.tokenizer_weights)
    return GeneratorBundle(generator.eval().requires_grad_(False), tokenizer, info.latent, cfg, info, tok_path)
