"""One driver: `dmvae-scale train` with one worker is the DeepSpeed worker at world size 1 in this process, with the
same checkpoints, automatic resume, metrics, stop handling and data readers as N workers under Ray Train. Also the
config checks `config.validate` makes before anything runs, and the command line's own promises."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo import DEMO, REPO
from dmvae_scale.cli import main
from dmvae_scale.config import load_config
from dmvae_scale.train import checkpoint as ckpt

# The demo tokenizer stage, small: tokenizer and discriminator engines (the GAN starts at step 2), fp32 on CPU.
SMALL = ["batch_size=16", "data.limit=64", "log_every_images=16", "loss.gan_start_step=2"]
NOT_LOSSES = {"images", "images_per_second", "tflops_per_worker", "skipped_steps", "mfu"}


def train_cli(run_dir, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dmvae_scale.cli", "train", str(DEMO / "tokenizer.yaml"),
                             f"run_dir={run_dir}", *SMALL, *overrides, "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------------------------
# Resume, extend, stop: the local launcher
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    rc, out, err = finish(train_cli(run_dir, "total_images=160", "ckpt_every_images=48"))
    assert rc == 0, err
    return run_dir


@pytest.mark.integration
def test_a_killed_one_worker_run_resumes_with_no_flag_on_the_same_trajectory(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    store = ckpt.CheckpointStore(str(run_dir))
    proc = train_cli(run_dir, "total_images=160", "ckpt_every_images=48")
    wait_for(lambda: store.latest() is not None, proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = store.latest().images_seen
    assert killed_at < 160

    rc, out, err = finish(train_cli(run_dir, "total_images=160", "ckpt_every_images=48"))
    assert rc == 0, err
    assert f"resumed from {store.url(ckpt.checkpoint_name(killed_at))} ({killed_at} images, 1 workers)" in out
    resumed = {int(e["images"]): e for e in metrics(run_dir)}  # the resumed run's lines come last: they win
    reference = {int(e["images"]): e for e in metrics(uninterrupted)}
    assert sorted(resumed) == sorted(reference) == list(range(16, 161, 16))
    for images in range(killed_at + 16, 161, 16):
        for key, ref in reference[images].items():
            if key not in NOT_LOSSES:
                got = resumed[images][key]
                assert abs(got - ref) <= 1e-6 * abs(ref), f"{key} at {images} images: {got} vs {ref}"


@pytest.mark.integration
def test_raising_total_images_trains_only_the_missing_images(uninterrupted):
    before = len(metrics(uninterrupted))
    rc, out, err = finish(train_cli(uninterrupted, "total_images=224", "ckpt_every_images=48"))
    assert rc == 0, err
    assert f"resumed from {uninterrupted}/checkpoints/{ckpt.checkpoint_name(160)} (160 images" in out
    assert "tokenizer: 64 images in 4 steps" in out
    assert [int(e["images"]) for e in metrics(uninterrupted)[before:]] == [176, 192, 208, 224]
    assert ckpt.CheckpointStore(str(uninterrupted)).latest().images_seen == 224


@pytest.mark.integration
def test_a_stopped_run_exits_non_zero_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, "total_images=100000", "ckpt_every_images=0")
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), proc)
    os.kill(proc.pid, signal.SIGTERM)
    rc, out, err = finish(proc, timeout=120)
    latest = ckpt.CheckpointStore(str(run_dir)).latest()
    assert rc == 2 and latest is not None and latest.images_seen < 100000
    assert (f"error: stopped on request at {latest.images_seen} of total_images=100000 images; checkpoint "
            f"{latest.url}; run the same command again to resume from it") in err


# ----------------------------------------------------------------------------------------------------------------------
# Data readers: shards in a directory and in S3
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_one_worker_trains_from_a_shard_directory_and_from_s3_shards(s3_bucket, tmp_path):
    from dmvae_scale.data import storage
    from dmvae_scale.data.shards import write_shards
    from dmvae_scale.train.launch import run_local
    local, remote = str(tmp_path / "shards"), f"{s3_bucket}/fmnist"
    for dest in (local, remote):
        write_shards("fashion-mnist", dest, limit=64, part_size=64, workers=1, progress=False)

    cfg = load_config(DEMO / "tokenizer.yaml", [f"run_dir={tmp_path}/local", f"data.source={local}", *SMALL,
                                                "total_images=32", "log_images_every_images=16"])
    result = run_local(cfg, progress=False)
    assert result.status == "done" and result.images_seen == 32 and result.steps == 2
    assert (tmp_path / "local" / "artifact" / "weights.safetensors").is_file()
    # TensorBoard got a grid of 8 images over their 8 reconstructions (32x32, 2-pixel padding) every 16 images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "local" / "tensorboard"))
    events.Reload()
    grids = events.Images("reconstructions")
    assert [g.step for g in grids] == [16, 32] and (grids[0].height, grids[0].width) == (70, 274)

    # s3:// shards into an s3:// run directory; a second, longer run resumes and appends to metrics.jsonl there.
    run_dir = f"{s3_bucket}/run"
    for total in (32, 64):
        cfg = load_config(DEMO / "tokenizer.yaml", [f"run_dir={run_dir}", f"data.source={remote}", *SMALL,
                                                    f"total_images={total}"])
        result = run_local(cfg, progress=False)
        assert result.status == "done" and result.images_seen == total
    lines = storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["images"] for line in lines] == [16, 32, 48, 64]
    assert storage.exists(f"{run_dir}/artifact/weights.safetensors")
    assert [i.images_seen for i in ckpt.CheckpointStore(run_dir).complete()] == [32, 64]


# ----------------------------------------------------------------------------------------------------------------------
# config.validate through `config show`: exit 2, the message names the key
# ----------------------------------------------------------------------------------------------------------------------

BAD = [
    ("tokenizer", ["batch_size=0"], "batch_size: must be positive"),
    ("tokenizer", ["total_images=0"], "total_images: must be positive"),
    ("tokenizer", ["log_every_images=0"], "log_every_images: must be positive"),
    ("tokenizer", ["keep_checkpoints=0"], "keep_checkpoints: must be positive"),
    ("tokenizer", ["ckpt_every_images=-1"], "ckpt_every_images: must be >= 0"),
    ("tokenizer", ["max_nonfinite_steps=-1"], "max_nonfinite_steps: must be >= 0"),
    ("tokenizer", ["distributed.num_workers=0"], "distributed.num_workers: must be positive"),
    ("tokenizer", ["distributed.grad_accum=0"], "distributed.grad_accum: must be positive"),
    ("tokenizer", ["distributed.max_failures=-1"], "distributed.max_failures: must be >= 0"),
    ("tokenizer", ["batch_size=30", "distributed.num_workers=4"], "batch_size: 30 is not divisible by "
                                                                  "distributed.num_workers x distributed.grad_accum"),
    ("tokenizer", ["distributed.precision=fp16"], "distributed.precision: expected one of 'auto', 'fp32', 'bf16'"),
    ("tokenizer", ["optim.ema_decay=1.0"], "optim.ema_decay: must be in [0, 1)"),
    ("tokenizer", ["optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0"),
    ("tokenizer", ["tokenizer.image_size=30", "data.image_size=30"], "tokenizer.image_size: 30 is not a multiple of "
                                                                     "tokenizer.encoder.patch_size=4"),
    ("tokenizer", ["data.image_size=16"], "data.image_size=16 differs from tokenizer.image_size=32"),
    ("generator", ["score.patch_size=3"], "score.input_size: 8 is not a multiple of score.patch_size=3"),
    ("dmd", ["dm.t_min=0.5", "dm.t_max=0.4"], "dm.t_min/dm.t_max: need 0 <= t_min < t_max <= 1"),
    ("dmd", ["dm.tokenizer_every=0"], "dm.tokenizer_every: must be >= 1"),
    ("dmd", ["dm.t_anneal_steps=10", "dm.t_anneal_min_final=1.0"], "dm.t_anneal_min_final=1.0 must lie in"),
    ("generator", ["sampler.guidance_interval=[0.5,0.2]"], "sampler.guidance_interval: need 0 <= lo < hi <= 1"),
    ("reference", ["data.stats_images=0"], "data.stats_images: must be positive"),
    ("generator", ["sampler.steps=0"], "sampler.steps: must be positive"),
    ("tokenizer", ["teacher.replicas=0"], "teacher.replicas: must be at least 1"),
    ("tokenizer", ["teacher.name=inception"], "teacher.name: 'inception' serves features only"),
    ("tokenizer", ["discriminator.diffaug=false"], "discriminator.consistency_weight > 0 needs "
                                                   "discriminator.diffaug=true"),
    ("decoder", ["tokenizer.encoder.frozen=false"], "tokenizer.encoder.frozen: the decoder stage keeps encoder"),
    ("reference", ["reference.kind=gmm", "reference.gmm_components=0"], "reference.gmm_components/gmm_std: need"),
]


@pytest.mark.unit
@pytest.mark.parametrize("stage,overrides,message", BAD, ids=[" ".join(o) for _, o, _ in BAD])
def test_config_show_refuses_a_bad_config_naming_the_key(stage, overrides, message, capsys):
    assert main(["config", "show", str(DEMO / f"{stage}.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.unit
def test_every_shipped_config_passes_validation():
    stages = [p for p in sorted((REPO / "configs").glob("*/*.yaml")) if p.stem in ("tokenizer", "reference", "dmd",
                                                                               "decoder", "generator")]
    assert len(stages) >= 10
    for path in stages:
        load_config(path)


# ----------------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_version_and_overrides_anywhere_on_the_line(capsys):
    from dmvae_scale import __version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"dmvae-scale {__version__}"
    # Overrides before, between and after the flags, in their order.
    from dmvae_scale.cli import build_parser, parse_args
    args = parse_args(build_parser(), ["sample", "ART", "sampler.cfg_scale=1.5", "--out", "d", "--per-class", "10",
                                       "sampler.steps=50"])
    assert (args.generator, args.out, args.per_class) == ("ART", "d", 10)
    assert args.overrides == ["sampler.cfg_scale=1.5", "sampler.steps=50"]
    # a pipeline's every-step override (*:KEY=VALUE) after the flags too, beside a one-step one
    args = parse_args(build_parser(), ["pipeline", "DIR", "--store", "s", "--check", "*:launcher=auto",
                                       "generator:launcher=ray"])
    assert (args.config_dir, args.store, args.overrides) == ("DIR", "s", ["*:launcher=auto", "generator:launcher=ray"])
    assert main(["config", "show", str(DEMO / "tokenizer.yaml"), "batch_size=8"]) == 0
    assert "batch_size: 8" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # a command without overrides names them unrecognized
        main(["models", "score.depth=2"])
    assert exit_.value.code == 2 and "unrecognized arguments: score.depth=2" in capsys.readouterr().err
    args = parse_args(build_parser(), ["train", "c.yaml"])
    assert args.device == "auto"
    args = parse_args(build_parser(), ["export", "runs/x", "--out", "w.safetensors"])
    assert args.out == "w.safetensors"
