"""Random state of a run: the per-step seed as a function of (seed, rank, images seen), and the saved RNG states.

Data order, augmentation and noise are functions of (seed, rank, images seen), so a resumed run continues the same
trajectory: `Reseed` reseeds the global generators after every step, and a checkpoint also keeps the exact states.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .loop import LoopHook


def step_seed(seed: int, rank: int, images_seen: int) -> int:
    """The global-RNG seed of the step that starts at `images_seen` on `rank`."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + images_seen) % (2 ** 63)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Reseed(LoopHook):
    """Any use of the global RNGs in the next step is a function of (seed, rank, images seen)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def seed_for(self, images_seen: int) -> None:
        seed_everything(step_seed(self.seed, self.rank, images_seen))

    def after_step(self, loop) -> None:
        self.seed_for(loop.images_seen)
