"""The DMVAE tokenizer: SSL ViT encoder -> per-token MLP bottleneck -> latent grid -> convolutional decoder.

Deterministic (no KL): `encode` returns the bottleneck output itself. The latent grid is image_size / patch_size
tokens a side, so the decoder must upsample by exactly the encoder's patch size.

The decoder and the blocks both tokenizer kinds share live in models/conv.py.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import Artifact, load_into
from ..config import TokenizerConfig
from ..errors import UserError
from .conv import ConvDecoder, EncoderDecoder
from .vit import VisionTransformer, load_dinov2_weights


class Bottleneck(nn.Module):
    """Per-token MLP D -> 2D -> SiLU -> C."""

    def __init__(self, dim: int, latent_channels: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, latent_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(tokens)))


class Tokenizer(EncoderDecoder):
    """Encoder + bottleneck + decoder from a TokenizerConfig.

    `load_pretrained`: load cfg.encoder.weights (when set) at construction; pass False when the weights will come
    from a tokenizer artifact anyway.
    """

    def __init__(self, cfg: TokenizerConfig, load_pretrained: bool = True):
        super().__init__()
        if cfg.in_channels not in (1, 3):
            raise UserError(f"tokenizer.in_channels: {cfg.in_channels} is not supported; use 3 (RGB) or 1 (grayscale)")
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = VisionTransformer(enc.arch, cfg.image_size, enc.patch_size)
        if load_pretrained and enc.weights:
            load_dinov2_weights(self.encoder, enc.weights, enc.sha256)
        self.bottleneck = Bottleneck(self.encoder.embed_dim, cfg.latent_channels)
        self.decoder = ConvDecoder(cfg.decoder, cfg.latent_channels, cfg.in_channels, factor=enc.patch_size)
        self.latent_grid = self.encoder.grid
        self.set_encoder_trainable(not enc.frozen)

    @classmethod
    def from_artifact(cls, artifact: "Artifact", which: str = "ema", cfg: TokenizerConfig | None = None
                      ) -> "Tokenizer":
        """The tokenizer an artifact holds (`which` weights), shaped by the artifact's own config unless `cfg` is
        given (a stage that checked its own tokenizer section against the artifact's). Every weight comes from the
        artifact, the encoder's included; a missing or misshapen key is an error naming the artifact."""
        cfg = cfg or artifact.config().tokenizer
        # The artifact names its kind (DMVAE or the KL-VAE baseline; a later stage's config need not repeat it).
        tokenizer = build_tokenizer(cfg, load_pretrained=False, kind=artifact.info.extra.get("tokenizer_kind"))
        load_into(tokenizer, artifact.state("tokenizer", which), f"'tokenizer' from {artifact.location} "
                                                                  f"({which} weights)")
        return tokenizer

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Frozen: no gradients and always in eval mode (stage 1, 4); trainable: end-to-end (stage 3)."""
        super().set_encoder_trainable(trainable)
        # DINOv2's mask_token only serves masked pre-training; a trainable parameter without gradients would trip
        # data-parallel wrappers that expect every trainable parameter to receive one.
        self.encoder.mask_token.requires_grad_(False)
        self.encoder.train(trainable and self.training)

    def train(self, mode: bool = True) -> "Tokenizer":
        super().train(mode)
        self.encoder.train(mode and self._encoder_trainable)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) in [-1, 1] -> latents (B, C, h, w)."""
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"tokenizer expects {self.cfg.in_channels}-channel images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # the SSL encoder sees grayscale as RGB
        return self.encode_from_features(self.encoder(x))

    def encode_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens (B, h*w, D), e.g. computed by a frozen teacher equal to it -> latents (B, C, h, w)."""
        c, h, w = self.latent_shape
        if features.ndim != 3 or features.shape[1:] != (h * w, self.encoder.embed_dim):
            raise ValueError(f"encoder features must have shape (B, {h * w}, {self.encoder.embed_dim}), "
                             f"got {tuple(features.shape)}")
        z = self.bottleneck(features.to(self.bottleneck.fc1.weight.dtype))  # (B, h*w, C)
        return z.transpose(1, 2).reshape(len(z), c, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, latents). `features`: the frozen encoder's tokens for x, computed elsewhere; the
        encoder is then skipped (refused while it trains: precomputed tokens would carry no gradient to it)."""
        if features is None:
            z = self.encode(x)
        elif self._encoder_trainable:
            raise ValueError("precomputed encoder features were given but the encoder is trainable; "
                             "they apply to a frozen encoder only")
        else:
            z = self.encode_from_features(features)
        return self.decode(z), z


def build_tokenizer(cfg: TokenizerConfig, load_pretrained: bool = True, kind: str | None = None) -> nn.Module:
    """The tokenizer `kind` (default tokenizer.kind) names: DMVAE's (this module) or the KL-VAE baseline
    (models/kl_vae.py). Both have encode(x) -> latents, decode(z), latent_shape, last_layer, bottleneck and
    set_encoder_trainable. A tokenizer artifact records its kind in its manifest (extra.tokenizer_kind): loaders pass
    that, since a later stage's config (decoder) need not repeat it."""
    if (kind or cfg.kind) == "kl_vae":
        from .kl_vae import KLTokenizer
        return KLTokenizer(cfg)
    return Tokenizer(cfg, load_pretrained=load_pretrained)
