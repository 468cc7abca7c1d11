"""Models rebuilt from stage artifacts for evaluation and sampling: the tokenizer, and the generator with the tokenizer
its latents belong to. Every loaded file is checked (hash, keys, shapes, upstream id); nothing is silently skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dmvae_scale.artifacts import ArtifactError, ArtifactInfo, LatentSpec, load_artifact, load_into, read_artifact_info
from dmvae_scale.config import RunConfig, load_config
from dmvae_scale.errors import UserError


def _artifact_config(path: Path) -> RunConfig:
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ArtifactError(f"{config_file} is missing; an artifact must carry the config that made it")
    return load_config(config_file)


def _weights_of(path: Path, model: str, which: str) -> tuple[ArtifactInfo, dict]:
    info, weights = load_artifact(path, which=which)
    if model not in weights:
        raise ArtifactError(f"{path}: holds no '{model}' weights (stage '{info.stage}', models {info.models})")
    return info, weights[model]


def load_tokenizer(path: str | Path, which: str = "ema"):
    """(Tokenizer in eval mode, its artifact info, the config it was trained with)."""
    from dmvae_scale.models.tokenizer import build_tokenizer

    path = Path(path)
    info, state = _weights_of(path, "tokenizer", which)
    cfg = _artifact_config(path)
    # The artifact holds every weight, encoder included, and names its kind (DMVAE or the KL-VAE baseline).
    tokenizer = build_tokenizer(cfg.tokenizer, load_pretrained=False, kind=info.extra.get("tokenizer_kind"))
    load_into(tokenizer, state, f"'tokenizer' from {path} ({which} weights)")
    return tokenizer.eval().requires_grad_(False), info, cfg


@dataclass
class GeneratorBundle:
    generator: object  # LightningDiT
    tokenizer: object  # Tokenizer
    latent: LatentSpec
    cfg: RunConfig  # the generator run's config (sampler section, score model shape)
    info: ArtifactInfo
    tokenizer_path: Path


def load_generator(path: str | Path, which: str = "ema", tokenizer_path: Optional[str | Path] = None
                   ) -> GeneratorBundle:
    """The generator DiT, its latent normalisation and the tokenizer that decodes its latents.

    The tokenizer is the generator's upstream artifact (its config's inputs.tokenizer unless `tokenizer_path` says
    where it lies now); its id must equal the one recorded in the generator's artifact.json.
    """
    from dmvae_scale.models.dit import LightningDiT

    path = Path(path)
    info, state = _weights_of(path, "generator", which)
    if info.latent is None:
        raise ArtifactError(f"{path / 'artifact.json'}: no latent statistics; not a generator-stage artifact")
    cfg = _artifact_config(path)
    generator = LightningDiT(cfg.score)
    load_into(generator, state, f"'generator' from {path} ({which} weights)")
    tok_path = Path(tokenizer_path) if tokenizer_path else (Path(cfg.inputs.tokenizer) if cfg.inputs.tokenizer
                                                             else None)
    if tok_path is None:
        raise UserError(f"{path}: its config names no inputs.tokenizer; pass the tokenizer artifact (--tokenizer)")
    expected = info.upstream.get("tokenizer")
    found = read_artifact_info(tok_path).id
    if expected and found != expected:
        raise UserError(f"tokenizer artifact {tok_path} is {found}, but generator {path} was trained on the latents "
                        f"of {expected}; pass that tokenizer (--tokenizer)")
    tokenizer, _, _ = load_tokenizer(tok_path, cfg.inputs.tokenizer_weights)
    return GeneratorBundle(generator.eval().requires_grad_(False), tokenizer, info.latent, cfg, info, tok_path)
