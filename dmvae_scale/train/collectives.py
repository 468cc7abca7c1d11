"""What the workers decide together: rank/world from the environment, broadcast, a joint "all succeeded", metric
means, and the stop request every worker acts on at the same step. Also the process group of a single-process run
(world size 1, gloo on loopback) so that it runs the very same worker code as N workers under Ray Train."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..log import say
from ..localhost import environ, free_port
from .watchdog import watched

STOP_CHECK_EVERY = 10  # steps between checks of the stop request (one tiny all-reduce)

NO_STOP, PREEMPTED, STOP = 0, 1, 2


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), \
        int(os.environ.get("LOCAL_RANK", "0"))


def broadcast(obj: Any, what: str = "") -> Any:
    """Rank 0's `obj` on every rank (`what` names it when the broadcast stalls)."""
    box = [obj]
    with watched(f"broadcast({what})" if what else "broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool, device: torch.device, what: str = "") -> bool:
    """True on every rank only when `ok` is True on every rank (`what` names it when the all-reduce stalls)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    with watched(f"all_reduce({what})" if what else "all_reduce"):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)


def mean_over_workers(means: dict[str, torch.Tensor], world: int, device: torch.device) -> dict[str, torch.Tensor]:
    keys = sorted(means)
    if not keys or world == 1:
        return means
    stacked = torch.stack([means[k].float().reshape(()) for k in keys]).to(device)
    with watched("all_reduce(metric means)"):
        dist.all_reduce(stacked)
    stacked /= world
    return dict(zip(keys, stacked))


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """RANK/WORLD_SIZE/... of a world of one on loopback (a free port) for the duration of an in-process run.

    The process group the worker creates stays for the life of the process and later in-process runs reuse it:
    DeepSpeed caches its groups (deepspeed.utils.groups) when it first initialises, so a destroyed and re-created
    group would leave it holding stale ones."""
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"this process already belongs to a process group of {dist.get_world_size()} ranks; "
                           f"an in-process run needs a world of one")
    with environ(dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))):
        yield


# The stop calls of runs started off the main thread (a pipeline's concurrent steps): signal handlers can only be set
# on the main thread, so the pipeline's handler reaches these runs through stop_runs_off_the_main_thread.
_OFF_MAIN_STOPS: list[list[Callable[[], Any]]] = []
_OFF_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def stops_off_the_main_thread(calls: list[Callable[[], Any]]) -> Iterator[list[Callable[[], Any]]]:
    """Register `calls` (a list the run may still append to) for stop_runs_off_the_main_thread while the block runs."""
    with _OFF_MAIN_LOCK:
        _OFF_MAIN_STOPS.append(calls)
    try:
        yield calls
    finally:
        with _OFF_MAIN_LOCK:  # by identity: list.remove compares by value, and two runs' lists can be equal
            _OFF_MAIN_STOPS[:] = [c for c in _OFF_MAIN_STOPS if c is not calls]


def stop_runs_off_the_main_thread() -> int:
    """Ask every run that a thread other than the main one started (the pipeline's concurrent steps, in-process or
    under Ray Train) to checkpoint and stop, as SIGTERM would a run started on the main thread; returns how many
    were asked."""
    with _OFF_MAIN_LOCK:
        pending = [list(c) for c in _OFF_MAIN_STOPS]
    for calls in pending:
        for call in calls:
            call()
    return len(pending)


class StopSignal:
    """Why the workers should pause: a stop request (SIGTERM or a first Ctrl-C when we own the main thread, as an
    in-process run does; the launcher's control actor) or a Ray preemption notice (checkpoint now, then keep training
    until the node goes). A second Ctrl-C aborts at once, without the checkpoint."""

    def __init__(self, control: Any, under_ray: bool):
        self.control = control
        self.under_ray = under_ray
        self.local = threading.Event()
        self._previous: dict[int, Any] = {}
        self._preempt_seen = False
        self._off_main: contextlib.ExitStack | None = None
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self.local.set())
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        else:  # an in-process run on a pipeline step's thread: the pipeline's handler sets the flag
            self._off_main = contextlib.ExitStack()
            self._off_main.enter_context(stops_off_the_main_thread([self._stop_requested]))

    def _stop_requested(self) -> None:
        say("train", "stop requested: checkpointing and stopping at the next stop check")
        self.local.set()

    def _interrupt(self, signum, frame) -> None:
        if self.local.is_set():
            raise KeyboardInterrupt
        say("train", "Ctrl-C: checkpointing and stopping at the next stop check (Ctrl-C again aborts without it)")
        self.local.set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._off_main is not None:
            self._off_main.close()
            self._off_main = None

    def _local(self) -> int:
        notice = False
        if self.under_ray:  # a barrier across the workers: every one calls it at the same steps, every time
            import ray.train
            getter = getattr(ray.train, "get_preemption_info", None)
            notice = getter is not None and getter() is not None
        if self.local.is_set():
            return STOP
        if self.control is not None:
            import ray
            stop, simulated = ray.get(self.control.requests.remote())
            if stop:
                return STOP
            notice = notice or simulated
        if notice and not self._preempt_seen:  # one just-in-time checkpoint per notice
            self._preempt_seen = True
            return PREEMPTED
        return NO_STOP

    def agreed(self, device: torch.device) -> int:
        """NO_STOP, PREEMPTED or STOP, the same on every worker (collective: call at the same steps)."""
        flag = torch.tensor([float(self._local())], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            with watched("all_reduce(stop check)"):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                return int(flag.item())
        return int(flag.item())
