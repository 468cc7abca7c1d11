"""One entry point for multi-head attention, with interchangeable backends.

`attention(q, k, v, backend)` takes q, k, v shaped (B, heads, N, head_dim) and returns the same shape. Backends:
  "flash" - FlashAttention-2 (`flash_attn.flash_attn_func`, which wants (B, N, heads, head_dim)); CUDA, bf16/fp16 only.
  "sdpa"  - torch `F.scaled_dot_product_attention` (picks its own fused kernel where one fits).
  "math"  - the explicit softmax(Q K^T / sqrt(d)) V in float32: the reference the others are tested against.
  "auto"  - flash when importable and the tensors are CUDA bf16/fp16, else sdpa.
`select_backend(q, backend)` says which one a call with such tensors uses (for tests and logging).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

BACKENDS = ("auto", "flash", "sdpa", "math")
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


class AttentionBackendError(UserError):
    """An attention backend was asked for that cannot run here."""


def _find_flash_attn():
    """`flash_attn.flash_attn_func`, or None when FlashAttention is not installed (or its CUDA build fails to load)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or OSError from a build against another CUDA/torch
        return None
    return flash_attn_func


# Looked up once at import: a plain global keeps the per-call choice cheap and traceable by torch.compile.
_FLASH_ATTN_FUNC = _find_flash_attn()


def flash_available() -> bool:
    return _FLASH_ATTN_FUNC is not None


def select_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `attention` uses for tensors like `q`; raises AttentionBackendError for an impossible request."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    flash_fits = q.is_cuda and q.dtype in _FLASH_DTYPES
    if backend == "auto":
        return "flash" if flash_fits and flash_available() else "sdpa"
    if backend == "flash":
        if not flash_available():
            raise AttentionBackendError(
                "attention backend 'flash' was requested but flash_attn does not import here; install the `gpu` "
                "extra (pip install flash-attn) or set the model's attention to 'auto' or 'sdpa'")
        if not flash_fits:
            raise AttentionBackendError(
                f"attention backend 'flash' needs CUDA bf16/fp16 tensors, got {q.dtype} on {q.device}; run under "
                "bf16 autocast on a GPU or set the model's attention to 'auto' or 'sdpa'")
    return backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, computed in float32 and returned in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * scale, dim=-1)
    return (weights @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal multi-head attention; q, k, v and the result are (B, heads, N, head_dim)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"attention wants q, k, v shaped (B, heads, N, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    chosen = select_backend(q, backend)
    if chosen == "flash":
        out = _FLASH_ATTN_FUNC(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if chosen == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return math_attention(q, k, v)
