"""Whether a Ray request can ever be placed: a task or actor asking for more CPUs or GPUs than any node holds waits
in Ray's queue forever, so the code that submits it asks here while it waits and gives up with one line. And, inside
a placed task or actor, torch's thread count made to match the CPUs Ray reserved for it (`threads_as_reserved`)."""
from __future__ import annotations

import math
import os
import time
from typing import Optional


def largest_nodes() -> str:
    """The alive nodes' CPU/GPU sizes, e.g. '0 CPU/0 GPU, 1 CPU/0 GPU'."""
    import ray
    sizes = {f"{n['Resources'].get('CPU', 0):g} CPU/{n['Resources'].get('GPU', 0):g} GPU"
             for n in ray.nodes() if n.get("Alive")}
    return ", ".join(sorted(sizes)) or "none"


def node_fits(cpus: float, gpus: float) -> bool:
    """True when an alive node of the connected cluster holds `cpus` CPUs and `gpus` GPUs (in total, not free now)."""
    import ray
    return any(n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus
               for n in ray.nodes())


class FitWatch:
    """Polled while a request waits: `unfit_for()` is how long no alive node has held the request (0 while one does);
    an autoscaler adding a node in time resets it."""

    def __init__(self, cpus: float, gpus: float):
        self.cpus, self.gpus = cpus, gpus
        self._since: Optional[float] = None

    def unfit_for(self) -> float:
        if node_fits(self.cpus, self.gpus):
            self._since = None
            return 0.0
        self._since = self._since or time.monotonic()
        return time.monotonic() - self._since


def threads_as_reserved() -> int:
    """In a Ray task or actor: torch's CPU threads = the CPUs Ray reserved for it (at least 1), whatever
    OMP_NUM_THREADS the raylet passed down. Returns the count set, or 0 (left alone) outside Ray or with no CPU
    reserved. Why: a raylet started by a process with OMP_NUM_THREADS=2 gives every worker 2 threads; two one-CPU
    generator workers on a 2-core node then ran at 84 img/s each against 313 for one alone, nearly all of it
    system time spent by spinning OpenMP threads (measured on this 2-core machine)."""
    import ray
    if not ray.is_initialized():
        return 0
    cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    if cpus <= 0:
        return 0
    n = max(1, math.floor(cpus + 1e-6))
    use_threads(n)
    return n


def use_threads(n: int) -> None:
    """torch's CPU threads in this process = n, and OMP_NUM_THREADS=n for the processes it starts (DataLoader
    workers, compilers, a raylet): the one place a thread count is set (`--threads`, Ray workers)."""
    import torch
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
