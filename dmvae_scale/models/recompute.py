"""Activation checkpointing whose recomputation can be counted apart (model FLOPs vs hardware FLOPs).

`checkpointed(fn, *args)` is torch's non-reentrant checkpoint of `fn`. While a FLOP count is open with
`counting_recompute(mode, tally)`, the FLOPs `mode` (a torch FlopCounterMode) sees during the backward-time
recomputation of any checkpointed function are added to `tally.flops` as well: model FLOPs = counted - tally.flops
(what MFU divides), hardware FLOPs = counted (what HFU divides).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from torch.utils.checkpoint import checkpoint

_open: list[tuple[object, RecomputeTally]] = []


@dataclass
class RecomputeTally:
    flops: float = 0.0


class _Marked:
    """Calls `fn`; every call after the first is the recomputation, whose FLOPs go to the open tallies."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1 or not _open:
            return self.fn(*args)
        before = [mode.get_total_flops() for mode, _ in _open]
        try:  # torch may stop a recomputation early (by raising) once it has what backward needs
            return self.fn(*args)
        finally:
            for (mode, tally), b in zip(_open, before):
                tally.flops += mode.get_total_flops() - b


def checkpointed(fn, *args):
    return checkpoint(_Marked(fn), *args, use_reentrant=False)


@contextmanager
def counting_recompute(mode, tally: RecomputeTally):
    entry = (mode, tally)
    _open.append(entry)
    try:
        yield tally
    finally:
        _open.remove(entry)
