"""torch.compile of a model's repeated parts (`compile: auto | true | false`, under `distributed:` in a run config).

Whole-model compilation would trace the stage's Python (checkpointing, DeepSpeed hooks, data-dependent branches) and
recompile whenever it changes; compiling the units a model names instead (each DiT block, its final layer and its
embedders; each block of the conv decoder) gives one small graph per unit kind, reused by every repetition, with no
graph breaks inside. `nn.Module.compile` works in place, so parameter names (checkpoints, EMA, DeepSpeed's
partitions) do not change.

A model takes part by defining `compile_units() -> list[nn.Module]`.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_wanted(setting: str | bool, device: torch.device, zero_stage: int = 0) -> bool:
    """What `compile` means on `device`: auto is on for CUDA (below ZeRO-3, whose parameter hooks break graphs)."""
    if setting == "auto":
        return device.type == "cuda" and zero_stage < 3
    return bool(setting)


def compile_model_parts(model: nn.Module, **options) -> int:
    """Compile, in place, every unit that `model` or any of its submodules names; returns how many were compiled."""
    count = 0
    for module in model.modules():
        units = getattr(module, "compile_units", None)
        if not callable(units):
            continue
        for unit in units():
            unit.compile(**options)
            count += 1
    return count
