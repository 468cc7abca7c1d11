"""What the device can compute natively: the one place the precision choices of training and sampling ask."""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch


def native_bf16(device: torch.device | str) -> bool:
    """bf16 computed natively by the device (CUDA compute capability >= 8.0). torch.cuda.is_bf16_supported() alone
    also says yes where bf16 is only emulated (Turing, Volta), which is far slower than fp32 there."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.is_bf16_supported(including_emulation=False)


def has_tf32(device: torch.device | str) -> bool:
    """TF32 tensor cores for fp32 matmuls (compute capability >= 8.0)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def inference_precision(device: torch.device | str) -> tuple[str, ContextManager]:
    """(name, context) for frozen-model inference such as sampling: bf16 autocast where the device has native bf16
    (one region may span many forwards: the weights never change, so the cast cache cannot go stale), else TF32
    matmuls where the device has them, else plain fp32."""
    device = torch.device(device)
    if native_bf16(device):
        return "bf16", torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if has_tf32(device):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return "tf32", nullcontext()
    return "fp32", nullcontext()
