"""One training worker in a fresh spawned process (world size 1, gloo on loopback, no Ray): the worker code the
launchers run, isolated from this pytest process's own process group and threads."""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable

from dmvae_scale.localhost import free_port


def _main(cfg, port: int, queue, summarize: Callable[[Any], Any]) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from dmvae_scale.train.worker import WorkerJob, run_worker
    try:
        result = run_worker(WorkerJob(cfg))
        queue.put(("ok", result.status, summarize(result)))
    except Exception as exc:  # report instead of leaving the parent waiting
        queue.put(("error", repr(exc), None))


def train_in_process(cfg, summarize: Callable[[Any], Any], timeout: float = 300) -> Any:
    """Run `cfg` to the end in a spawned worker; return summarize(result) (a module-level function: it is pickled).
    Fails the test unless the run ends with status "done"."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_main, args=(cfg, free_port(), queue, summarize))
    proc.start()
    try:
        status, message, summary = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=60)
    assert status == "ok" and message == "done", message
    return summary
