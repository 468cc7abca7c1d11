"""The convolutional parts both tokenizer kinds share (the DMVAE tokenizer and the KL-VAE baseline): GroupNorm,
ResNet and self-attention blocks, the SD/Flux-style decoder with its upsampling plan, and the autoencoder base class
(an encoder that can be frozen, a decoder whose last layer weighs the GAN loss, the latent grid's shape).

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

from ..config import DecoderConfig
from ..errors import UserError


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
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
        self.norm = group_norm(channels)
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
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight of the final conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight

    def compile_units(self) -> list[nn.Module]:
        """What `compile: true` compiles (models/compile.py): each block of the middle and of every level."""
        return [*self.mid, *(block for level in self.levels for block in level)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.upsample_latent(z)))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class EncoderDecoder(nn.Module):
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
