"""The DMVAE tokenizer: SSL ViT encoder -> per-token MLP bottleneck -> latent grid -> convolutional decoder.

Deterministic (no KL): `encode` returns the bottleneck output itself. The latent grid is image_size / patch_size
tokens a side, so the decoder must upsample by exactly the encoder's patch size.

The decoder is SD/Flux-style: conv_in, a middle (ResNet block, self-attention, ResNet block), then one level per
channel multiplier from the deepest to the shallowest with `num_res_blocks` ResNet blocks each (the count per level,
as docs/method.md states it: 3 for ImageNet; Flux's own `num_res_blocks=2` means the same 3 decoder blocks), then
GroupNorm + SiLU + conv_out. Each level transition doubles the resolution (nearest 2x + conv), nearest the output
first when fewer steps are needed. A factor that needs one 2x step more than there are transitions gets it on the
latent grid itself, before conv_in, as the DMVAE reference decoder does (ImageNet 256: [1, 2, 4, 4] and patch 16 ->
4 steps; the demo: [1, 2, 2] and patch 4 -> 2 steps, one per transition).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import Artifact, load_into
from ..config import DecoderConfig, TokenizerConfig
from ..errors import UserError
from .vit import VisionTransformer, load_dinov2_weights


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (the decoder's middle)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def upsampling_plan(channel_mult: tuple[int, ...], factor: int) -> tuple[bool, list[bool]]:
    """Where the decoder doubles resolution for a total `factor`: (on the latent?, [after level i, deepest first]).

    The last level (shallowest) never upsamples; the transitions nearest the output upsample first. Raises UserError
    when the factor is not a power of two or needs more 2x steps than levels.
    """
    levels = len(channel_mult)
    steps = int(round(math.log2(factor))) if factor >= 1 else -1
    if steps < 0 or 2 ** steps != factor or steps > levels:
        reachable = ", ".join(str(2 ** s) for s in range(levels + 1))
        raise UserError(
            f"tokenizer.encoder.patch_size={factor}: the decoder must upsample the latent grid by the patch size, but "
            f"tokenizer.decoder.channel_mult={list(channel_mult)} ({levels} levels) can upsample by {reachable} only "
            f"(2x per level transition, plus one on the latent grid); change one of the two")
    transitions = levels - 1
    on_latent = steps > transitions
    n_trans = min(steps, transitions)
    after_level = [transitions - n_trans <= i < transitions for i in range(levels)]
    return on_latent, after_level


class ConvDecoder(nn.Module):
    """Latent grid (B, C, h, w) -> image (B, out_channels, h*factor, w*factor)."""

    def __init__(self, cfg: DecoderConfig, latent_channels: int, out_channels: int, factor: int):
        super().__init__()
        if not cfg.channel_mult or min(cfg.channel_mult) <= 0 or cfg.num_res_blocks < 1 or cfg.base_channels <= 0:
            raise UserError(f"tokenizer.decoder: need positive channel_mult entries, base_channels > 0 and "
                            f"num_res_blocks >= 1, got channel_mult={list(cfg.channel_mult)}, "
                            f"base_channels={cfg.base_channels}, num_res_blocks={cfg.num_res_blocks}")
        self.factor = factor
        on_latent, after_level = upsampling_plan(tuple(cfg.channel_mult), factor)
        widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]  # deepest first
        ch = widths[0]
        self.upsample_latent = Upsample(latent_channels) if on_latent else nn.Identity()
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        mid: list[nn.Module] = [ResnetBlock(ch, ch)]
        if cfg.mid_attention:
            mid.append(AttentionBlock(ch))
        mid.append(ResnetBlock(ch, ch))
        self.mid = nn.Sequential(*mid)
        levels = []
        for width, up in zip(widths, after_level):
            blocks: list[nn.Module] = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width))
                ch = width
            if up:
                blocks.append(Upsample(ch))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        self.norm_out = _group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight of the final conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.upsample_latent(z)))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Bottleneck(nn.Module):
    """Per-token MLP D -> 2D -> SiLU -> C."""

    def __init__(self, dim: int, latent_channels: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, latent_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(tokens)))


class _EncoderDecoder(nn.Module):
    """What every tokenizer kind shares: an `encoder` that can be frozen, a `decoder` whose last layer weighs the
    adversarial loss, and the latent grid's shape (`latent_grid`, set by the subclass)."""

    _encoder_trainable = True
    latent_grid: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.cfg.latent_channels, self.latent_grid, self.latent_grid)

    @property
    def encoder_trainable(self) -> bool:
        return self._encoder_trainable

    @property
    def last_layer(self) -> nn.Parameter:
        return self.decoder.last_layer

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Frozen: no gradients (and, for the ViT tokenizer, always in eval mode); trainable: end-to-end."""
        self._encoder_trainable = trainable
        self.encoder.requires_grad_(trainable)


class Tokenizer(_EncoderDecoder):
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
