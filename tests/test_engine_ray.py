"""The distributed engine end to end: Ray Train workers (2, on CPU, gloo) running stages under DeepSpeed.

- ZeRO 1, 2 and 3 reach the single-process loss trajectory, weights and EMA of the same seed;
- a worker killed mid-run: Ray Train restarts the group, it resumes from the last complete checkpoint, and the
  trajectory from there on equals the uninterrupted run's;
- SIGTERM to the driver: workers checkpoint and stop; the run resumes on 1 worker through DeepSpeed's universal
  checkpoint with the exact data order;
- non-finite losses on one worker skip the step on both and, in a run, stop the run with the last good checkpoint;
- the DMD stage (tokenizer, fake score, discriminator engines; frozen real score) under ZeRO-2.
One Ray head serves the whole module (tests/ray_cluster.py).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_engine_toys as toys
from dmvae_scale.distributed.ray_local import connected
from dmvae_scale.train import checkpoint as ckpt
from dmvae_scale.train.launch import TrainingStoppedError, train

pytestmark = pytest.mark.integration

REL_TOL = 1e-5  # DeepSpeed vs single process: the same math, reduced in another order (fp32)


@pytest.fixture(scope="module")
def ray_session(ray_cluster):  # noqa: F811
    import ray
    ray.cloudpickle.register_pickle_by_value(toys)  # workers do not import the tests directory
    env = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    with connected(ray_cluster, log_to_driver=False, runtime_env={"env_vars": env}):
        yield ray_cluster


def metrics_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def last_by_images(entries) -> dict[int, dict]:
    return {int(e["images"]): e for e in entries}


def assert_close(a: float, b: float, rel: float, what: str) -> None:
    assert abs(a - b) <= rel * max(abs(b), 1e-12), f"{what}: {a} vs {b} (rel {abs(a - b) / max(abs(b), 1e-12):.2e})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = toys.toy_config(tmp_path_factory.mktemp("ref"))
    return toys.single_process_run(cfg)


@pytest.fixture(scope="module")
def zero2_run(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2")
    result = train(toys.toy_config(run_dir), stage_factory=toys.toy_stage, dataset_factory=toys.vector_data)
    return run_dir, result


def check_against_reference(run_dir, result, reference, rel):
    ref_hist, ref_weights, ref_ema = reference
    assert result.status == "done" and result.images_seen == 96
    got = last_by_images(metrics_log(run_dir))
    assert sorted(got) == sorted(ref_hist) == list(range(8, 97, 8))
    for images, ref in ref_hist.items():
        for key in ("loss", "critic_loss", "ids", "ids_sq"):
            if key in ref:
                assert_close(got[images][key], ref[key], rel, f"{key} at {images} images")
    weights = load_file(str(Path(run_dir) / "artifact" / "weights.safetensors"))
    ema = load_file(str(Path(run_dir) / "artifact" / "ema.safetensors"))
    for name, sd in ref_weights.items():
        for k, v in sd.items():
            torch.testing.assert_close(weights[f"{name}.{k}"], v, rtol=1e-4, atol=1e-6)
    for k, v in ref_ema["student"].items():
        torch.testing.assert_close(ema[f"student.{k}"], v, rtol=1e-4, atol=1e-6)


def test_zero2_two_workers_match_single_process(zero2_run, reference):
    run_dir, result = zero2_run
    check_against_reference(run_dir, result, reference, REL_TOL)
    latest = ckpt.CheckpointStore(str(run_dir)).latest()
    assert latest.images_seen == 96 and latest.world_size == 2 and latest.engines == ["critic", "student"]


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_zero_1_and_3_two_workers_match_single_process(ray_session, tmp_path, reference, zero_stage):
    # ZeRO-3 also partitions the frozen teacher (threshold 0): a sharded frozen model must compute the same targets.
    cfg = toys.toy_config(tmp_path, f"distributed.zero_stage={zero_stage}")
    result = train(cfg, stage_factory=toys.toy_stage, dataset_factory=toys.vector_data,
                   shard_frozen_above_bytes=0 if zero_stage == 3 else None)
    check_against_reference(tmp_path, result, reference, REL_TOL)


def test_killed_worker_restarts_and_resumes_exactly(zero2_run, tmp_path):
    marker = tmp_path / "killed"
    run_dir = tmp_path / "run"
    cfg = toys.toy_config(run_dir, "distributed.max_failures=1")
    result = train(cfg, stage_factory=toys.toy_factory(kill_at_step=6, kill_rank=1, kill_marker=str(marker)),
                   dataset_factory=toys.vector_data)
    assert marker.exists(), "the worker was never killed"
    entries = metrics_log(run_dir)
    logged = [int(e["images"]) for e in entries]
    # steps 0-5 logged (8..48 images); rank 1 died in step 6; the restart resumed from the checkpoint at 32 images
    assert logged[:6] == [8, 16, 24, 32, 40, 48] and logged[6] == 40, logged
    assert result.status == "done" and result.images_seen == 96
    uninterrupted = last_by_images(metrics_log(zero2_run[0]))
    resumed = last_by_images(entries[6:])
    assert sorted(resumed) == list(range(40, 97, 8))
    for images, entry in resumed.items():
        for key in ("loss", "critic_loss", "ids", "ids_sq"):
            if key in entry:
                assert_close(entry[key], uninterrupted[images][key], 1e-6, f"{key} at {images} images")


def test_sigterm_checkpoints_then_resume_on_one_worker_is_exact(ray_session, tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = toys.toy_config(run_dir, "total_images=2400", "ckpt_every_images=24")
    store = ckpt.CheckpointStore(str(run_dir))

    def terminate_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while store.latest() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler does to the driver

    killer = threading.Thread(target=terminate_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(TrainingStoppedError, match=r"stopped on request at (\d+) of total_images=2400 images; "
                                                   r"checkpoint .*; run the same command again to resume") as err:
        train(cfg, stage_factory=toys.toy_factory(sleep_s=0.05), dataset_factory=toys.vector_data)
    killer.join(timeout=5)
    stopped = store.latest()
    assert 24 <= stopped.images_seen < 2400 and stopped.world_size == 2
    assert f"stopped on request at {stopped.images_seen} of" in str(err.value)
    assert err.value.result.status == "stopped" and err.value.result.images_seen == stopped.images_seen

    # Resume the 2-worker ZeRO-2 checkpoint on 1 worker, to 96 images in all (universal checkpoint conversion).
    total = stopped.images_seen + 48
    second = train(toys.toy_config(run_dir, "distributed.num_workers=1", f"total_images={total}"),
                   stage_factory=toys.toy_stage, dataset_factory=toys.vector_data)
    assert second.status == "done" and second.images_seen == total
    assert (Path(stopped.url) / "engines" / "student" / "zero_universal" / ".complete").is_file()
    # The data order continues exactly; with no randomness in the stage, so does the loss (same math, 1 rank).
    ref_cfg = toys.toy_config(tmp_path / "ref", f"total_images={total}")
    ref_hist, _, _ = toys.single_process_run(ref_cfg)
    resumed = last_by_images(metrics_log(run_dir))
    for images in range(stopped.images_seen + 8, total + 1, 8):
        assert resumed[images]["ids"] == ref_hist[images]["ids"]
        assert resumed[images]["ids_sq"] == ref_hist[images]["ids_sq"]
        assert_close(resumed[images]["loss"], ref_hist[images]["loss"], REL_TOL, f"loss at {images}")


def test_non_finite_on_one_worker_skips_both_and_a_run_of_them_stops(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    cfg = toys.toy_config(run_dir, "max_nonfinite_steps=2", "ckpt_every_images=16")
    with pytest.raises(TrainingStoppedError, match=r"3 consecutive steps with a non-finite loss.*"
                                                   r"last good checkpoint: .*img-000000000032"):
        train(cfg, stage_factory=toys.toy_factory(nan_from_step=4, nan_rank=1), dataset_factory=toys.vector_data)
    entries = last_by_images(metrics_log(run_dir))
    assert entries[32]["skipped_steps"] == 0 and entries[40]["skipped_steps"] == 1  # both workers agreed to skip
    latest = ckpt.CheckpointStore(str(run_dir)).latest()
    assert latest.images_seen == 32  # nothing written after the loss went bad


# ----------------------------------------------------------------------------------------------------------------------
# The real DMD stage
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dmd_inputs(tmp_path_factory):
    """Tiny tokenizer and reference artifacts made by the real stages (untrained), as tests/test_stages.py does."""
    from dmvae_scale.train.stages import AutoencoderStage, FlowMatchingStage, save_stage_artifact
    from plain_engine import EMA
    root = tmp_path_factory.mktemp("dmd_inputs")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo"
    from dmvae_scale.config import load_config
    tok_cfg = load_config(demo / "tokenizer.yaml", [f"run_dir={root}/tokenizer"])
    tok = AutoencoderStage(tok_cfg)
    save_stage_artifact(tok, {"tokenizer": EMA(tok.tokenizer, 0.9)}, tok_cfg, root / "tokenizer")
    ref_cfg = load_config(demo / "reference.yaml", ["reference.kind=gaussian", "inputs.tokenizer=null"])
    ref = FlowMatchingStage(ref_cfg)
    ref.prepare([{"image": torch.zeros(8, 3, 32, 32), "label": torch.zeros(8, dtype=torch.long)}])
    save_stage_artifact(ref, {"real_score": EMA(ref.score, 0.9)}, ref_cfg, root / "reference")
    return root, demo


def test_dmd_stage_three_engines_zero2_two_workers(ray_session, dmd_inputs, tmp_path):
    from dmvae_scale.artifacts import load_artifact
    from dmvae_scale.config import load_config
    root, demo = dmd_inputs
    cfg = load_config(demo / "dmd.yaml", [
        f"run_dir={tmp_path}/dmd", f"inputs.tokenizer={root}/tokenizer", f"inputs.real_score={root}/reference",
        "batch_size=8", "total_images=32", "log_every_images=16", "ckpt_every_images=1000", "dm.tokenizer_every=2",
        "data.limit=64", "distributed.num_workers=2", "distributed.zero_stage=2"])
    result = train(cfg)
    assert result.status == "done" and result.images_seen == 32
    latest = ckpt.CheckpointStore(cfg.run_dir).latest()
    assert latest.engines == ["discriminator", "fake_score", "tokenizer"] and latest.zero_stage == 2
    last = result.history[-1]
    for key in ("fake_fm_loss", "dm_loss", "loss"):
        assert key in last and torch.isfinite(torch.tensor(last[key])), (key, last)
    info, weights = load_artifact(Path(cfg.run_dir) / "artifact", which="raw")
    _, real = load_artifact(root / "reference", which="ema")
    moved = max((weights["fake_score"][k] - real["real_score"][k]).abs().max().item() for k in real["real_score"])
    assert moved > 0, "the fake score never trained"
    assert info.upstream == {"tokenizer": load_artifact(root / "tokenizer")[0].id,
                             "real_score": load_artifact(root / "reference")[0].id}


# ----------------------------------------------------------------------------------------------------------------------
# Ray Train as Ray Train: reports, preemption notices, user errors
# ----------------------------------------------------------------------------------------------------------------------

def test_a_preemption_notice_checkpoints_at_once_and_the_run_finishes_reporting_to_ray(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    store = ckpt.CheckpointStore(str(run_dir))
    cfg = toys.toy_config(run_dir, "total_images=480", "ckpt_every_images=0")  # no checkpoint but the notice's

    def notice_after_first_log(control):
        def later():
            deadline = time.monotonic() + 240
            while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            control.notify_preemption.remote()  # what Ray's preemption notice does through get_preemption_info
        threading.Thread(target=later, daemon=True).start()

    result = train(cfg, stage_factory=toys.toy_factory(sleep_s=0.05), dataset_factory=toys.vector_data,
                   control_hook=notice_after_first_log)
    assert result.status == "done" and result.images_seen == 480
    saved = [i.images_seen for i in store.complete()]
    assert len(saved) == 2 and 0 < saved[0] < 480 and saved[0] % 80 == 0 and saved[1] == 480, saved
    # ray.train.report at every log interval: the Result holds the last report's metrics ...
    assert result.reported["images"] == 480
    assert result.reported["loss"] == pytest.approx(result.history[-1]["loss"], rel=1e-12)
    # ... and Ray's checkpoint is a pointer to the manifest of the latest complete checkpoint.
    ray_dir = run_dir / "ray"
    pointers = sorted(ray_dir.rglob("latest.json"))
    assert pointers, f"no pointer checkpoint under {ray_dir}"
    latest = json.loads(max(pointers, key=lambda p: json.loads(p.read_text())["images_seen"]).read_text())
    assert latest == {"manifest": f"{store.url(ckpt.checkpoint_name(480))}/{ckpt.MANIFEST}", "images_seen": 480}


def test_a_user_error_in_a_worker_reaches_the_cli_at_once_with_exit_2(ray_session, tmp_path, capsys):
    from dmvae_scale.cli import main
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo"
    began = time.monotonic()
    rc = main(["train", str(demo / "reference.yaml"), f"run_dir={tmp_path}/run", "inputs.tokenizer=/nowhere/artifact",
               "distributed.num_workers=2", "batch_size=8", "--no-progress"])
    took = time.monotonic() - began
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: inputs.tokenizer: artifact not found: /nowhere/artifact" in err
    assert "restarts" not in err and took < 30, (took, err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
