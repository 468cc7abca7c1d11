"""The KL-VAE baseline tokenizer (SD-VAE style): the comparison the paper's Table 1 draws.

Trainable convolutional encoder (the decoder's mirror: conv_in, one level per channel multiplier with `num_res_blocks`
ResNet blocks and a 2x strided-conv downsample between levels, a middle with self-attention, GroupNorm + SiLU +
conv_out), then a 1x1 conv `bottleneck` to 2C channels: the mean and log-variance of a diagonal Gaussian posterior.
The decoder is DMVAE's ConvDecoder with the same config, and the latent grid has the same shape (image_size /
encoder.patch_size a side, C channels), so a generator trains on either latent space with the same settings.

`encode` returns the posterior mean (what latent statistics, caching and the generator use); training samples
z = mean + std * eps and adds kl_weight * KL(q(z|x) || N(0, I)) (method/kl.py, docs/method.md "The KL-VAE baseline").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TokenizerConfig
from ..errors import UserError
from .conv import AttentionBlock, ConvDecoder, EncoderDecoder, ResnetBlock, group_norm


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SD's asymmetric padding keeps the exact 2x


class ConvEncoder(nn.Module):
    """Image (B, in_channels, S, S) -> feature map (B, width, S/factor, S/factor)."""

    def __init__(self, cfg: TokenizerConfig, factor: int):
        super().__init__()
        dec = cfg.decoder
        steps = int(round(math.log2(factor))) if factor >= 1 else -1
        if steps < 0 or 2 ** steps != factor or steps > len(dec.channel_mult) - 1:
            raise UserError(f"tokenizer.encoder.patch_size={factor}: the KL-VAE encoder downsamples 2x between "
                            f"levels of tokenizer.decoder.channel_mult={list(dec.channel_mult)}, so at most "
                            f"{2 ** (len(dec.channel_mult) - 1)} and a power of two")
        widths = [dec.base_channels * m for m in dec.channel_mult]  # shallowest first
        ch = widths[0]
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels = []
        for i, width in enumerate(widths):
            blocks: list[nn.Module] = []
            for _ in range(dec.num_res_blocks):
                blocks.append(ResnetBlock(ch, width))
                ch = width
            if i < steps:
                blocks.append(Downsample(ch))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        mid: list[nn.Module] = [ResnetBlock(ch, ch)]
        if dec.mid_attention:
            mid.append(AttentionBlock(ch))
        mid.append(ResnetBlock(ch, ch))
        self.mid = nn.Sequential(*mid)
        self.norm_out = group_norm(ch)
        self.width = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return F.silu(self.norm_out(self.mid(h)))


class KLTokenizer(EncoderDecoder):
    """Encoder -> diagonal Gaussian posterior over the latent grid -> DMVAE's decoder."""

    LOGVAR_RANGE = (-30.0, 20.0)  # SD-VAE's clamp: keeps exp(logvar) finite in low precision

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.in_channels not in (1, 3):
            raise UserError(f"tokenizer.in_channels: {cfg.in_channels} is not supported; use 3 (RGB) or 1 (grayscale)")
        if cfg.image_size % cfg.encoder.patch_size:
            raise UserError(f"tokenizer.image_size: {cfg.image_size} is not a multiple of "
                            f"tokenizer.encoder.patch_size={cfg.encoder.patch_size}")
        self.cfg = cfg
        factor = cfg.encoder.patch_size
        self.encoder = ConvEncoder(cfg, factor)
        self.bottleneck = nn.Conv2d(self.encoder.width, 2 * cfg.latent_channels, 1)
        self.decoder = ConvDecoder(cfg.decoder, cfg.latent_channels, cfg.in_channels, factor=factor)
        self.latent_grid = cfg.image_size // factor

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, in_channels, S, S) in [-1, 1] -> (mean, logvar), each (B, C, h, w)."""
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"tokenizer expects {self.cfg.in_channels}-channel images, got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean, logvar = self.bottleneck(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*self.LOGVAR_RANGE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean: the deterministic latent the generator models."""
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, the latent it decodes, mean, logvar). sample=True decodes mean + std * eps (training the
        tokenizer); False decodes the mean (the latent the generator models: decoder fine-tuning)."""
        mean, logvar = self.posterior(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), z, mean, logvar
