"""A collective that never completes is named, not waited out (issue #21 item 3).

- two real DeepSpeed workers over gloo, one held back before its step: within distributed.timeout_s the other names
  its rank and the operation it waits in, and its process exits non-zero long before the hold ends;
- an operation that never returns (where no backend timeout would raise) ends the process with exit 75;
- under Ray Train, a worker held back inside a collective: the group restarts from the last checkpoint and finishes.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import deepspeed  # noqa: F401  (the workers build DeepSpeed engines; conftest reads this import on bare machines)
import pytest

import test_engine_toys as toys
from dmvae_scale.localhost import free_port
from dmvae_scale.train.watchdog import GRACE_S, STALL_EXIT

pytestmark = pytest.mark.integration

HOLD_S = 300  # far longer than any assertion below waits


class HeldStage(toys.ToyGANStage):
    """The toy GAN stage whose `hold_rank` sleeps at the start of step `hold_at_step` (once: a marker file says it
    happened), so the other workers wait for it in the step's first collective."""

    def __init__(self, cfg, rank: int = 0, *, hold_at_step: int, hold_rank: int, marker: str, **kwargs):
        super().__init__(cfg, rank, **kwargs)
        self.hold_at_step, self.hold_rank, self.marker = hold_at_step, hold_rank, marker

    def step(self, batch, step, engines):
        if step == self.hold_at_step and self.rank == self.hold_rank and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(time.time()))
            time.sleep(HOLD_S)
        return super().step(batch, step, engines)


def held_stage(cfg, rank: int = 0, **kwargs) -> HeldStage:
    return HeldStage(cfg, rank, **kwargs)


def _rank_main(cfg, rank: int, world: int, port: int, log: str, stage_kwargs: dict) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from dmvae_scale.train.worker import WorkerJob, run_worker
    result = run_worker(WorkerJob(cfg, stage_factory=functools.partial(held_stage, **stage_kwargs),
                                  dataset_factory=toys.vector_data))
    print(f"worker result: {result.status}", flush=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_held_back_rank_is_named_within_the_timeout_and_the_waiting_worker_fails(tmp_path):
    timeout_s = 5
    cfg = toys.toy_config(tmp_path / "run", f"distributed.timeout_s={timeout_s}")
    marker = tmp_path / "held"
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(cfg, r, 2, port, str(logs[r]),
                                                  dict(hold_at_step=2, hold_rank=1, marker=str(marker))))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        _wait_for(marker.exists, 300, "rank 1 never reached the step where it is held back")
        held_at = float(marker.read_text())
        _wait_for(lambda: not procs[0].is_alive(), timeout_s + GRACE_S + 60,
                  f"rank 0 still waits {timeout_s + GRACE_S + 60} s after rank 1 was held back")
        ended_after = time.time() - held_at
        assert procs[1].is_alive(), "rank 1 ended its hold: rank 0 was not failed before it"
        procs[0].join()
        log0 = logs[0].read_text()
        assert procs[0].exitcode not in (0, None), log0[-3000:]
        # the report comes at timeout_s; gloo's own timeout (timeout_s + GRACE_S) then raises, named
        assert timeout_s <= ended_after < HOLD_S / 2, ended_after
        line = (f"[train rank 0] stalled in all_reduce(nonfinite guard) for {timeout_s} s "
                f"(distributed.timeout_s={timeout_s}): another worker has not reached it; this worker fails so that "
                f"the group restarts from the last checkpoint")
        assert line in log0.splitlines(), log0[-3000:]
        assert log0.count("stalled in") >= 2  # the line, and the error that fails the worker
        assert "CollectiveStalledError: rank 0 stalled in all_reduce(nonfinite guard) for" in log0, log0[-3000:]
        assert "worker result" not in log0
        print(line, f"(rank 0 ended {ended_after:.1f} s after rank 1 was held back)", file=sys.stderr)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=30)


def _never_returns(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["RANK"] = "3"  # what the log lines' prefix reads (no process group here)
    from dmvae_scale.train.watchdog import Watchdog, watched
    Watchdog(timeout_s=2, rank=3).start()
    with watched("barrier(a wait no backend times out)"):
        time.sleep(HOLD_S)


def test_an_operation_that_never_returns_ends_the_process_with_exit_75(tmp_path):
    log = tmp_path / "worker.log"
    proc = multiprocessing.get_context("spawn").Process(target=_never_returns, args=(str(log),))
    began = time.monotonic()
    proc.start()
    try:
        proc.join(timeout=60)
        took = time.monotonic() - began
        assert proc.exitcode == STALL_EXIT, log.read_text()
        assert took < 40, took  # 2 s to the report, 2 x GRACE_S more to the exit, plus the spawn
        lines = log.read_text().splitlines()
        assert lines[0].startswith("[train rank 3] stalled in barrier(a wait no backend times out) for 2 s "
                                   "(distributed.timeout_s=2)"), lines
        assert lines[-1].startswith("[train rank 3] barrier(a wait no backend times out) still has not returned "
                                    "after 12 s; exiting with 75"), lines
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=30)


@pytest.fixture(scope="module")
def ray_session(ray_cluster):  # noqa: F811
    import ray
    from dmvae_scale.distributed.ray_local import connected
    ray.cloudpickle.register_pickle_by_value(toys)  # workers do not import the tests directory
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    with connected(ray_cluster, log_to_driver=False, runtime_env={"env_vars": env}):
        yield ray_cluster


def test_under_ray_train_a_held_back_worker_restarts_the_group_from_the_last_checkpoint(ray_session, tmp_path):
    import json
    from dmvae_scale.train.launch import train
    marker = tmp_path / "held"
    run_dir = tmp_path / "run"
    cfg = toys.toy_config(run_dir, "distributed.max_failures=1", "distributed.timeout_s=5")
    began = time.monotonic()
    result = train(cfg, stage_factory=functools.partial(held_stage, hold_at_step=6, hold_rank=1, marker=str(marker)),
                   dataset_factory=toys.vector_data)
    took = time.monotonic() - began
    assert marker.exists(), "rank 1 was never held back"
    assert result.status == "done" and result.images_seen == 96
    logged = [int(json.loads(line)["images"]) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # steps 0-5 logged (8..48 images); rank 1 was held in step 6; the restart resumed from the checkpoint at 32
    assert logged[:6] == [8, 16, 24, 32, 40, 48] and logged[6] == 40, logged
    assert sorted(set(logged[6:])) == list(range(40, 97, 8))
    assert took < HOLD_S  # the held worker is killed with its group, not waited for
    reports = [line for path in Path(ray_session.temp_dir).rglob("worker-*.err")
               for line in path.read_text(errors="replace").splitlines()
               if "stalled in all_reduce(nonfinite guard) for 5 s (distributed.timeout_s=5)" in line]
    assert any(line.startswith("[train rank 0] stalled in") for line in reports), reports
    print(reports[0], f"(run finished in {took:.0f} s)", file=sys.stderr)
