"""Self-supervised training of the teacher: VICReg (Bardes, Ponce, LeCun 2022) and its image augmentations.

VICReg, for embeddings z1, z2 (B, E) of two augmented views of the same images:
    invariance  mean over batch and dims of (z1 - z2)^2
    variance    mean over dims of relu(1 - sqrt(var_j(z) + 1e-4)), for z1 and z2 (keeps every dim alive: no collapse)
    covariance  sum of squared off-diagonal entries of cov(z) / E, for z1 and z2 (decorrelates the dims)
    loss = 25 * invariance + 25 * variance + 1 * covariance   (the paper's weights)
Why this objective here: docs/method.md ("The self-supervised teacher"). Augmentations are pure functions of a
torch.Generator, so a run's views are a function of its seed and images seen. Pure tensor math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, detached terms). Computed in float32 whatever the input dtype."""
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) < 2:
        raise ValueError(f"vicreg_loss needs two (B >= 2, E) embeddings of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    n, e = z1.shape
    invariance = F.mse_loss(z1, z2)

    def variance(z):
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def covariance(z):
        zc = z - z.mean(dim=0)
        cov = zc.T @ zc / (n - 1)
        return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / e

    var = variance(z1) + variance(z2)
    cov = covariance(z1) + covariance(z2)
    loss = sim_weight * invariance + var_weight * var + cov_weight * cov
    return loss, {"invariance": invariance.detach(), "variance": var.detach(), "covariance": cov.detach()}


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> tuple[torch.Tensor, dict]:
    """SimCLR's NT-Xent: each of the 2B unit-normalised embeddings must pick its other view out of the 2B - 1 others
    (cross-entropy over cosine similarities / temperature). Float32 whatever the input dtype."""
    if z1.shape != z2.shape or z1.ndim != 2 or len(z1) < 2:
        raise ValueError(f"info_nce_loss needs two (B >= 2, E) embeddings of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"info_nce_loss: temperature must be > 0, got {temperature}")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an embedding is not its own positive
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    loss = F.cross_entropy(logits, target)
    top1 = (logits.argmax(dim=1) == target).float().mean()  # how often the other view is the nearest: a health gauge
    return loss, {"positive_top1": top1.detach()}


@dataclass(frozen=True)
class ViewAugment:
    """Random resized crop (area `scale`, aspect `ratio`), horizontal flip, brightness and contrast jitter.

    Colour jitter is on intensity only: the data may be grayscale replicated to RGB, and a hue change would tint it."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, S, S) in [-1, 1] -> one random view each, same shape, in [-1, 1]."""
        b = images.shape[0]

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)

        area = uniform(*self.scale)
        log_ratio = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_ratio)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop side as a fraction of the image side
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = uniform(0, 1) * (1 - w) * 2 - (1 - w)  # crop centre in [-1, 1] coordinates, crop inside the image
        cy = uniform(0, 1) * (1 - h) * 2 - (1 - h)
        sign = torch.where(torch.rand(b, generator=generator) < self.flip, -1.0, 1.0).double()
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        view = F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="border",
                             align_corners=False)
        gain = (1 + uniform(-self.contrast, self.contrast)).to(images).view(b, 1, 1, 1)
        shift = uniform(-self.brightness, self.brightness).to(images).view(b, 1, 1, 1)
        mean = view.mean(dim=(1, 2, 3), keepdim=True)
        return ((view - mean) * gain + mean + shift).clamp(-1.0, 1.0)
