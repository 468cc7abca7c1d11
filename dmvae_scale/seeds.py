"""Every random choice of a run, derived by one function from the run's seed and integer keys: a resumed run, or one
with another number of workers, makes the same choices (EDM2's rule: seeds are functions of (seed, rank, images
seen)).

    derive_seed(seed, *keys)                      the one derivation (numpy's SeedSequence hash, 63 bits)
    step_seed(seed, rank, images_seen)            a training step's seed: the loop seeds torch, numpy and random with
                                                  it before the step; the stage's noise generators are seeded from it
                                                  (torch.initial_seed() inside the step)
    epoch_seed(seed, epoch)                       the in-memory reader's permutation of an epoch (rank-independent:
                                                  any number of workers reads the same global order)
    sample_seed(seed, epoch, sample_id)           one sample's augmentation (crop, flip) in an epoch
    stats_seed(seed)                              which images the latent statistics are measured on
Each purpose has its own first key, so two purposes never share a stream.
"""
from __future__ import annotations

import numpy as np

_STEP, _EPOCH, _SAMPLE, _STATS = 1, 2, 3, 4


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from the run's seed and integer keys (a hash: nearby keys give unrelated seeds)."""
    words = np.random.SeedSequence([int(seed) & (2**64 - 1), *(int(k) & (2**64 - 1) for k in keys)])
    return int(words.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def step_seed(seed: int, rank: int, images_seen: int) -> int:
    return derive_seed(seed, _STEP, rank, images_seen)


def epoch_seed(seed: int, epoch: int) -> int:
    return derive_seed(seed, _EPOCH, epoch)


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    return derive_seed(seed, _SAMPLE, epoch, sample_id)


def stats_seed(seed: int) -> int:
    return derive_seed(seed, _STATS)
