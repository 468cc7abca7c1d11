"""The self-supervised teacher network: a ViT in the DINOv2 layout (models/vit.py) plus a VICReg expander.

The backbone is exactly the tokenizer's encoder class, at the tokenizer's image and patch size, so its last-layer
normalised patch tokens are one token per latent position and its weights load into a tokenizer's encoder as they are.
The expander (an MLP with BatchNorm, as in VICReg) exists only for the training objective and is dropped afterwards:
the teacher artifact hands on the backbone alone. Objective and augmentations: method/ssl.py; why VICReg: docs/method.md.
"""
from __future__ import annotations

import torch
from torch import nn

from .vit import VisionTransformer


class SSLEncoder(nn.Module):
    def __init__(self, arch: str, image_size: int, patch_size: int, expander_dim: int = 512):
        super().__init__()
        self.backbone = VisionTransformer(arch, image_size, patch_size)
        d = self.backbone.embed_dim
        self.backbone.mask_token.requires_grad_(False)  # DINOv2's masking token: no gradient ever reaches it
        self.expander = nn.Sequential(
            nn.Linear(d, expander_dim), nn.BatchNorm1d(expander_dim), nn.ReLU(),
            nn.Linear(expander_dim, expander_dim), nn.BatchNorm1d(expander_dim), nn.ReLU(),
            nn.Linear(expander_dim, expander_dim))

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D): the mean of the patch tokens (the representation a probe reads)."""
        return self.backbone(images).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, expander_dim) embeddings for the VICReg loss."""
        return self.expander(self.pooled(images))
