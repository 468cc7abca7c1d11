"""Named collectives: one that does not complete within `distributed.timeout_s` is reported with this worker's rank
and the operation's name, and the worker fails, so that Ray Train restarts the group from the last checkpoint
(FailureConfig(max_failures=distributed.max_failures)) instead of waiting it out.

    with watched("all_reduce(nonfinite guard)"):
        dist.all_reduce(flag)
        ok = flag.item()            # the host read too: on NCCL the wait happens here

`watched(name)` only pushes (name, start) on this process's stack of operations and pops it (well under a
microsecond), so every collective the project issues runs inside one. In a run of more than one worker, `Watchdog`
(one daemon thread per worker, `watching(...)`) looks at the innermost operation every poll:
  1. at timeout_s it says, once per operation, on stderr:
     `[train rank 0] stalled in all_reduce(nonfinite guard) for 5 s (distributed.timeout_s=5): ...`;
  2. the process group's own timeout is timeout_s + GRACE_S (`backend_timeout_s`). gloo honours it for every
     collective the project uses (all_reduce, barrier, broadcast_object_list, all_gather_object; measured on
     torch 2.14) and raises a RuntimeError that names neither rank nor operation ("Timed out waiting 5000ms for recv
     operation to complete"). An exception leaving a stalled `watched` block becomes CollectiveStalledError, which
     names both: an ordinary worker error, so Ray Train tears the group down and restarts it from the last
     checkpoint, and the driver's message, once the restarts are spent, names the stall;
  3. at timeout_s + 2 GRACE_S an operation still in progress (NCCL without async error handling, a host read that
     never returns) ends the process with os._exit(STALL_EXIT). A thread cannot raise into the main thread while
     that thread is blocked in C++, and a signal handler would run only once the blocking call returns, so leaving
     the process is the one sure way out. Ray Train sees the worker's actor die, as for a lost node, and restarts
     the group from the last checkpoint; a plain process exits with 75 (EX_TEMPFAIL: the same command can resume).
The collectives inside DeepSpeed (gradient reduction in backward and step) are not named: the process-group timeout
bounds them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator, Optional

from ..log import say

GRACE_S = 5.0  # the backend's own timeout comes this long after our report; the hard exit as long again after it
STALL_EXIT = 75  # EX_TEMPFAIL

_ops: list[list] = []  # [name, start, reported] of the operations in progress, innermost last
_current: dict = {"watchdog": None}


class CollectiveStalledError(RuntimeError):
    """A collective did not complete within distributed.timeout_s (retried by Ray Train: not a UserError)."""


def backend_timeout_s(timeout_s: float) -> float:
    """The process group's timeout for distributed.timeout_s: a little later than the watchdog's report."""
    return timeout_s + GRACE_S


def _stall_line(name: str, waited: float, timeout_s: float) -> str:
    return (f"stalled in {name} for {waited:.0f} s (distributed.timeout_s={timeout_s:g}): another worker has not "
            f"reached it; this worker fails so that the group restarts from the last checkpoint")


@contextlib.contextmanager
def watched(name: str) -> Iterator[None]:
    """Run a collective (and the host read that waits for it) as the named operation `name`."""
    op = [name, time.monotonic(), False]
    _ops.append(op)
    try:
        yield
    except Exception as exc:
        dog = _current["watchdog"]
        waited = time.monotonic() - op[1]
        if dog is None or waited < dog.timeout_s or isinstance(exc, CollectiveStalledError):
            raise
        if not op[2]:
            op[2] = True
            say("train", _stall_line(name, waited, dog.timeout_s), err=True, all_ranks=True)
        raise CollectiveStalledError(f"rank {dog.rank} {_stall_line(name, waited, dog.timeout_s)} "
                                     f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''})"
                                     ) from exc
    finally:
        if _ops and _ops[-1] is op:  # nested operations end innermost first
            _ops.pop()
        else:
            _ops[:] = [o for o in _ops if o is not op]


class Watchdog:
    """The thread that names a stalled operation and, as a last resort, ends the process (module docstring)."""

    def __init__(self, timeout_s: float, rank: int, poll_s: Optional[float] = None, exit_code: int = STALL_EXIT):
        self.timeout_s, self.rank, self.exit_code = float(timeout_s), rank, exit_code
        self.poll_s = poll_s if poll_s is not None else min(1.0, self.timeout_s / 10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="collective-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        _current["watchdog"] = self
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if _current["watchdog"] is self:
            _current["watchdog"] = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                op = _ops[-1]
            except IndexError:
                continue
            name, start, reported = op
            waited = time.monotonic() - start
            if waited >= self.timeout_s and not reported:
                op[2] = True
                say("train", _stall_line(name, waited, self.timeout_s), err=True, all_ranks=True)
            if waited >= self.timeout_s + 2 * GRACE_S and _ops and _ops[-1] is op:
                say("train", f"{name} still has not returned after {waited:.0f} s; exiting with {self.exit_code}",
                    err=True, all_ranks=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(self.exit_code)


@contextlib.contextmanager
def watching(timeout_s: float, rank: int, world: int) -> Iterator[Optional[Watchdog]]:
    """A Watchdog for the duration of a worker's run (none in a world of one: nothing to wait for)."""
    if world <= 1:
        yield None
        return
    dog = Watchdog(timeout_s, rank).start()
    try:
        yield dog
    finally:
        dog.close()
