"""Running a feature network over many images, batch by batch, with a progress bar.

A feature network is any module with attributes `name`, `fingerprint`, `dim`, `has_logits` that maps uint8
N x 3 x H x W images to {"pool": N x dim, "logits": N x classes (optional)}: `InceptionV3Features`, `DinoV2Features`.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..log import progress as show_progress, say
from .images import as_uint8_nchw


def array_batches(images, batch_size: int) -> Iterator:
    """Slices of an in-memory array (numpy or torch, any layout as_uint8_nchw accepts)."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def extract_features(network: torch.nn.Module, batches: Iterable, total: Optional[int] = None,
                     value_range: Optional[Sequence[float]] = None, device: Optional[torch.device] = None,
                     desc: str = "features", progress: bool = True) -> dict[str, np.ndarray]:
    """Features of every image in `batches` (each batch: an array of images): {"pool": (N, D) float32, "logits"}.

    Each batch is checked by as_uint8_nchw (dtype, range, layout) before it reaches the network.
    """
    device = torch.device(device) if device is not None else next(network.parameters()).device
    outputs: dict[str, list[np.ndarray]] = {}
    start, seen = time.perf_counter(), 0
    with show_progress(total=total, desc=desc, unit="img", enabled=progress, leave=False) as bar:
        for batch in batches:
            x = as_uint8_nchw(batch, value_range).to(device, non_blocking=True)
            for key, value in network(x).items():
                outputs.setdefault(key, []).append(value.float().cpu().numpy())
            seen += len(x)
            bar.update(len(x))
    if not seen:
        raise ValueError(f"{desc}: no images")
    elapsed = time.perf_counter() - start
    if progress:
        say("eval", f"{desc}: {seen} images through {network.name} in {elapsed:.1f} s ({seen / elapsed:.1f} img/s)")
    return {key: np.concatenate(parts) for key, parts in outputs.items()}
