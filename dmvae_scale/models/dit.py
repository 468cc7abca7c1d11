"""LightningDiT: a class-conditional diffusion transformer over a latent grid, predicting flow-matching velocity.

Patch embedding (patch 1 or 2) + fixed 2-D sin-cos position embedding, then adaLN-Zero blocks (RMSNorm, QK-norm,
2-D rotary embedding on q/k, SwiGLU), then an adaLN final layer. Modulation and output layers start at zero, so a
fresh model predicts exactly zero velocity and every block starts as the identity.

    model = LightningDiT(cfg)            # cfg: dmvae_scale.config.DiTConfig
    v = model(x, t, y)                   # x (B, C, H, W), t (B,) in [0, 1], y (B,) long; null label = num_classes
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DIT_SIZES, ConfigError, DiTConfig, DiTShape, resolve_shape  # noqa: F401 (re-exported)
from ..errors import UserError
from .attention import attention, select_backend_for
from .recompute import checkpointed
from .layers import (LabelEmbedding, RMSNorm, SwiGLU, TimestepEmbedding, apply_rope, rope_2d_tables,
                     sincos_pos_embed_2d)


class InputShapeError(UserError, ValueError):
    """A tensor handed to the model does not have the shape its config was built for."""


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 2-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Norms may run in float32 under autocast; the kernels want one dtype for q, k and v.
        out = attention(q.to(v.dtype), k.to(v.dtype), v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: each branch is shifted, scaled and gated by the conditioning vector."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, backend: str):
        super().__init__()
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = SelfAttention(dim, num_heads, qk_norm, backend)
        self.norm2 = RMSNorm(dim, affine=False)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim, affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class LightningDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        shape = resolve_shape(cfg)
        self.cfg = cfg
        self.depth, self.hidden_size, self.num_heads = shape.depth, shape.hidden_size, shape.num_heads
        self.in_channels, self.input_size, self.patch_size = cfg.in_channels, cfg.input_size, cfg.patch_size
        self.num_classes = cfg.num_classes
        self.grid = cfg.input_size // cfg.patch_size
        self.grad_checkpointing = cfg.grad_checkpointing
        dim = shape.hidden_size

        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embed = TimestepEmbedding(dim)
        self.y_embed = LabelEmbedding(cfg.num_classes, dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, shape.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attention) for _ in range(shape.depth))
        self.final = FinalLayer(dim, cfg.patch_size, cfg.in_channels)
        self.init_weights()

    @property
    def null_label(self) -> int:
        return self.num_classes

    def attention_backend(self, device="cpu", dtype: torch.dtype = torch.float32) -> str:
        """The attention backend this model's blocks use for activations on `device` in `dtype` (for logs)."""
        return select_backend_for(torch.device(device), dtype, self.blocks[0].attn.head_dim, self.cfg.attention)

    def init_weights(self) -> None:
        """DiT initialisation with adaLN-Zero: modulation and output layers zero, so the model starts at v = 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for zeroed in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise InputShapeError(
                f"LightningDiT was built for latents of shape (B, {want[0]}, {want[1]}, {want[2]}) (in_channels="
                f"{self.in_channels}, input_size={self.input_size}) but got {tuple(x.shape)}; set the model config's "
                "in_channels / input_size to the latent grid it will see")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity for latents x (B, C, H, W) at times t (B,) in [0, 1], labels y (B,); y=None: unconditional."""
        self._check_input(x)
        batch = x.shape[0]
        t = t.expand(batch) if t.dim() == 0 else t
        if y is None:
            y = torch.full((batch,), self.null_label, dtype=torch.long, device=x.device)

        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid
        pos, rope = self._fixed_encodings(x.device, tokens.dtype)
        tokens = tokens + pos
        cond = F.silu(self.t_embed(t) + self.y_embed(y))  # every modulation layer starts with SiLU

        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpointed(block, tokens, cond, rope)
            else:
                tokens = block(tokens, cond, rope)
        return self._unpatchify(self.final(tokens, cond))

    def _fixed_encodings(self, device: torch.device, dtype: torch.dtype):
        """(position embedding in `dtype`, RoPE tables or None), built once per (device, dtype) and kept.

        A plain dict, not buffers: nothing to save, to keep in float32 under a bf16 cast, or to re-create after a
        meta-device init. Tables built under inference mode are kept apart (autograd refuses them later)."""
        key = (device, dtype, torch.is_inference_mode_enabled())
        cache = self.__dict__.setdefault("_encoding_cache", {})
        if key not in cache:
            with torch.no_grad():
                pos = sincos_pos_embed_2d(self.grid, self.hidden_size, device).to(dtype)
                rope = rope_2d_tables(self.grid, self.hidden_size // self.num_heads, device=device) \
                    if self.cfg.rope else None
            cache[key] = (pos, rope)
        return cache[key]

    def compile_units(self) -> list[nn.Module]:
        """What `compile: true` compiles (models/compile.py): every block, the final layer and the embedders."""
        return [*self.blocks, self.final, self.t_embed, self.y_embed]

    def _unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        p, g, c = self.patch_size, self.grid, self.in_channels
        out = out.view(out.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(out.shape[0], c, g * p, g * p)


def build_dit(cfg: DiTConfig) -> LightningDiT:
    return LightningDiT(cfg)


def param_count(cfg: DiTConfig) -> int:
    """Number of parameters of the model `cfg` describes, counted on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        model = LightningDiT(cfg)
    return sum(p.numel() for p in model.parameters())
