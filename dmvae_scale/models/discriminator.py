"""PatchGAN discriminator, differentiable augmentation (DiffAugment) and the consistency (bCR) term.

PatchGAN (Isola et al. 2017, N-layer variant as in taming-transformers): stride-2 4x4 convs that double the width
(capped at 8x base), then two stride-1 4x4 convs; the output is a map of real/fake logits, one per image patch.
GroupNorm instead of BatchNorm: the discriminator then does not depend on batch composition, needs no SyncBN
across data-parallel workers, and gives the same logits for an image whatever else is in its batch (which the
consistency term relies on).

DiffAugment (Zhao et al. 2020): colour (brightness, saturation, contrast), translation (up to 1/8 of the side,
zero fill) and cutout (a zeroed square of half the side). Every op is differentiable in the images and every random
draw comes from the torch.Generator passed in, so a fixed generator state reproduces the augmentation exactly.
Pass a generator on the images' device: the draws then never leave it (no host sync in the training step).
Real and fake batches go through the same policy (each call draws its own parameters).
Losses live in method/; this file holds modules and the penalty's raw form only.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..config import DiscriminatorConfig
from ..errors import UserError


class PatchDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, in_channels: int = 3):
        super().__init__()
        if cfg.num_layers < 1 or cfg.base_channels <= 0:
            raise UserError(f"discriminator: need num_layers >= 1 and base_channels > 0, got "
                            f"num_layers={cfg.num_layers}, base_channels={cfg.base_channels}")
        base = cfg.base_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = base
        for n in range(1, cfg.num_layers + 1):
            prev, width = width, base * min(2 ** n, 8)
            stride = 2 if n < cfg.num_layers else 1  # the last widening conv keeps resolution, as in PatchGAN
            layers += [nn.Conv2d(prev, width, 4, stride, 1, bias=False),
                       nn.GroupNorm(math.gcd(32, width), width), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 1, h, w) logits, one per patch."""
        return self.net(images)


def _on(generator: torch.Generator, like: torch.Tensor) -> torch.device:
    # Draw where the generator lives. The stages pass their device generator (step_generators' first), so on a GPU
    # the draws stay on the GPU and no host copy or sync happens; a CPU generator with GPU images still works
    # (the draws are copied over), it only costs a host-to-device copy per draw.
    return generator.device


def _uniform(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    out = torch.rand(*shape, generator=generator, device=_on(generator, like))
    return out.to(device=like.device, dtype=like.dtype, non_blocking=True)


def _randint(high: int, shape: Sequence[int], generator: torch.Generator, device) -> torch.Tensor:
    out = torch.randint(0, high, tuple(shape), generator=generator, device=generator.device)
    return out.to(device, non_blocking=True)


def augment_color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = len(x)
    x = x + (_uniform((b, 1, 1, 1), g, x) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform((b, 1, 1, 1), g, x) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform((b, 1, 1, 1), g, x) + 0.5) + mean  # contrast


def augment_translation(x: torch.Tensor, g: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio*side pixels per axis; vacated pixels become 0."""
    b, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = _randint(2 * sy + 1, (b, 1, 1), g, x.device) - sy
    dx = _randint(2 * sx + 1, (b, 1, 1), g, x.device) - sx
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row for each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    shifted = torch.gather(x.reshape(b, c, h * w), 2, index).view(b, c, h, w)
    return shifted * valid.to(x.dtype)


def augment_cutout(x: torch.Tensor, g: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of ratio*side per image, its centre anywhere in the image."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(h + (1 - ch % 2), (b, 1, 1), g, x.device)
    cx = _randint(w + (1 - cw % 2), (b, 1, 1), g, x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= cy - ch // 2) & (rows < cy - ch // 2 + ch) & (cols >= cx - cw // 2) & (cols < cx - cw // 2 + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}


class DiffAugment(nn.Module):
    """Apply the policy's ops in order; `generator` supplies every random draw (pass the same state to reproduce)."""

    def __init__(self, policy: Sequence[str] = ("color", "translation", "cutout")):
        super().__init__()
        unknown = [p for p in policy if p not in AUGMENTS]
        if unknown:
            raise UserError(f"DiffAugment policy: unknown ops {unknown}, expected a subset of {list(AUGMENTS)}")
        self.policy = tuple(policy)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for name in self.policy:
            x = AUGMENTS[name](x, generator)
        return x


def consistency_term(discriminator: nn.Module, images: torch.Tensor, augment: DiffAugment,
                     generator: torch.Generator, logits: torch.Tensor | None = None) -> torch.Tensor:
    """bCR (Zhao et al. 2021): mean ||D(aug(x)) - D(x)||^2 over logits. Pass `logits` = D(x) to reuse them."""
    if logits is None:
        logits = discriminator(images)
    return (discriminator(augment(images, generator)) - logits).pow(2).mean()
