"""Engine pieces without a process group: DeepSpeed configs from the typed config, the checkpoint store (manifest
last, latest complete, keep-last-k), refusal of a resume that changes what a checkpoint means, and the EMA that is
partitioned over workers."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from dmvae_scale.artifacts import ArtifactInfo, LatentSpec, save_artifact
from dmvae_scale.config import ConfigError, dump_yaml, load_config
from dmvae_scale.train import checkpoint as ckpt
from dmvae_scale.train.checkpoint import durable
from dmvae_scale.train.deepspeed_engine import deepspeed_config, resolve_precision
from dmvae_scale.train.ema import ShardedEMA, consolidate_ema_shards
from dmvae_scale.train.launch import check_run_dir
from plain_engine import EMA

pytestmark = pytest.mark.unit


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------------------------------

def test_deepspeed_config_follows_the_run_config():
    cfg = load_config(None, ["distributed.zero_stage=3", "distributed.grad_accum=2", "optim.grad_clip=0.5",
                             "batch_size=32", "distributed.num_workers=4"])
    ds = deepspeed_config(cfg.optim, cfg.distributed, micro_batch=4, world_size=4, load_universal=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 == 4 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["checkpoint"] == {"load_universal": True}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # bf16 is autocast around the step


def test_precision_auto_is_fp32_on_cpu_and_fp16_is_refused_by_the_config():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match=r"distributed.precision: expected one of 'auto', 'fp32', 'bf16', got 'fp16'"):
        load_config(None, ["distributed.precision=fp16"])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint store
# ----------------------------------------------------------------------------------------------------------------------

def _fake_checkpoint(store: ckpt.CheckpointStore, images: int, meaning=None, manifest=True) -> str:
    """Files as a save leaves them (shards, rank state), then - when complete - the manifest, last."""
    name = ckpt.checkpoint_name(images)
    store.prepare(name)
    d = Path(store.url(name))
    (d / "engines" / "net" / "zero").mkdir(parents=True)
    (d / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt").write_bytes(b"w" * (100 + images))
    (d / "ranks").mkdir()
    (d / "ranks" / "rank-00000.pt").write_bytes(b"r" * 50)
    if manifest:
        store.write_manifest(name, images_seen=images, step=images // 8, world_size=1, zero_stage=2,
                             engines=["net"], meaning=meaning or {"stage": "tokenizer"}, config_hash="h")
    return name


def test_latest_is_the_newest_complete_checkpoint_never_a_partial_one(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path), keep=5)
    assert store.latest() is None
    _fake_checkpoint(store, 16)
    _fake_checkpoint(store, 32)
    _fake_checkpoint(store, 48, manifest=False)  # interrupted before its manifest
    assert store.latest().images_seen == 32

    # A manifest whose files were cut short (an upload that died after it, or a damaged store) is not complete.
    cut = _fake_checkpoint(store, 64)
    shard = Path(store.url(cut)) / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:10])
    assert store.latest().images_seen == 32
    assert "mp_rank_00_model_states.pt has 10 bytes, the manifest says 164" in store.verify(store.read_manifest(cut))
    shard.write_bytes(whole)
    assert store.latest().images_seen == 64
    (Path(store.url(cut)) / "ranks" / "rank-00000.pt").unlink()
    assert "ranks/rank-00000.pt is missing" in store.verify(store.read_manifest(cut))

    # The newest by mtime or size does not matter: only the manifest's images_seen orders checkpoints.
    big = Path(store.url(ckpt.checkpoint_name(16))) / "engines" / "net" / "zero" / "extra.pt"
    big.write_bytes(b"x" * 10_000)  # an unlisted file added later does not make it "newer"
    assert store.latest().images_seen == 32


def test_keep_last_k_removes_older_and_incomplete_checkpoints(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path), keep=2)
    for images in (8, 16, 24):
        _fake_checkpoint(store, images)
    _fake_checkpoint(store, 32, manifest=False)
    removed = store.prune()
    assert removed == [ckpt.checkpoint_name(8), ckpt.checkpoint_name(32)]
    assert [i.images_seen for i in store.complete()] == [16, 24]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        [ckpt.checkpoint_name(16), ckpt.checkpoint_name(24)]


def test_background_prune_finishes_before_the_next_save_and_warns_on_errors(tmp_path, monkeypatch, caplog):
    store = ckpt.CheckpointStore(str(tmp_path), keep=1)
    for images in (8, 16):
        _fake_checkpoint(store, images)
    gate = threading.Event()
    real_remove = store.remove

    def slow_remove(name):
        gate.wait(10)
        real_remove(name)

    monkeypatch.setattr(store, "remove", slow_remove)
    assert store.prune(background=True) == [ckpt.checkpoint_name(8)]
    assert (tmp_path / "checkpoints" / ckpt.checkpoint_name(8)).exists()  # still deleting: training went on
    gate.set()
    store.prepare(ckpt.checkpoint_name(24))  # the next save joins the prune before it writes
    assert not (tmp_path / "checkpoints" / ckpt.checkpoint_name(8)).exists()
    monkeypatch.setattr(store, "remove", real_remove)

    def failing_remove(name):
        raise PermissionError(f"read-only: {name}")

    _fake_checkpoint(store, 24)
    monkeypatch.setattr(store, "remove", failing_remove)
    store.prune(background=True)
    with caplog.at_level("WARNING", logger="dmvae_scale.train.checkpoint.store"):
        message = store.wait()
    assert re.search(r"deleting old checkpoints under .* failed: read-only: img-\d+; the next save retries", message)
    assert message in caplog.text
    assert store.wait() is None  # reported once
    monkeypatch.setattr(store, "remove", real_remove)
    assert store.prune() == [ckpt.checkpoint_name(16)]  # retried by the next prune


def test_store_works_against_s3(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    store = ckpt.CheckpointStore(url, keep=2, cache_dir=str(tmp_path / "cache"))
    name = ckpt.checkpoint_name(40)
    store.prepare(name)
    local = Path(store.staging_dir(name, rank=0))
    (local / "engines" / "net" / "zero").mkdir(parents=True)
    payload = torch.arange(1000.0)
    torch.save({"x": payload}, local / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt")
    store.upload(name, rank=0)
    assert store.latest() is None  # uploaded, but no manifest yet
    store.write_manifest(name, images_seen=40, step=5, world_size=1, zero_stage=2, engines=["net"],
                         meaning={"stage": "tokenizer"}, config_hash="h")
    info = store.latest()
    assert info.images_seen == 40 and info.url == f"{url}/checkpoints/{name}"
    view = Path(store.local_view(info))
    restored = torch.load(view / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt", weights_only=True)
    assert torch.equal(restored["x"], payload)


# ----------------------------------------------------------------------------------------------------------------------
# Refusing a resume that changes what the checkpoint means
# ----------------------------------------------------------------------------------------------------------------------

def _tokenizer_artifact(path: Path, mean: float) -> None:
    info = ArtifactInfo(stage="decoder", models=[], config_hash="x", latent=LatentSpec(4, 8, 8, mean=mean, scale=2.0))
    save_artifact(path, info, {"tokenizer": {"w": torch.zeros(2)}}, config_yaml=dump_yaml(load_config(None)))


def test_a_resume_that_changes_the_meaning_is_refused_naming_the_key(tmp_path):
    _tokenizer_artifact(tmp_path / "tok", mean=0.25)
    base = [f"run_dir={tmp_path}/run", "stage=generator", f"inputs.tokenizer={tmp_path}/tok", "score.depth=2"]
    cfg = load_config(None, base)
    store = ckpt.CheckpointStore(cfg.run_dir)
    from dmvae_scale.train.checkpoint import upstream_latents
    _fake_checkpoint(store, 64, meaning=ckpt.meaning_of(cfg, upstream_latents(cfg)))

    # What may change: length, cadence, workers, learning rate.
    assert check_run_dir(load_config(None, base + ["total_images=99999", "distributed.num_workers=1",
                                                   "optim.lr=0.5", "ckpt_every_images=7"])).images_seen == 64
    with pytest.raises(ckpt.ResumeRefusedError, match=r"saved with score.depth=2 but this config gives "
                                                      r"score.depth=4.*restore score.depth=2 or use a new run_dir"):
        check_run_dir(load_config(None, base[:-1] + ["score.depth=4"]))
    with pytest.raises(ckpt.ResumeRefusedError, match=r"stage='generator' but this config gives stage='reference'"):
        check_run_dir(load_config(None, base[:1] + ["stage=reference", f"inputs.tokenizer={tmp_path}/tok",
                                                     "score.depth=2"]))
    with pytest.raises(ckpt.ResumeRefusedError, match=r"distributed.zero_stage=2; resuming it with "
                                                      r"distributed.zero_stage=0 is not supported"):
        check_run_dir(load_config(None, base + ["distributed.zero_stage=0"]))
    _tokenizer_artifact(tmp_path / "tok", mean=0.5)  # the upstream tokenizer was re-measured
    with pytest.raises(ckpt.ResumeRefusedError, match=r"inputs.tokenizer.latent.mean=0.25 but this config gives "
                                                      r"inputs.tokenizer.latent.mean=0.5"):
        check_run_dir(cfg)


def test_a_changed_parameter_shape_is_refused_naming_the_parameter():
    saved = ckpt.meaning_of(load_config(None), param_shapes={"net": {"0.weight": [4, 3]}})
    now = ckpt.meaning_of(load_config(None), param_shapes={"net": {"0.weight": [5, 3]}})
    with pytest.raises(ckpt.ResumeRefusedError, match=r"model.net.0.weight=\[4, 3\] but this config gives "
                                                      r"model.net.0.weight=\[5, 3\]; that changes a parameter shape"):
        ckpt.check_resume(saved, now, "checkpoint X")


# ----------------------------------------------------------------------------------------------------------------------
# EMA partitioned over workers
# ----------------------------------------------------------------------------------------------------------------------

def test_sharded_ema_equals_the_full_ema_and_repartitions_across_world_sizes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))  # 35+7+21+3 parameters: uneven splits, padding
    full = EMA(net, 0.9)
    shards = [ShardedEMA(net, 0.9, rank, 3) for rank in range(3)]
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        full.update(net)
        for s in shards:
            s.update(net)
    merged = consolidate_ema_shards([s.state_dict() for s in shards])
    for n, v in full.shadow.items():
        torch.testing.assert_close(merged[n].reshape(v.shape), v, rtol=0, atol=0)

    # 3 workers -> 2 workers: each new rank takes its partition of the consolidated average.
    two = [ShardedEMA(net, 0.9, rank, 2) for rank in range(2)]
    for s in two:
        s.load_state_dict([sh.state_dict() for sh in shards])
    again = consolidate_ema_shards([s.state_dict() for s in two])
    for n, v in full.shadow.items():
        torch.testing.assert_close(again[n].reshape(v.shape), v, rtol=0, atol=0)
    one = ShardedEMA(net, 0.9, 0, 1)
    one.load_state_dict([s.state_dict() for s in two])
    assert set(one.full_state_dict()) == set(full.shadow)
    for n, v in one.full_state_dict().items():
        torch.testing.assert_close(v, full.shadow[n], rtol=0, atol=0)


def test_sharded_ema_refuses_an_incomplete_set_of_shards():
    net = nn.Linear(3, 3)
    shards = [ShardedEMA(net, 0.5, rank, 2).state_dict() for rank in range(2)]
    with pytest.raises(KeyError, match=r"a save of 2 workers needs all of 0..1"):
        ShardedEMA(net, 0.5, 0, 1).load_state_dict(shards[1:])


def test_checkpoint_manifest_is_plain_json_with_counters(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path))
    name = _fake_checkpoint(store, 8)
    raw = json.loads((tmp_path / "checkpoints" / name / ckpt.MANIFEST).read_text())
    assert raw["images_seen"] == 8 and raw["engines"] == ["net"] and raw["format"] == ckpt.CHECKPOINT_FORMAT
    assert set(raw["files"]) == {"engines/net/zero/mp_rank_00_model_states.pt", "ranks/rank-00000.pt"}
    assert set(raw["sha256"]) == set(raw["files"])  # every file's sha256, checked before anything is read


def test_wandb_requested_without_wandb_installed_fails_before_any_worker_starts(tmp_path, monkeypatch):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from dmvae_scale.errors import UserError
    from dmvae_scale.train.launch import train
    monkeypatch.setenv("WANDB_PROJECT", "dmvae")
    with pytest.raises(UserError, match=r"WANDB_PROJECT is set but wandb is not installed"):
        train(load_config("configs/demo/tokenizer.yaml", [f"run_dir={tmp_path}/run"]))
    assert not (tmp_path / "run").exists()


def test_checkpoint_engine_hands_the_same_file_to_deepspeed_once(tmp_path, monkeypatch):
    """DeepSpeed 0.19.8 loads the model-states file twice in a row per restore; the second request is served from
    the first, once, and only while the file is unchanged."""
    from dmvae_scale.train.deepspeed_engine import _reusing_checkpoint_engine_class
    engine = _reusing_checkpoint_engine_class()()
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"w": torch.arange(4.0)}, path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))

    first = engine.load(path, map_location=lambda storage, loc: storage)
    second = engine.load(path, map_location=lambda storage, loc: storage)  # a new, equal lambda, as DeepSpeed does
    assert second is first and len(reads) == 1
    third = engine.load(path, map_location=lambda storage, loc: storage)  # handed out once only
    assert third is not first and len(reads) == 2
    assert engine.load(path, map_location="cpu") is not third and len(reads) == 3  # another map_location: re-read

    torch.save({"w": torch.arange(5.0)}, path)  # rewritten in place: never the stale object
    assert torch.equal(engine.load(path, map_location="cpu")["w"], torch.arange(5.0)) and len(reads) == 4
    engine.forget()
    assert engine._last is None


def test_checkpoint_files_are_flushed_while_written_and_a_flush_error_fails_the_save(tmp_path, monkeypatch):
    flushed = []
    real = durable.fsync_path
    monkeypatch.setattr(durable, "fsync_path", lambda path: flushed.append(path) or real(path))
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    with durable.writing_checkpoint(remote=False) as written:
        torch.save({"x": torch.ones(3)}, a)
        durable.file_written(str(a))
        torch.save({"x": torch.ones(3)}, b)
        durable.file_written(str(b))
    assert sorted(flushed) == [str(a), str(b)]  # both flushed by the time the block is left
    import hashlib  # and hashed for the manifest
    assert written.sha256 == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    durable.file_written(str(a))  # outside a checkpoint write: nothing to do
    with durable.writing_checkpoint(remote=True) as written:  # object store: staged files are uploaded, not flushed
        durable.file_written(str(b))
    assert len(flushed) == 2 and list(written.sha256) == [str(b)]
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        with durable.writing_checkpoint(remote=False):
            durable.file_written(str(tmp_path / "gone.pt"))


def test_an_in_process_run_takes_ctrl_c_as_a_stop_request_and_a_second_one_as_abort(capsys):
    import os
    import signal

    from dmvae_scale.train.collectives import NO_STOP, STOP, StopSignal
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = StopSignal(control=None, under_ray=False)
    try:
        assert stop.agreed(torch.device("cpu")) == NO_STOP
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs in the main thread, here
        assert stop.agreed(torch.device("cpu")) == STOP
        assert "Ctrl-C: checkpointing and stopping" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    term = StopSignal(control=None, under_ray=False)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert term.agreed(torch.device("cpu")) == STOP
    finally:
        term.close()
