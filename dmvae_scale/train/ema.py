"""EMA of the trained weights, partitioned over the workers, and its consolidation (for artifacts and export).

`ShardedEMA`: the fp32 shadow of every parameter partitioned over the workers under every ZeRO stage (each rank keeps
1/world of every parameter), so it fits where ZeRO-3 parameters do and can be re-partitioned on a resume with another
number of workers. At world size 1 it is a plain EMA.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .watchdog import watched


def _partition(numel: int, world: int) -> int:
    return math.ceil(numel / world)


class ShardedEMA:
    """EMA of a module's parameters in which rank r keeps elements [r*P, (r+1)*P) of every flattened parameter,
    P = ceil(numel / world), padded at the end: the same layout as ZeRO-3's `param.ds_tensor`, so under ZeRO-3 the
    update reads the local partition directly and never gathers."""

    SHARDED = True  # a checkpoint part: after a change of world size it is handed the shards of every saving rank

    def __init__(self, module: nn.Module, decay: float, rank: int, world: int,
                 should_update: Callable[[], bool] | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"optim.ema_decay: must be in [0, 1), got {decay}")  # config.validate checks it first
        self.decay, self.rank, self.world = decay, rank, world
        self.should_update = should_update
        self.params = dict(module.named_parameters())
        self.numel = {n: self._numel(p) for n, p in self.params.items()}
        self.shape = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.params.items()}
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    @staticmethod
    def _numel(p: nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    def _local(self, p: nn.Parameter) -> torch.Tensor:
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition, already in our layout
            return p.ds_tensor.view(-1)
        size = _partition(p.numel(), self.world)
        flat = p.detach().reshape(-1)
        part = flat[self.rank * size:(self.rank + 1) * size]
        if part.numel() < size:
            part = torch.cat([part, part.new_zeros(size - part.numel())])
        return part

    @torch.no_grad()
    def update(self, module: nn.Module | None = None) -> None:
        """After an optimiser step (the loop calls it with the module, which we already hold)."""
        if self.should_update is not None and not self.should_update():
            return
        # One fused multi-tensor lerp over every parameter (a few kernel launches instead of one per parameter);
        # the same arithmetic as a per-parameter `lerp_`, bit for bit (tests/test_perf_cpu.py).
        names = list(self.params)
        torch._foreach_lerp_([self.shadow[n] for n in names],
                             [self._local(self.params[n]).float() for n in names], 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "decay": self.decay, "numel": dict(self.numel),
                "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, shards: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Load from the shards of ALL ranks of the saving run, whatever its world size was; or from this rank's own
        shard alone when the saving run had the same world size."""
        if isinstance(shards, dict):
            shards = [shards]
        if len(shards) == 1 and shards[0]["world"] == self.world and shards[0]["rank"] == self.rank:
            own = shards[0]["shadow"]
            missing = sorted(set(self.shadow) - set(own))
            if missing:
                raise KeyError(f"EMA state lacks parameters {missing[:5]}")
            self.shadow = {n: own[n].to(self.shadow[n].device, torch.float32).clone() for n in self.shadow}
            return
        full = consolidate_ema_shards(shards)
        missing = sorted(set(self.shadow) - set(full))
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}")
        size_of = {n: _partition(self.numel[n], self.world) for n in self.shadow}
        for n in self.shadow:
            flat = full[n].reshape(-1)
            if flat.numel() != self.numel[n]:
                raise KeyError(f"EMA parameter {n}: {flat.numel()} elements saved, model has {self.numel[n]}")
            size = size_of[n]
            part = flat[self.rank * size:(self.rank + 1) * size]
            if part.numel() < size:
                part = torch.cat([part, part.new_zeros(size - part.numel())])
            self.shadow[n] = part.to(self.shadow[n].device, torch.float32).clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """All-gather the partitions into full fp32 tensors (collective: every rank must call it)."""
        out = {}
        for n, local in self.shadow.items():
            if self.world > 1:
                parts = [torch.empty_like(local) for _ in range(self.world)]
                with watched(f"all_gather(EMA {n})"):
                    dist.all_gather(parts, local.contiguous())
                flat = torch.cat(parts)
            else:
                flat = local
            out[n] = flat[:self.numel[n]].reshape(self.shape[n]).cpu().clone()
        return out


def consolidate_ema_shards(shards: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full flat fp32 tensors from the per-rank EMA shards of one save (no process group needed)."""
    shards = sorted(shards, key=lambda s: s["rank"])
    world = shards[0]["world"]
    if [s["rank"] for s in shards] != list(range(world)):
        raise KeyError(f"EMA shards of ranks {[s['rank'] for s in shards]} given; a save of {world} workers "
                       f"needs all of 0..{world - 1}")
    out = {}
    for n, numel in shards[0]["numel"].items():
        out[n] = torch.cat([s["shadow"][n].reshape(-1) for s in shards])[:numel].clone()
    return out



class FullEMAView:
    """What save_stage_artifact needs from an EMA, from full (gathered) averages."""

    def __init__(self, shadow: dict[str, torch.Tensor]):
        self.shadow = shadow

    def module_state_dict(self, module) -> dict[str, torch.Tensor]:
        state = module.state_dict()
        for n, v in self.shadow.items():
            state[n] = v.to(state[n].dtype)
        return state
