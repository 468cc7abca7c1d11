"""The training loop shared by every stage and every driver (one process, or each DeepSpeed worker).

Progress is counted in images seen. The loop owns the side concerns so the stage's step stays pure training:
the non-finite guard (guard.py: skips optimiser steps whose loss is not finite on any worker, stops after too many in
a row), EMA updates after each real optimiser step, metrics kept as tensors and reduced only at the log interval, a
progress display (dmvae_scale/log.py), and a closing summary line. Drivers extend it through hooks: `on_log` (metrics
sinks, at the log interval), then `after_step` (cadence work such as checkpoints, keyed on images_seen), and `on_end`.
The loop is one of the parts a checkpoint holds (its counters: `state_dict` / `load_state_dict`); the engines, the
EMAs, the stage, the data reader and the RNG are parts of their own (checkpoint/manager.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from ..log import progress, say
from ..config import RunConfig
from ..errors import UserError
from .api import Engine, Stage
from .guard import GuardedEngine, NonFiniteGuard, TrainingDivergedError  # noqa: F401 (TrainingDivergedError: re-export)
from .rng import seed_step


@dataclass
class LoopSummary:
    stage: str
    images: int
    steps: int
    seconds: float
    skipped_steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per log interval

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.final_metrics.items()))
        return (f"{self.stage}: {self.images} images in {self.steps} steps, {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s); skipped {self.skipped_steps} non-finite steps"
                f"{'; final ' + losses if losses else ''}")


class LoopHook:
    """Override what you need. `loop.images_seen`, `loop.steps` and `loop.state_dict()` are available.
    after_micro_batch runs after each batch the stage stepped on (`accumulation` of them make one optimiser step);
    after_step after each optimiser step (the only place a checkpoint can be taken: no gradients are pending)."""

    def after_micro_batch(self, loop: "TrainLoop") -> None:
        pass

    def after_step(self, loop: "TrainLoop") -> None:
        pass

    def on_log(self, loop: "TrainLoop", metrics: dict[str, float]) -> None:
        pass

    def on_end(self, loop: "TrainLoop", summary: LoopSummary) -> None:
        pass


class TrainLoop:
    """Runs `stage.step` on batches until cfg.total_images have been seen (counted over all workers).

    engines: trainable model name -> engine; emas: model name -> EMA (update(module) after each optimiser step).
    world_size multiplies each worker's images into the global count; reduce_metrics (e.g. an all-reduce
    mean) runs only at log intervals. Resume by load_state_dict() before run(), with batches that start at the
    restored images_seen.

    One iteration is one optimiser step: `accumulation` micro-batches (config.batch_split: it depends on the world
    size, so the global batch does not), each a `stage.step` with the same step index; the engines apply the
    gradients on the last (DeepSpeed's gradient_accumulation_steps is the same number). `steps` counts optimiser
    steps, so a step index (the learning-rate warm-up, a stage's alternation) means the same at any world size.
    """

    def __init__(self, stage: Stage, engines: dict[str, Engine], cfg: RunConfig,
                 emas: dict | None = None, hooks: Iterable[LoopHook] = (), device: torch.device | str = "cpu",
                 world_size: int = 1, rank: int = 0, is_main: bool = True, progress: bool = True,
                 reduce_metrics: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 accumulation: int = 1):
        self.stage = stage
        self.accumulation = max(1, int(accumulation))
        self.cfg = cfg
        self.guard = NonFiniteGuard(world_size, device, cfg.max_nonfinite_steps)
        self.engines = {name: GuardedEngine(e, self.guard) for name, e in engines.items()}
        self.emas = emas or {}
        self.hooks = list(hooks)
        self.device = torch.device(device)
        self.world_size = world_size
        self.rank = rank
        self.is_main = is_main
        self.progress = progress and is_main
        self.reduce_metrics = reduce_metrics
        self.images_seen = 0
        self.steps = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    # -- the loop's part of a checkpoint: its counters (the guard's included) ---------------------------------------
    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen, "steps": self.steps, **self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.images_seen = int(state["images_seen"])
        self.steps = int(state["steps"])
        self.guard.load_state_dict(state)

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped_steps

    @property
    def consecutive_skips(self) -> int:
        return self.guard.consecutive_skips

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _after_optimizer_steps(self) -> None:
        for name, engine in self.engines.items():
            if engine.stepped and name in self.emas:
                self.emas[name].update(engine.module)
            engine.stepped = False
        self.guard.end_iteration(self.images_seen)

    def _accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._counts[k] = self._counts.get(k, 0) + 1

    def _reduce(self) -> dict[str, float]:
        means = {k: self._sums[k] / self._counts[k] for k in self._sums}
        if self.reduce_metrics is not None:
            means = self.reduce_metrics(means)
        self._sums, self._counts = {}, {}
        return {k: float(v) for k, v in means.items()}  # the one host sync per log interval

    def run(self, batches: Iterable[dict[str, torch.Tensor]]) -> LoopSummary:
        cfg = self.cfg
        total = cfg.total_images
        start_images, start_steps, start_skipped = self.images_seen, self.steps, self.skipped_steps
        history: list[dict[str, float]] = []
        last: dict[str, float] = {}
        next_log = (self.images_seen // cfg.log_every_images + 1) * cfg.log_every_images
        bar = progress(total=total, initial=self.images_seen, unit="img", desc=f"train {self.stage.name}",
                       enabled=self.progress and self.is_main)
        began = time.perf_counter()
        iterator: Iterator = iter(batches)
        try:
            while self.images_seen < total:
                position, seen = self.images_seen, 0
                for _ in range(self.accumulation):
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        raise UserError(f"the data ran out after {position} of total_images={total} images; "
                                        f"the batch source must repeat epochs") from None
                    # Every random draw of a micro-batch is a function of (seed, rank, images seen before it): a
                    # resumed run continues the same trajectory whatever ran between two steps (checkpoints, grids).
                    seed_step(cfg.seed, self.rank, position)
                    out = self.stage.step(self._to_device(batch), self.steps, self.engines)
                    position += out.images * self.world_size
                    seen += out.images * self.world_size
                    self._accumulate(out.metrics)
                    for hook in self.hooks:
                        per_batch = getattr(hook, "after_micro_batch", None)  # hooks are duck-typed
                        if per_batch is not None:
                            per_batch(self)
                self._after_optimizer_steps()
                self.steps += 1
                self.images_seen += seen
                bar.update(seen)
                # Log first, then the cadence work: a checkpoint at N images then never precedes the metrics of N
                # (a run killed between the two would resume after a line it never wrote).
                if self.images_seen >= next_log or self.images_seen >= total:
                    last = self._reduce() if self._sums else last
                    history.append({"images": float(self.images_seen), **last})
                    bar.set_postfix({k: f"{v:.3g}" for k, v in sorted(last.items())}, refresh=False)
                    for hook in self.hooks:
                        hook.on_log(self, last)
                    next_log = (self.images_seen // cfg.log_every_images + 1) * cfg.log_every_images
                for hook in self.hooks:
                    hook.after_step(self)
        finally:
            bar.close()
        summary = LoopSummary(self.stage.name, self.images_seen - start_images, self.steps - start_steps,
                              time.perf_counter() - began, self.skipped_steps - start_skipped, last, history)
        for hook in self.hooks:
            hook.on_end(self, summary)
        if self.is_main:
            say("train", summary.line())
        return summary


def train_loop(stage: Stage, engines: dict[str, Engine], batches: Iterable[dict[str, torch.Tensor]], cfg: RunConfig,
               hooks: Iterable[LoopHook] = (), **kwargs) -> tuple[LoopSummary, TrainLoop]:
    """Build a TrainLoop and run it; returns (summary, loop) so the caller can export EMA weights and state."""
    loop = TrainLoop(stage, engines, cfg, hooks=hooks, **kwargs)
    return loop.run(batches), loop
