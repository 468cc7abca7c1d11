"""Random state of a run: seeding the global generators for a step, and the RNG states as a part of a checkpoint.

The training loop seeds torch, numpy and random before every step from seeds.step_seed(seed, rank, images seen), so
data order, augmentation and noise continue the same trajectory after a resume; a checkpoint also keeps the exact
states of this worker (RNGState, a rank-local part: after a change of world size the loop's reseeding is enough).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..seeds import step_seed


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def seed_step(seed: int, rank: int, images_seen: int) -> None:
    """Seed the global generators for the step that starts at `images_seen` on `rank`."""
    seed_everything(step_seed(seed, rank, images_seen))


class RNGState:
    """This worker's torch / numpy / random (and CUDA) generator states, as a part of a checkpoint."""

    RANK_LOCAL = True

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                 "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
                 "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
                 "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_gauss"][0], state["numpy_gauss"][1]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
