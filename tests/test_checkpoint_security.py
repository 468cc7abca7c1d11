"""A checkpoint's files are data, never code, and only its own: a pickle that would run code is refused before any
of it runs (resume, universal conversion, export), each file is checked against the manifest's sha256 before
anything is read, the local cache of a remote run directory is this user's alone and re-checked at every use,
manifest names cannot point outside the checkpoint, and (with DMVAE_CHECKPOINT_KEY) manifests are signed.

The pickle refusals are tested with the sha256 layer out of the way (the manifest updated to the planted file's hash
and size), and the sha256 refusals with the same planted file and a stale manifest, so each layer is shown to stop it
on its own. The runs are the toy two-engine stage (tests/test_engine_toys.py) in this process: one DeepSpeed worker
over gloo."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
from pathlib import Path

import deepspeed  # noqa: F401  (the runs build DeepSpeed engines; conftest reads this import on bare machines)
import pytest
import torch

import test_engine_toys as toys
from dmvae_scale.train import checkpoint as ckpt
from dmvae_scale.train.checkpoint import integrity
from dmvae_scale.train.checkpoint.export import consolidated_weights
from dmvae_scale.train.collectives import single_process_env
from dmvae_scale.train.deepspeed_engine import convert_to_universal

pytestmark = pytest.mark.unit

MODEL_STATES = "engines/student/zero/mp_rank_00_model_states.pt"
OPTIM_STATES = "engines/student/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_STATE = "ranks/rank-00000.pt"


class Touch:
    """Unpickled in full, this object creates `marker` (pathlib.Path.touch): the code a planted pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(run_dir: Path, total: int, *overrides: str):
    cfg = toys.toy_config(run_dir, "distributed.num_workers=1", f"total_images={total}", "ckpt_every_images=8",
                          *overrides)
    from dmvae_scale.train.worker import WorkerJob, run_worker
    with single_process_env():
        return run_worker(WorkerJob(cfg, stage_factory=toys.toy_factory(), dataset_factory=toys.vector_data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run directories with checkpoints at 8 and 16 images: ZeRO-2 and ZeRO-0."""
    base = tmp_path_factory.mktemp("trained")
    for stage in (2, 0):
        result = _run(base / f"zero{stage}", 16, f"distributed.zero_stage={stage}")
        assert result.status == "done", result.message
    return base


@pytest.fixture
def run_dir(trained, tmp_path):
    shutil.copytree(trained / "zero2", tmp_path / "run")
    return tmp_path / "run"


def _checkpoint(run_dir: Path, images: int = 16) -> Path:
    return run_dir / "checkpoints" / ckpt.checkpoint_name(images)


def _plant(checkpoint: Path, rel: str, marker: Path, *, update_manifest: bool) -> Path:
    """Rewrite checkpoint/rel as the same state plus an object whose unpickling runs code, and prove that a full
    unpickling of it would run that code. update_manifest: the manifest lists the new size AND sha256 (only the
    pickle check can stop it); else only the new size (still "complete", but its sha256 is stale)."""
    path = checkpoint / rel
    state = integrity.safe_load(path, map_location="cpu")
    state["payload"] = Touch(marker)
    torch.save(state, path)
    probe = path.with_name("probe.pt")
    shutil.copy(path, probe)
    torch.load(probe, weights_only=False)  # a full unpickling runs it: the payload is live
    assert marker.exists()
    marker.unlink()
    probe.unlink()
    manifest = checkpoint / ckpt.MANIFEST
    raw = json.loads(manifest.read_text())
    raw["files"][rel] = path.stat().st_size
    if update_manifest:
        raw["sha256"][rel] = _sha(path)
    manifest.write_text(json.dumps(raw, indent=1))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# What a save records
# ----------------------------------------------------------------------------------------------------------------------

def test_the_manifest_lists_every_files_sha256_computed_by_the_writers(tmp_path, monkeypatch):
    fallback = []
    real = ckpt.CheckpointStore._hash_stored
    monkeypatch.setattr(ckpt.CheckpointStore, "_hash_stored",
                        lambda self, name, rels: fallback.extend(rels) or real(self, name, rels))
    assert _run(tmp_path / "run", 8).status == "done"
    checkpoint = _checkpoint(tmp_path / "run", 8)
    raw = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    assert raw["format"] == ckpt.CHECKPOINT_FORMAT == 2
    assert set(raw["sha256"]) == set(raw["files"])
    for rel, digest in raw["sha256"].items():
        assert _sha(checkpoint / rel) == digest, rel
    # The shards and the worker state were hashed as they were written; rank 0 read back only what no writer
    # reported (DeepSpeed's recovery scripts, copied next to the shards).
    assert fallback and all(rel.endswith((".py",)) for rel in fallback)


# ----------------------------------------------------------------------------------------------------------------------
# A pickle that would run code: refused before it runs, with the sha256 check passing
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel,overrides", [
    (MODEL_STATES, ()),                              # DeepSpeed's checkpoint engine reads it
    (OPTIM_STATES, ("distributed.zero_stage=1",)),   # the universal conversion (ds_to_universal) reads it
    (RANK_STATE, ()),                                # the parts' state
], ids=["model-states", "universal-conversion", "rank-state"])
def test_resume_refuses_a_pickle_that_would_run_code_before_it_runs(run_dir, tmp_path, rel, overrides):
    marker = tmp_path / "MARKER"
    path = _plant(_checkpoint(run_dir), rel, marker, update_manifest=True)
    result = _run(run_dir, 24, *overrides)
    assert result.status == "error"
    assert f"{path}: refused to unpickle it: it references getattr" in result.message
    assert "Nothing of it was run" in result.message
    assert not marker.exists()


def test_a_universal_conversion_left_from_before_is_read_without_running_code(run_dir, tmp_path):
    """The conversion's output is derived here, not listed in the manifest: DeepSpeed's universal loader reads it
    with its own torch.load(weights_only=False), which checked_loads makes a safe one."""
    assert _run(run_dir, 16, "distributed.zero_stage=1").status == "done"  # converts, restores, nothing to train
    derived = _checkpoint(run_dir) / "engines" / "student" / "zero_universal" / "zero" / "0.weight" / "fp32.pt"
    assert derived.is_file()
    marker = tmp_path / "MARKER"
    state = integrity.safe_load(derived)
    state["payload"] = Touch(marker)
    torch.save(state, derived)
    result = _run(run_dir, 16, "distributed.zero_stage=1")
    assert result.status == "error"
    assert f"{derived}: refused to unpickle it: it references getattr" in result.message
    assert not marker.exists()


@pytest.mark.parametrize("stage,rel", [(2, OPTIM_STATES), (0, MODEL_STATES), (2, RANK_STATE)],
                         ids=["zero_to_fp32", "zero-0-model-states", "ema-rank-state"])
def test_export_refuses_a_pickle_that_would_run_code_before_it_runs(trained, tmp_path, stage, rel):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / f"zero{stage}", run_dir)
    marker = tmp_path / "MARKER"
    path = _plant(_checkpoint(run_dir), rel, marker, update_manifest=True)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{path}: refused to unpickle it: it references getattr")):
        consolidated_weights(str(run_dir), ("raw", "ema"))
    assert not marker.exists()


def test_safe_load_refuses_code_and_reads_every_deepspeed_file(trained, tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Touch(marker)}, evil)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{evil}: refused to unpickle it")):
        integrity.safe_load(evil, weights_only=False)  # whatever the caller asks for
    assert not marker.exists()
    converted = tmp_path / "converted"
    shutil.copytree(_checkpoint(trained / "zero2"), converted)
    convert_to_universal(str(converted), ["student", "critic"])
    files = sorted(trained.rglob("*.pt")) + sorted(converted.rglob("zero_universal/**/*.pt"))
    assert any("optim_states" in f.name for f in files) and any(f.name == "fp32.pt" for f in files)
    for path in files:  # every file DeepSpeed wrote: ZeRO 0 and 2, and the universal conversion
        integrity.safe_load(path, map_location="cpu")


# ----------------------------------------------------------------------------------------------------------------------
# sha256: a file that differs from the manifest is refused before anything is read
# ----------------------------------------------------------------------------------------------------------------------

def test_resume_refuses_a_file_whose_sha256_differs_naming_it(run_dir, tmp_path):
    marker = tmp_path / "MARKER"
    checkpoint = _checkpoint(run_dir)
    expected = json.loads((checkpoint / ckpt.MANIFEST).read_text())["sha256"][MODEL_STATES]
    path = _plant(checkpoint, MODEL_STATES, marker, update_manifest=False)
    result = _run(run_dir, 24)
    assert result.status == "error"
    assert (f"{path}: sha256 {_sha(path)}, but the manifest of {run_dir}/checkpoints/{checkpoint.name} lists "
            f"{expected}") in result.message
    assert not marker.exists()


def test_export_refuses_a_file_whose_sha256_differs_naming_it(run_dir, tmp_path):
    checkpoint = _checkpoint(run_dir)
    path = checkpoint / OPTIM_STATES
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF  # same size: the checkpoint still looks complete
    path.write_bytes(bytes(data))
    expected = json.loads((checkpoint / ckpt.MANIFEST).read_text())["sha256"][OPTIM_STATES]
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{path}: sha256 {_sha(path)}, but the manifest of ")
                       + rf".* lists {expected}"):
        consolidated_weights(str(run_dir))


def test_a_file_the_manifest_does_not_list_is_never_read(run_dir):
    """An extra shard planted next to the listed ones (zero_to_fp32 globs *optim_states.pt) is refused."""
    checkpoint = _checkpoint(run_dir)
    extra = checkpoint / "engines" / "student" / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(checkpoint / OPTIM_STATES, extra)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{extra}: not a file of checkpoint ")
                       + r".*its manifest does not list it"):
        consolidated_weights(str(run_dir))


# ----------------------------------------------------------------------------------------------------------------------
# Names from a manifest stay inside the checkpoint
# ----------------------------------------------------------------------------------------------------------------------

def _fake_checkpoint(store: ckpt.CheckpointStore, images: int = 8) -> Path:
    name = ckpt.checkpoint_name(images)
    store.prepare(name)
    d = Path(store.url(name))
    (d / "engines" / "net" / "zero").mkdir(parents=True)
    (d / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt").write_bytes(b"w" * 100)
    (d / "ranks").mkdir()
    (d / "ranks" / "rank-00000.pt").write_bytes(b"r" * 50)
    store.write_manifest(name, images_seen=images, step=1, world_size=1, zero_stage=2, engines=["net"],
                         meaning={"stage": "tokenizer"}, config_hash="h")
    return d


def _edit_manifest(checkpoint: Path, edit) -> None:
    raw = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    edit(raw)
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize("bad", ["../../../../home/u/.bashrc", "/etc/passwd", "engines/../../x", "a//b", "a\\b"])
def test_a_manifest_file_name_outside_the_checkpoint_is_refused(tmp_path, bad):
    store = ckpt.CheckpointStore(str(tmp_path / "run"))
    checkpoint = _fake_checkpoint(store)

    def edit(raw):
        raw["files"][bad] = 3
        raw["sha256"][bad] = "0" * 64
    _edit_manifest(checkpoint, edit)
    with pytest.raises(ckpt.CheckpointError, match=r"is not a (safe name|relative path inside the checkpoint)"):
        store.read_manifest(checkpoint.name)
    with pytest.raises(ckpt.CheckpointError, match=r"refusing it"):
        store.latest()  # a run directory holding it neither resumes nor starts over
    store.prune()
    assert checkpoint.is_dir()  # kept for the user to look at, not deleted as incomplete


@pytest.mark.parametrize("bad", ["../../victim", "..", "a/b", ""])
def test_an_engine_name_outside_the_checkpoint_is_refused(tmp_path, bad):
    store = ckpt.CheckpointStore(str(tmp_path / "run"))
    checkpoint = _fake_checkpoint(store)
    _edit_manifest(checkpoint, lambda raw: raw.update(engines=[bad]))
    with pytest.raises(ckpt.CheckpointError, match=r"engine name: .* is not a safe name"):
        store.read_manifest(checkpoint.name)
    with pytest.raises(ckpt.CheckpointError, match=r"engine name: .* is not a safe name"):
        store.write_manifest(checkpoint.name, images_seen=8, step=1, world_size=1, zero_stage=2, engines=[bad],
                             meaning={}, config_hash="h")
    # The conversion removes <dir>/engines/<name>/zero_universal: never where a bad name would point.
    victim = Path(os.path.normpath(checkpoint / "engines" / bad / "zero_universal"))
    victim.mkdir(parents=True, exist_ok=True)
    with pytest.raises(ckpt.CheckpointError, match=r"is not a safe name"):
        convert_to_universal(str(checkpoint), [bad])
    assert victim.is_dir()


def test_a_manifest_naming_another_checkpoint_is_refused(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "run"))
    checkpoint = _fake_checkpoint(store)
    _edit_manifest(checkpoint, lambda raw: raw.update(name="../../elsewhere"))
    with pytest.raises(ckpt.CheckpointError, match=r"names checkpoint '../../elsewhere' but lies in 'img-"):
        store.read_manifest(checkpoint.name)


def test_a_listed_file_that_resolves_outside_the_checkpoint_is_refused(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "run"))
    checkpoint = _fake_checkpoint(store)
    outside = tmp_path / "outside"
    shutil.move(str(checkpoint / "engines"), outside)
    (checkpoint / "engines").symlink_to(outside)  # same files, same hashes, but elsewhere
    info = store.read_manifest(checkpoint.name)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"resolves to {outside}/net/zero/mp_rank_00_model_"
                                                             f"states.pt, outside")):
        store.local_view(info)
    with integrity.checked_loads(store.view(info, str(checkpoint))):
        with pytest.raises(ckpt.CheckpointError, match=r"outside checkpoint"):
            torch.load(checkpoint / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt")


# ----------------------------------------------------------------------------------------------------------------------
# Older formats and signatures
# ----------------------------------------------------------------------------------------------------------------------

def test_a_format_1_checkpoint_is_refused_not_skipped_or_pruned(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "run"))
    checkpoint = _fake_checkpoint(store)

    def to_format_1(raw):
        raw["format"] = 1
        raw.pop("sha256")
    _edit_manifest(checkpoint, to_format_1)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint format 1, this version reads only format 2 .*"
                                                   r"Refusing it rather than skipping it"):
        store.latest()
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint format 1"):
        consolidated_weights(str(tmp_path / "run"))
    store.prune()
    assert (checkpoint / ckpt.MANIFEST).is_file()


def test_with_a_key_manifests_are_signed_and_unsigned_or_changed_ones_refused(tmp_path, monkeypatch):
    store = ckpt.CheckpointStore(str(tmp_path / "run"), keep=5)
    unsigned = _fake_checkpoint(store, 8)
    monkeypatch.setenv(ckpt.store.KEY_ENV, "s3cret")
    signed = _fake_checkpoint(store, 16)
    other = _fake_checkpoint(store, 24)
    assert json.loads((signed / ckpt.MANIFEST).read_text())["signature"].startswith("hmac-sha256:")
    assert store.read_manifest(signed.name).images_seen == 16
    with pytest.raises(ckpt.CheckpointError, match=r"unsigned, but DMVAE_CHECKPOINT_KEY is set"):
        store.read_manifest(unsigned.name)
    # A changed hash (to vouch for a replaced file) breaks the signature.
    _edit_manifest(signed, lambda raw: raw["sha256"].update({"ranks/rank-00000.pt": "a" * 64}))
    with pytest.raises(ckpt.CheckpointError, match=r"its signature does not match"):
        store.read_manifest(signed.name)
    monkeypatch.setenv(ckpt.store.KEY_ENV, "another")
    with pytest.raises(ckpt.CheckpointError, match=r"its signature does not match"):
        store.read_manifest(other.name)
    monkeypatch.delenv(ckpt.store.KEY_ENV)
    assert store.read_manifest(unsigned.name).images_seen == 8  # no key: signatures are not checked
    assert store.read_manifest(other.name).images_seen == 24


# ----------------------------------------------------------------------------------------------------------------------
# The local cache: this user's, and checked at every use
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(root))
    return root


def test_the_cache_root_is_created_private_to_this_user(temp_root):
    cache = Path(ckpt.CheckpointStore("s3://bucket/run").cache_dir)
    root = temp_root / f"dmvae-{os.geteuid()}" / "checkpoints"
    assert cache.parent == root
    for d in (root.parent, root, cache):
        assert d.stat().st_mode & 0o777 == 0o700 and d.stat().st_uid == os.geteuid()


def test_a_symlinked_cache_root_is_refused(temp_root):
    elsewhere = temp_root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (temp_root / f"dmvae-{os.geteuid()}").mkdir(mode=0o700)
    (temp_root / f"dmvae-{os.geteuid()}" / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(ckpt.CheckpointError, match=r"dmvae-\d+/checkpoints: it is a symlink .*refusing to keep "
                                                   r"files there"):
        _ = ckpt.CheckpointStore("s3://bucket/run").cache_dir
    assert not any(elsewhere.iterdir())


def test_a_cache_root_others_can_write_or_own_is_refused(temp_root, monkeypatch):
    root = temp_root / f"dmvae-{os.geteuid()}"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(ckpt.CheckpointError, match=r"its mode 0777 lets group or others write into it"):
        _ = ckpt.CheckpointStore("s3://bucket/run").cache_dir
    root.chmod(0o700)
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 4242)  # as another user would find it
    with pytest.raises(ckpt.CheckpointError, match=rf"owned by uid {real_uid}, not by this user"):
        _ = ckpt.CheckpointStore("s3://bucket/run").cache_dir


def _remote_checkpoint(s3_bucket: str, cache: Path) -> tuple[ckpt.CheckpointStore, ckpt.CheckpointInfo, bytes]:
    store = ckpt.CheckpointStore(f"{s3_bucket}/run", cache_dir=str(cache))
    name = ckpt.checkpoint_name(40)
    store.prepare(name)
    local = Path(store.staging_dir(name, rank=0))
    (local / "engines" / "net" / "zero").mkdir(parents=True)
    torch.save({"x": torch.arange(100.0)}, local / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt")
    payload = (local / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt").read_bytes()
    store.upload(name, rank=0)
    store.write_manifest(name, images_seen=40, step=5, world_size=1, zero_stage=2, engines=["net"],
                         meaning={"stage": "tokenizer"}, config_hash="h")
    return store, store.latest(), payload


def test_a_planted_cache_entry_is_checked_and_fetched_again(s3_bucket, tmp_path):
    store, info, payload = _remote_checkpoint(s3_bucket, tmp_path / "cache")
    cached = Path(store.local_view(info)) / "engines" / "net" / "zero" / "mp_rank_00_model_states.pt"
    assert cached.read_bytes() == payload
    # Someone (or a crash) changed the cached copy, and the old "downloaded" marker would have vouched for it.
    cached.write_bytes(b"x" * len(payload))
    (cached.parents[3] / ".downloaded").write_text(info.name)
    view = Path(store.local_view(info))
    assert cached.read_bytes() == payload  # checked against the manifest's sha256 and fetched again
    store.verify_files(info, str(view))


def test_a_remote_file_whose_sha256_differs_is_refused_naming_it(s3_bucket, tmp_path):
    store, info, payload = _remote_checkpoint(s3_bucket, tmp_path / "cache")
    from dmvae_scale.data import storage
    url = f"{info.url}/engines/net/zero/mp_rank_00_model_states.pt"
    storage.write_bytes(url, b"y" * len(payload))  # same size: still listed as complete
    bad, good = hashlib.sha256(b"y" * len(payload)).hexdigest(), hashlib.sha256(payload).hexdigest()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{url}: sha256 {bad}, but the manifest of {info.url} "
                                                             f"lists {good}")):
        store.local_view(info)
    left = Path(store.cache_dir) / "restore" / info.name / "engines" / "net" / "zero"
    assert not any(left.iterdir())  # nothing of it stays in the cache
