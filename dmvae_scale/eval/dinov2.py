"""DINOv2 features for FD_DINOv2 (Stein et al. 2023): the last layer's normalised class token at 224 px.

The network is our DINOv2-layout ViT (models/vit.py) loaded from an official `dinov2_vit*14_pretrain.pth`; nothing is
downloaded. Images are resized to 224 px (bicubic, antialiased) as DINOv2's evaluation transforms do. The position grid
is resampled from 37x37 to 16x16 once at load (models/vit.py), where DINOv2's hub model interpolates at run time with a
slightly different scale factor, so values are close to, not bit-equal with, other FD_DINOv2 implementations.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmvae_scale.models.vit import VIT_ARCHS, VisionTransformer, load_dinov2_weights, sha256_of_file

DINOV2_IMAGE_SIZE = 224
DINOV2_PATCH = 14


class DinoV2Features(nn.Module):
    """uint8 N x 3 x H x W -> {"pool": N x D class tokens}; no logits."""

    has_logits = False

    def __init__(self, vit: VisionTransformer, weights_sha256: str):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.dim = vit.embed_dim
        self.name = f"dinov2-{vit.arch}14-cls-{DINOV2_IMAGE_SIZE}"
        self.fingerprint = weights_sha256

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("DinoV2Features takes uint8 N x 3 x H x W; convert with eval.images.as_uint8_nchw")
        x = images.float().div(127.5).sub(1.0)
        if x.shape[-2:] != (DINOV2_IMAGE_SIZE, DINOV2_IMAGE_SIZE):
            x = F.interpolate(x, size=(DINOV2_IMAGE_SIZE, DINOV2_IMAGE_SIZE), mode="bicubic", align_corners=False,
                              antialias=True).clamp(-1.0, 1.0)
        # The ViT's forward drops the class token (the tokenizer wants patch tokens); run its parts to keep it.
        vit = self.vit
        x = ((x + 1) * 0.5 - vit.pixel_mean) / vit.pixel_std
        tokens = vit.patch_embed(x)
        tokens = torch.cat([vit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + vit.pos_embed
        for block in vit.blocks:
            tokens = block(tokens)
        return {"pool": vit.norm(tokens)[:, 0].float()}


def load_dinov2(weights: str | Path, arch: str = "vit_l", device: str | torch.device = "cpu") -> DinoV2Features:
    """DINOv2 ViT-{s,b,l,g}/14 from an official weights file (checked strictly by models.vit)."""
    if arch not in VIT_ARCHS:
        from dmvae_scale.errors import UserError
        raise UserError(f"DINOv2 arch '{arch}' is unknown; use one of {', '.join(VIT_ARCHS)}")
    vit = VisionTransformer(arch, DINOV2_IMAGE_SIZE, DINOV2_PATCH)
    load_dinov2_weights(vit, weights)
    return DinoV2Features(vit, sha256_of_file(weights)).to(device)
