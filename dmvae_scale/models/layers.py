"""Building blocks of the LightningDiT: RMSNorm, SwiGLU, timestep / label embeddings, 2-D position encodings.

NVIDIA apex's fused RMSNorm kernel is used when it is importable and the input is on CUDA; otherwise torch's
`F.rms_norm`. The PyPI package called `apex` is unrelated to NVIDIA's, so we check for the kernel itself
(`apex.normalization.FusedRMSNorm`), never only that `import apex` works.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _find_apex_rms_norm():
    """apex's functional RMSNorm pair (plain, affine), or None when NVIDIA apex with its CUDA kernels is absent."""
    try:
        import importlib

        import apex.normalization as apex_norm  # NVIDIA apex, built in the cluster image
        from apex.normalization import fused_layer_norm
        if not hasattr(apex_norm, "FusedRMSNorm"):
            return None
        # The Python half of apex installs without its CUDA extension, and apex loads that extension lazily at the
        # first call. find_spec only says a file exists; importing it is what proves it loads against this torch and
        # CUDA (a build against another torch fails here with an undefined symbol).
        importlib.import_module("fused_layer_norm_cuda")
        return fused_layer_norm.fused_rms_norm, fused_layer_norm.fused_rms_norm_affine
    except Exception:  # absent, the unrelated PyPI `apex`, apex without its CUDA extension, or one that fails to load
        return None


_APEX_RMS_NORM = _find_apex_rms_norm()


def fused_rms_norm_available() -> bool:
    """True when NVIDIA apex's fused RMSNorm can be used (on CUDA inputs)."""
    return _APEX_RMS_NORM is not None


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, use_fused: bool = True) -> torch.Tensor:
    """RMSNorm over the last dimension; apex's fused kernel on CUDA when available (`use_fused`), else torch's."""
    shape = torch.Size((x.shape[-1],))  # apex hands this to its C++ kernel as an int list
    if weight is not None and weight.dtype != x.dtype:
        # Fused kernels (apex's, torch's) want one dtype; both accumulate in float32 internally either way.
        weight = weight.to(x.dtype)
    if use_fused and _APEX_RMS_NORM is not None and x.is_cuda:
        plain, affine = _APEX_RMS_NORM
        return plain(x, shape, eps) if weight is None else affine(x, weight, shape, eps)
    return F.rms_norm(x, shape, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with an optional learnable gain."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int = 8) -> int:
    """SwiGLU hidden width matching a GELU MLP of ratio `mlp_ratio` in parameters: 2/3 of it, rounded up."""
    hidden = int(2 / 3 * mlp_ratio * dim)
    return (hidden + multiple_of - 1) // multiple_of * multiple_of


class SwiGLU(nn.Module):
    """out = W3 (silu(W1 x) * W2 x); W1 and W2 are one fused matrix (`w12`, as in DINOv2's SwiGLUFFNFused, so
    the ViT loader uses this class too). Hidden width: `hidden` if given, else swiglu_hidden(dim, mlp_ratio)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, hidden: int | None = None):
        super().__init__()
        hidden = hidden or swiglu_hidden(dim, mlp_ratio)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> sinusoidal features -> 2-layer MLP, as LightningDiT embeds time (docs/method.md, "Time
    embedding"): features [cos(t f_k), sin(t f_k)] of the raw t with f_k = max_period^(-k / half), k < half = 128.
    No scaling of t (before artifact method version 2 it was t * 1000, which official weights do not expect)."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoid(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class LabelEmbedding(nn.Module):
    """Class labels 0..num_classes-1 plus the null label `num_classes` (classifier-free guidance).

    Label dropout is the caller's job (method code swaps labels for the null label); this only embeds.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


# ----------------------------------------------------------------------------------------------------------------------
# Position encodings over an h x w token grid (row-major token order)
# ----------------------------------------------------------------------------------------------------------------------

def _grid_positions(grid: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(grid, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return rows.reshape(-1), cols.reshape(-1)


def _sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(grid: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, (grid*grid, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = _grid_positions(grid, device)
    return torch.cat([_sincos_1d(rows, dim // 2), _sincos_1d(cols, dim // 2)], dim=1)


def rope_2d_tables(grid: int, head_dim: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (grid*grid, head_dim/2) for 2-D rotary embedding.

    The head's channel pairs are split in two: the first half rotate with the token's row, the second with its column,
    each axis with its own geometric ladder of frequencies.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs a head dimension divisible by 4, got {head_dim}")
    axis_pairs = head_dim // 4  # rotated channel pairs per axis
    freqs = theta ** (-torch.arange(axis_pairs, dtype=torch.float32, device=device) / axis_pairs)
    rows, cols = _grid_positions(grid, device)
    angles = torch.cat([rows[:, None] * freqs[None], cols[:, None] * freqs[None]], dim=1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (..., N, head_dim) by the angles of tables (N, head_dim/2); float32 math."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
