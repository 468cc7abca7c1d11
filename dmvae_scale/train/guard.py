"""The one non-finite guard: an optimiser step whose loss is not finite on ANY worker is skipped on EVERY worker (a
loss finite here but not on another worker must skip here too, or the workers' weights and skip counts diverge),
its EMA is not updated, and more than `max_nonfinite_steps` such steps in a row stop the run.

    guard = NonFiniteGuard(world=2, device=device, max_consecutive=cfg.max_nonfinite_steps)
    engines = {name: GuardedEngine(engine, guard) for name, engine in engines.items()}   # what a stage steps
    ...stage.step(batch, step, engines)...
    guard.end_iteration(images_seen)             # counts the iteration; raises TrainingDivergedError after too many

How: `backward(loss)` agrees on the verdict before the backward runs (one 4-byte all-reduce and one host read per
backward; skipping the backward itself means no gradient of a bad loss ever reaches DeepSpeed's buffers), and the
engine's `step()` of that iteration is then skipped. The counters are part of the loop's checkpointed state.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import UserError
from .watchdog import watched


class TrainingDivergedError(UserError):
    """Too many consecutive optimiser steps had a non-finite loss."""


class NonFiniteGuard:
    def __init__(self, world: int = 1, device: torch.device | str = "cpu", max_consecutive: int = 10):
        self.world, self.device, self.max_consecutive = world, torch.device(device), max_consecutive
        self.skipped_steps = 0  # iterations with at least one skipped step, over the whole run
        self.consecutive_skips = 0
        self._skipped_now = False

    def agreed_finite(self, loss: torch.Tensor) -> bool:
        """Whether `loss` is finite on every worker (collective: every worker calls it at the same backward)."""
        finite = torch.isfinite(loss.detach()).all().to(torch.float32)
        if self.world > 1:
            finite = finite.to(self.device)
            with watched("all_reduce(nonfinite guard)"):
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                ok = bool(finite.item() >= 1.0)  # the guard's one host read per backward
        else:
            ok = bool(finite.item() >= 1.0)
        if not ok:
            self._skipped_now = True
        return ok

    def end_iteration(self, images_seen: int) -> None:
        """After a loop iteration: count it as skipped or good; too many skipped in a row end the run."""
        skipped, self._skipped_now = self._skipped_now, False
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.max_consecutive:
            raise TrainingDivergedError(
                f"training diverged: {self.consecutive_skips} consecutive steps with a non-finite loss at "
                f"{images_seen} images; lower optim.lr, or raise max_nonfinite_steps (now {self.max_consecutive})")

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


class GuardedEngine:
    """What a stage steps: an engine (DeepSpeed's, or a plain one) whose backward and step the guard can skip.
    `stepped` says whether the optimiser changed the weights in this iteration (the loop updates the EMA then)."""

    def __init__(self, engine, guard: NonFiniteGuard):
        self.engine, self.guard = engine, guard
        self.module = engine.module
        self.stepped = False
        self._skip = False

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # After a skipped backward, this engine's later backwards of the iteration are skipped too (every worker
        # agreed on the first, so all skip the same ones): its step must not apply part of an iteration's gradients.
        if self._skip or not self.guard.agreed_finite(loss):
            self._skip = True
            return
        self.engine.backward(loss)

    def step(self) -> None:
        if self._skip:  # its backward never ran: no gradients to apply or clear
            self._skip = False
            return
        self.engine.step()
        changed = getattr(self.engine, "stepped_optimizer", None)  # False inside a gradient-accumulation window
        self.stepped = changed() if callable(changed) else True
