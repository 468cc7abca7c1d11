"""The checkout's paths, its demo configs and the one artifact factory the tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO = CONFIGS / "demo"  # the demo pipeline's configs, one per stage
CLUSTER = REPO / "cluster"
TOOLS = REPO / "tools"
PACKAGE = REPO / "dmvae_scale"


def demo_config(stage: str, *overrides: str):
    """configs/demo/<stage>.yaml with key=value overrides, loaded (and so checked) as the CLI loads it."""
    from dmvae_scale.config import load_config
    return load_config(DEMO / f"{stage}.yaml", list(overrides))


def tokenizer_artifact(path, stage: str = "tokenizer", *, latent: Optional[tuple[float, float]] = None,
                       ema: bool = False, seed: int = 0):
    """A freshly initialised demo tokenizer saved as `stage`'s artifact at `path`, in the form the real stage writes
    (weights, optional EMA, the resolved config; latent=(mean, scale) adds the latent statistics).
    Returns (ArtifactInfo, Tokenizer, RunConfig)."""
    import torch

    from dmvae_scale.artifacts import ArtifactInfo, LatentSpec, save_artifact
    from dmvae_scale.config import config_hash, dump_yaml
    from dmvae_scale.models.tokenizer import Tokenizer

    cfg = demo_config(stage)
    torch.manual_seed(seed)
    tok = Tokenizer(cfg.tokenizer, load_pretrained=False).eval()
    spec = LatentSpec(*tok.latent_shape, mean=latent[0], scale=latent[1]) if latent else None
    weights = {"tokenizer": tok.state_dict()}
    info = save_artifact(path, ArtifactInfo(cfg.stage, [], config_hash(cfg), spec), weights,
                         ema=weights if ema else None, config_yaml=dump_yaml(cfg))
    return info, tok, cfg
