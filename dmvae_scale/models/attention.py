"""One entry point for multi-head attention, with interchangeable backends.

`attention(q, k, v, backend)` takes q, k, v shaped (B, heads, N, head_dim) and returns the same shape. Backends:
  "flash" - FlashAttention-2 (`flash_attn.flash_attn_func`, which wants (B, N, heads, head_dim)); CUDA, bf16/fp16 only.
  "sdpa"  - torch `F.scaled_dot_product_attention` (picks its own fused kernel where one fits).
  "math"  - the explicit softmax(Q K^T / sqrt(d)) V in float32: the reference the others are tested against.
  "auto"  - flash when importable and valid for the tensors (CUDA compute capability >= 8.0, bf16/fp16, head_dim a
            multiple of 8 and <= 256), else sdpa.
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


def flash_unfit_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashAttention-2 cannot run tensors like these (None: it can). It needs a CUDA device of compute
    capability >= 8.0 (Ampere or later), bf16/fp16 inputs and a head dim that is a multiple of 8 and at most 256."""
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type}"
    if dtype not in _FLASH_DTYPES:
        return f"it needs bf16/fp16 tensors, got {dtype} (run under bf16 autocast)"
    if head_dim % 8 or head_dim > 256:
        return f"it needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"it needs compute capability >= 8.0, {torch.cuda.get_device_name(device)} has {major}.{minor}"
    return None


def select_backend_for(device: torch.device, dtype: torch.dtype, head_dim: int, backend: str = "auto") -> str:
    """The backend `attention` uses for q of this device, dtype and head dim; AttentionBackendError for an impossible
    request. 'auto' takes flash only where it is installed AND valid for the tensors, else SDPA."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flash" if flash_available() and flash_unfit_reason(device, dtype, head_dim) is None else "sdpa"
    if backend == "flash":
        if not flash_available():
            raise AttentionBackendError(
                "attention backend 'flash' was requested but flash_attn does not import here; install the `gpu` "
                "extra (pip install flash-attn) or set the model's attention to 'auto' or 'sdpa'")
        why = flash_unfit_reason(device, dtype, head_dim)
        if why is not None:
            raise AttentionBackendError(f"attention backend 'flash' cannot run here: {why}; set the model's "
                                        f"attention to 'auto' or 'sdpa'")
    return backend


def select_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `attention` uses for tensors like `q` (B, heads, N, head_dim)."""
    return select_backend_for(q.device, q.dtype, q.shape[-1], backend)


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
