"""A DINOv2-compatible vision transformer: the tokenizer's SSL encoder, and the loader of official weights.

Parameter names and shapes equal those of the official `dinov2_vit{s,b,l,g}14_pretrain.pth` files (layout learned from
facebookresearch/dinov2, `dinov2/models/vision_transformer.py` and `dinov2/layers/`, hub settings: LayerScale with
init 1.0, un-chunked blocks, no register tokens, SwiGLU-fused FFN for ViT-g), so those files load with a strict key
check. Only two tensors depend on the run's geometry, and the loader resamples both:
  - `pos_embed` (1, 1 + 37*37, D): the 37x37 patch grid is resized to image_size / patch_size with torch's
    antialiased bicubic (the PIL-style a=-0.5 kernel); the class position is kept. At the same grid it is an exact
    identity.
  - `patch_embed.proj.weight` (D, 3, 14, 14): resized to the run's patch size by the pseudo-inverse resize of FlexiViT
    (Beyer et al. 2023): with R that same antialiased bicubic resize of a 14x14 patch to p x p, the new kernel w'
    solves R^T w' = w in the least-norm sense, so <R x, w'> = <x, w> for every patch x when p >= 14 (an image
    upsampled patch by patch gives the same tokens); for p < 14 it is the least-squares best.
Both equal what timm's DINOv2 loader does (checked numerically against timm 1.0.15: identical tensors, identical
tokens), which is how the DMVAE reference code built its 256-px, 16-px-patch encoder. DINOv2's own run-time
interpolation differs slightly (legacy bicubic, a 0.1 offset in the scale factor).
The tokenizer uses the last layer's normalised patch tokens (class token dropped). Inputs are images in [-1, 1]; the
ImageNet mean/std normalisation DINOv2 was trained with is applied inside `forward`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..artifacts import sha256_of_file  # noqa: F401 (re-exported: the weights files' check)
from ..errors import UserError
from .layers import SwiGLU

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsFileError(UserError):
    """A pretrained-weights file that is missing, corrupt, or does not fit the model."""


@dataclass(frozen=True)
class ViTArch:
    dim: int
    depth: int
    heads: int
    ffn: str  # "mlp" (GELU, hidden 4D) or "swiglu" (DINOv2's fused SwiGLU, hidden 2/3 * 4D rounded up to 8)


VIT_ARCHS = {
    "vit_tiny": ViTArch(96, 4, 3, "mlp"),  # CPU demos and tests; no official weights exist
    "vit_s": ViTArch(384, 12, 6, "mlp"),
    "vit_b": ViTArch(768, 12, 12, "mlp"),
    "vit_l": ViTArch(1024, 24, 16, "mlp"),
    "vit_g": ViTArch(1536, 40, 24, "swiglu"),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # DINOv2 packs qkv as (3, heads, head_dim) along the output features.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def dinov2_swiglu_hidden(hidden: int) -> int:
    """DINOv2's SwiGLUFFNFused width for an MLP width `hidden`: 2/3 of it, rounded up to a multiple of 8."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden=dinov2_swiglu_hidden(4 * dim)) if ffn == "swiglu" else Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINOv2-layout ViT for a fixed image size and patch size; `forward` returns last-layer normalised patch tokens."""

    def __init__(self, arch: str, image_size: int, patch_size: int):
        super().__init__()
        if arch not in VIT_ARCHS:
            raise UserError(f"tokenizer.encoder.arch: unknown '{arch}', expected one of {', '.join(VIT_ARCHS)}")
        if image_size % patch_size:
            raise UserError(f"tokenizer.image_size: {image_size} is not a multiple of "
                            f"tokenizer.encoder.patch_size={patch_size}")
        spec = VIT_ARCHS[arch]
        self.arch, self.image_size, self.patch_size = arch, image_size, patch_size
        self.grid = image_size // patch_size
        self.embed_dim = spec.dim
        self.grad_checkpointing = False  # recompute blocks in backward (end-to-end training of large encoders)

        self.patch_embed = PatchEmbed(patch_size, spec.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, spec.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, spec.dim))  # unused here; kept so official files load strictly
        self.blocks = nn.ModuleList([Block(spec.dim, spec.heads, spec.ffn) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.dim, eps=1e-6)
        # Not persistent: the state dict must hold exactly the official keys.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2's initialisation (timm style); it matters only for random encoders (demo, tests).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, grid*grid, D) last-layer normalised patch tokens."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"encoder built for {self.image_size}px images, got {tuple(images.shape[-2:])}")
        x = ((images + 1) * 0.5 - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)[:, 1:]

    def forward_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The same tokens as a feature map (B, D, grid, grid)."""
        tokens = self(images)
        return tokens.transpose(1, 2).reshape(len(tokens), self.embed_dim, self.grid, self.grid)


# ----------------------------------------------------------------------------------------------------------------------
# Resampling official weights to the run's geometry
# ----------------------------------------------------------------------------------------------------------------------

def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g0*g0, D) -> (1, 1 + grid*grid, D): bicubic resize of the patch grid, class position kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    g0 = math.isqrt(patch_pos.shape[1])
    if g0 * g0 != patch_pos.shape[1]:
        raise ValueError(f"pos_embed holds {patch_pos.shape[1]} patch positions, not a square grid")
    dim = pos_embed.shape[-1]
    square = patch_pos.reshape(1, g0, g0, dim).permute(0, 3, 1, 2).double()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, resized], dim=1)


def _resize_matrix(old: int, new: int) -> torch.Tensor:
    """Matrix R (new*new, old*old) of the antialiased bicubic resize of an old x old patch."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    out = F.interpolate(basis, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(old * old, new * new).T


def resample_patch_kernel(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(D, C, p0, p0) -> (D, C, p, p) by pseudo-inverse resize: <resize(x), w'> = <x, w> for all patches x (p >= p0)."""
    d, c, p0, _ = weight.shape
    if p0 == patch_size:
        return weight.clone()
    resize = _resize_matrix(p0, patch_size)  # (p*p, p0*p0)
    flat = weight.double().reshape(d * c, p0 * p0).T  # (p0*p0, D*C)
    new = torch.linalg.pinv(resize.T) @ flat  # least-norm solution of R^T w' = w
    return new.T.reshape(d, c, patch_size, patch_size).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------

def verify_sha256(path: str | Path, expected: str | None, what: str) -> None:
    """Raise WeightsFileError naming the file, the expected and the actual hash when they differ."""
    if not expected:
        return
    actual = sha256_of_file(path)
    if actual.lower() != expected.strip().lower():
        raise WeightsFileError(f"{what} {path}: sha256 mismatch: expected {expected.strip().lower()}, got {actual} "
                               f"(wrong or corrupt file)")


def _name_keys(keys: set[str], limit: int = 8) -> str:
    names = sorted(keys)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_dinov2_weights(model: VisionTransformer, path: str | Path, sha256: str | None = None) -> VisionTransformer:
    """Load an official DINOv2 checkpoint into `model` strictly, resampling position grid and patch kernel."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"DINOv2 weights file not found: {path} (tokenizer.encoder.weights; expected an "
                               f"official dinov2_vit*14_pretrain.pth)")
    verify_sha256(path, sha256, "DINOv2 weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsFileError(f"DINOv2 weights file {path}: not a readable torch state dict ({exc})") from None
    if not isinstance(state, dict):
        raise WeightsFileError(f"DINOv2 weights file {path}: holds a {type(state).__name__}, not a state dict")

    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise WeightsFileError(
            f"DINOv2 weights file {path} does not fit encoder '{model.arch}': missing keys [{_name_keys(missing)}]; "
            f"unexpected keys [{_name_keys(unexpected)}] (use the non-register dinov2_vit*14_pretrain.pth of the "
            f"same size as tokenizer.encoder.arch)")

    # Resample the two geometry-dependent tensors, then every shape must match exactly.
    pos, kernel = state["pos_embed"], state["patch_embed.proj.weight"]
    if pos.ndim == 3 and pos.shape[-1] == model.embed_dim:
        state["pos_embed"] = resample_pos_embed(pos, model.grid)
    if kernel.ndim == 4 and kernel.shape[:2] == expected["patch_embed.proj.weight"].shape[:2]:
        state["patch_embed.proj.weight"] = resample_patch_kernel(kernel, model.patch_size)
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise WeightsFileError(f"DINOv2 weights file {path}: '{key}' has shape {tuple(state[key].shape)}, encoder "
                                   f"'{model.arch}' needs {tuple(ref.shape)} (a checkpoint of another model size?)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model
