"""Mixed precision for training steps: one autocast region per forward and its loss, and the compute paths a worker
chose (precision, attention kernel, RMSNorm kernel), said once.

Why not one region around the run (or around a whole step): autocast caches the bf16 copy of every fp32 weight that
requires grad, and drops that cache only when the OUTERMOST autocast region exits. A region that spans an optimiser
step feeds every later forward the bf16 weights of the first step, while the optimiser keeps updating fp32 weights
the forward never reads again (a 3-step Linear under one long region gives the same output at every step). PyTorch's
guidance is to autocast the forward and the loss only, not backward or the optimiser step; `ForwardPrecision` opens
such a region fresh each time and refuses to nest inside an outer one (whose exit, not ours, would clear the cache).
`cache_enabled=False` would also be correct but re-casts a weight at every use inside one forward (the doubled CFG
batch, a weight tied twice), so short regions with the cache are the cheaper choice.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16")


class ForwardPrecision:
    """`with precision():` around ONE forward (+ its loss): bf16 autocast for 'bf16', nothing for 'fp32'."""

    def __init__(self, precision: str = "fp32", device_type: str = "cpu"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be a resolved one of {PRECISIONS}, got {precision!r}")
        self.precision, self.device_type = precision, device_type

    @property
    def enabled(self) -> bool:
        return self.precision == "bf16"

    def __call__(self) -> ContextManager:
        if not self.enabled:
            return nullcontext()
        if torch.is_autocast_enabled(self.device_type):
            raise RuntimeError("a training forward was entered inside an outer autocast region; its bf16 weight "
                               "casts would outlive the optimiser step (stale weights). Remove the outer region: "
                               "each forward opens its own (dmvae_scale.train.precision.ForwardPrecision)")
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def __repr__(self) -> str:
        return f"ForwardPrecision({self.precision!r}, {self.device_type!r})"


def compute_paths(device: torch.device, precision: str) -> dict[str, str]:
    """What this process runs: precision, the RMSNorm kernel, TF32 for fp32 matmuls. Models add their attention
    kernel (LightningDiT.attention_backend), read from the same selection functions the forward calls, so the log
    cannot disagree with the run."""
    from ..models.layers import fused_rms_norm_available
    paths = {"precision": "fp32" if precision == "fp32" else f"bf16 autocast per forward ({device.type})"}
    fused = device.type == "cuda" and fused_rms_norm_available()
    paths["rms_norm"] = "apex fused" if fused else "torch F.rms_norm"
    if device.type == "cuda":
        paths["fp32 matmul"] = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee fp32"
    return paths


def describe_paths(paths: dict[str, str]) -> str:
    return "compute paths: " + ", ".join(f"{k} {v}" for k, v in paths.items())
