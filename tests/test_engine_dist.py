"""DeepSpeed workers as plain processes (no Ray): a checkpoint killed half-way is never resumed from, and a run
directory in S3 (SeaweedFS) checkpoints, resumes and exports like a local one."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import deepspeed  # noqa: F401  (the workers build DeepSpeed engines; conftest reads this import on bare machines)
import pytest
import torch
from safetensors.torch import load_file

import test_engine_toys as toys
from dmvae_scale.train import checkpoint as ckpt
from dmvae_scale.localhost import free_port

pytestmark = pytest.mark.integration


def _worker_main(cfg, stage_kwargs, port, queue):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from dmvae_scale.train.worker import WorkerJob, run_worker
    try:
        result = run_worker(WorkerJob(cfg, stage_factory=toys.toy_factory(**stage_kwargs),
                                      dataset_factory=toys.vector_data))
        queue.put(("ok", result))
    except Exception as exc:  # report instead of leaving the parent waiting
        queue.put(("error", repr(exc)))


def start_worker(cfg, **stage_kwargs):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker_main, args=(cfg, stage_kwargs, free_port(), queue))
    proc.start()
    return proc, queue


def run_worker_process(cfg, **stage_kwargs):
    proc, queue = start_worker(cfg, **stage_kwargs)
    try:
        status, result = queue.get(timeout=300)
    finally:
        proc.join(timeout=60)
    assert status == "ok", result
    return result


def test_a_checkpoint_killed_half_way_is_never_resumed_from(tmp_path):
    run_dir = tmp_path / "run"
    # A 2.5M-parameter student: the second checkpoint takes long enough to be cut by a kill.
    cfg = toys.toy_config(run_dir, "distributed.num_workers=1", "total_images=32", "ckpt_every_images=16")
    store = ckpt.CheckpointStore(str(run_dir))
    proc, _ = start_worker(cfg, hidden=250_000)
    second = Path(store.url(ckpt.checkpoint_name(32)))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.is_alive():
            if store.latest() is not None and second.is_dir() and any(p.is_file() for p in second.rglob("*.pt")):
                os.kill(proc.pid, signal.SIGKILL)  # the worker dies while writing the checkpoint at 32 images
                break
            time.sleep(0.002)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL, "the worker finished before it could be killed mid-save"
    assert second.is_dir() and not (second / ckpt.MANIFEST).exists()
    assert store.latest().images_seen == 16

    resumed = run_worker_process(cfg, hidden=250_000)
    assert resumed.status == "done" and resumed.images_seen == 32
    assert [int(h["images"]) for h in resumed.history] == [24, 32]  # continued after the complete checkpoint at 16
    assert [i.images_seen for i in store.complete()] == [16, 32]


def test_run_directory_in_s3_checkpoints_resumes_and_exports(s3_bucket, tmp_path):
    run_dir = f"{s3_bucket}/toy"
    first = run_worker_process(toys.toy_config(run_dir, "distributed.num_workers=1", "total_images=16",
                                               "ckpt_every_images=8"))
    assert first.status == "done" and first.checkpoint == f"{run_dir}/checkpoints/{ckpt.checkpoint_name(16)}"
    second = run_worker_process(toys.toy_config(run_dir, "distributed.num_workers=1", "total_images=32",
                                                "ckpt_every_images=8"))
    assert [int(h["images"]) for h in second.history] == [24, 32]
    store = ckpt.CheckpointStore(run_dir)
    assert [i.images_seen for i in store.complete()] == [16, 24, 32]  # keep_checkpoints=3

    # The run's 32-image trajectory equals an uninterrupted single-process run of the same seed.
    ref, _, _ = toys.single_process_run(toys.toy_config(tmp_path / "ref", "total_images=32"))
    for h in first.history + second.history:
        assert abs(h["loss"] - ref[int(h["images"])]["loss"]) <= 1e-5 * abs(ref[int(h["images"])]["loss"])

    from dmvae_scale.cli import main
    out = tmp_path / "student.safetensors"
    assert main(["export", run_dir, "--out", str(out), "--weights", "ema", "--models", "student"]) == 0
    exported = load_file(str(out))
    from dmvae_scale.data import storage
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "ema.safetensors").write_bytes(storage.read_bytes(f"{run_dir}/artifact/ema.safetensors"))
    in_artifact = load_file(str(artifact / "ema.safetensors"))
    assert set(exported) == {k for k in in_artifact if k.startswith("student.")}
    for k, v in exported.items():
        torch.testing.assert_close(v, in_artifact[k], rtol=0, atol=0)
    assert storage.exists(f"{run_dir}/metrics.jsonl")


@pytest.mark.gpu
def test_one_gpu_worker_trains_in_bf16_and_reports_mfu(tmp_path):
    from dmvae_scale.train.reporting import peak_flops
    cfg = toys.toy_config(tmp_path / "run", "distributed.num_workers=1", "distributed.use_gpu=true",
                          "total_images=32")
    result = run_worker_process(cfg)
    assert result.status == "done" and result.images_seen == 32
    last = result.history[-1]
    assert last["tflops_per_worker"] > 0 and torch.isfinite(torch.tensor(last["loss"]))
    if peak_flops(torch.device("cuda", 0), "bf16") is not None:  # a GPU of the peak table
        assert 0 < last["mfu"] < 1
