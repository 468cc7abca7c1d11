"""What a run reads from local caches and uploads from local directories is its own (issue #24, items 2, 3, 6, 7):
every cache lies under this user's private root, a cached artifact is re-checked against the hash that names it,
uploads never follow a symlink. The store is the real SeaweedFS of tests/s3_server.py."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from s3_server import s3_client
import pytest
import torch

from dmvae_scale.artifacts import ArtifactError, ArtifactInfo, content_hash_of, save_artifact
from dmvae_scale.data import artifact_store, storage
from dmvae_scale.data.artifact_store import artifact_info, open_artifact, upload_artifact

pytestmark = pytest.mark.integration


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def small_artifact(tmp_path):
    d = tmp_path / "art"
    weights = {"net": {"w": torch.arange(12.0).reshape(3, 4)}}
    save_artifact(d, ArtifactInfo(stage="tokenizer", models=[], config_hash="c0ffee"), weights,
                  ema={"net": {"w": torch.ones(3, 4)}}, config_yaml="stage: tokenizer\n")
    return d


def _objects(s3_server: str, bucket_url: str) -> dict[str, bytes]:
    client = s3_client(s3_server)
    bucket = bucket_url[len("s3://"):]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


# ----------------------------------------------------------------------------------------------------------------------
# Private caches
# ----------------------------------------------------------------------------------------------------------------------

def test_a_planted_artifact_cache_entry_is_downloaded_again(small_artifact, s3_bucket, temp_root, caplog):
    url = f"{s3_bucket}/art"
    upload_artifact(small_artifact, url)
    first = open_artifact(url)
    entry = first.directory
    assert entry.parent == temp_root / f"dmvae-{os.geteuid()}" / "artifacts"
    for d in (entry.parent.parent, entry.parent):
        assert d.stat().st_mode & 0o777 == 0o700
    original = (small_artifact / "weights.safetensors").read_bytes()
    assert (entry / "weights.safetensors").read_bytes() == original

    # A planted entry that vouches for itself: weights replaced, its own artifact.json rewritten to their hash.
    from safetensors.torch import save_file
    save_file({"net.w": torch.full((3, 4), 666.0)}, str(entry / "weights.safetensors"))
    planted = json.loads((entry / "artifact.json").read_text())
    planted["content_hash"] = content_hash_of(entry)
    (entry / "artifact.json").write_text(json.dumps(planted))
    with caplog.at_level(logging.WARNING, logger="dmvae_scale.data.artifact_store"):
        again = open_artifact(url)
    assert again.directory == entry
    assert (entry / "weights.safetensors").read_bytes() == original
    assert torch.equal(again.state("net", "raw")["w"], torch.arange(12.0).reshape(3, 4))
    assert f"artifact cache entry {entry}: its artifact.json differs from the remote one; removing it and " \
           f"downloading {url} again" in caplog.text

    # Only the weights changed (artifact.json left alone): found by hashing them against the name's hash.
    (entry / "weights.safetensors").write_bytes(original[:-8] + b"\0" * 8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dmvae_scale.data.artifact_store"):
        open_artifact(url)
    info = artifact_info(url)
    assert f"not to the content hash {info.content_hash} that names it; removing it and downloading {url} " \
           f"again" in caplog.text
    assert (entry / "weights.safetensors").read_bytes() == original


def test_a_symlinked_or_foreign_cache_root_is_refused(small_artifact, s3_bucket, temp_root):
    url = f"{s3_bucket}/art"
    upload_artifact(small_artifact, url)
    elsewhere = temp_root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    root = temp_root / f"dmvae-{os.geteuid()}"
    root.symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=rf"^cache root {root}: it is a symlink \(to {elsewhere}\); refusing to "
                                            rf"keep files there"):
        open_artifact(url)
    assert not any(elsewhere.iterdir())
    root.unlink()
    root.mkdir(mode=0o700)
    (root / "artifacts").mkdir(mode=0o700)
    os.chown(root / "artifacts", os.geteuid() + 4242, -1)  # as another user would have made it
    with pytest.raises(ArtifactError, match=rf"^artifact cache {root / 'artifacts'}: it is owned by uid "
                                            rf"{os.geteuid() + 4242}, not by this user"):
        open_artifact(url)


def test_the_shard_cache_is_private(s3_bucket, temp_root, tmp_path):
    from dmvae_scale.cli import main
    from dmvae_scale.data.stream import ImageStreamDataset
    url = f"{s3_bucket}/fm"
    assert main(["data", "shards", "fashion-mnist", url, "--limit", "8", "--workers", "1"]) == 0
    ds = ImageStreamDataset(url, batch_size=4, image_size=28)
    local = Path(ds.streams[0].local)
    assert local.parent == temp_root / f"dmvae-{os.geteuid()}" / "stream"
    assert local.stat().st_mode & 0o777 == 0o700
    named = tmp_path / "mine"
    named.mkdir()
    named.chmod(0o777)
    with pytest.raises(Exception, match=rf"^shard cache_dir {named}: its mode 0777 lets group or others write"):
        ImageStreamDataset(url, batch_size=4, image_size=28, cache_dir=str(named))


# ----------------------------------------------------------------------------------------------------------------------
# Uploads never follow a symlink
# ----------------------------------------------------------------------------------------------------------------------

SECRET = b"aws_secret_access_key = MARKER-d41d8cd98f00b204"


def test_a_symlink_in_the_log_directory_is_not_uploaded(s3_bucket, s3_server, tmp_path, caplog):
    from dmvae_scale.config import load_config
    from dmvae_scale.train.reporting import MetricSinks
    secret = tmp_path / "credentials"
    secret.write_bytes(SECRET)
    cfg = load_config("configs/demo/tokenizer.yaml", [f"run_dir={s3_bucket}/run"])
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    sinks = MetricSinks(cfg, str(cache))
    try:
        link = Path(sinks.local_dir) / "credentials"
        link.symlink_to(secret)
        (Path(sinks.local_dir) / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
        with caplog.at_level(logging.WARNING, logger="dmvae_scale.private_cache"):
            sinks.write(8, {"loss": 1.5})
    finally:
        sinks.close()
    objects = _objects(s3_server, s3_bucket)
    assert "run/metrics.jsonl" in objects and json.loads(objects["run/metrics.jsonl"]) == {"images": 8, "loss": 1.5}
    assert not any(SECRET in body for body in objects.values())
    assert f"log upload {s3_bucket}/run: skipping {link}: a symlink (to {secret}); not uploading it" in caplog.text
    assert f"linked-dir: a symlink (to {tmp_path}); not following it" in caplog.text


def test_artifact_and_checkpoint_uploads_skip_symlinks(small_artifact, s3_bucket, s3_server, tmp_path, caplog):
    from dmvae_scale.train import checkpoint as ckpt
    secret = tmp_path / "credentials"
    secret.write_bytes(SECRET)
    (small_artifact / "notes.txt").symlink_to(secret)
    store = ckpt.CheckpointStore(f"{s3_bucket}/run", cache_dir=str(tmp_path / "ckcache"))
    name = ckpt.checkpoint_name(8)
    store.prepare(name)
    staged = Path(store.staging_dir(name, rank=0))
    (staged / "ranks").mkdir(parents=True)
    (staged / "ranks" / "rank-00000.pt").write_bytes(b"state")
    (staged / "ranks" / "stolen.pt").symlink_to(secret)
    with caplog.at_level(logging.WARNING, logger="dmvae_scale.private_cache"):
        upload_artifact(small_artifact, f"{s3_bucket}/art")
        store.upload(name, rank=0)
    objects = _objects(s3_server, s3_bucket)
    assert f"run/checkpoints/{name}/ranks/rank-00000.pt" in objects and "art/weights.safetensors" in objects
    assert not any(SECRET in body for body in objects.values())
    assert f"skipping {small_artifact / 'notes.txt'}: a symlink" in caplog.text
    assert f"checkpoint upload {s3_bucket}/run/checkpoints/{name}: skipping {staged / 'ranks' / 'stolen.pt'}: " \
           f"a symlink" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# Shard indexes: names inside the dataset, sha256 on every shard, no compression
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    from dmvae_scale.data.shards import write_shards
    dest = tmp_path_factory.mktemp("shards") / "fm"
    write_shards("fashion-mnist", str(dest), limit=16, part_size=16, progress=False)
    return dest


def _with_index(src: Path, dest: Path, change) -> Path:
    import shutil
    shutil.copytree(src, dest)
    index = json.loads((dest / "index.json").read_text())
    change(index["shards"][0])
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def test_every_shard_records_its_sha256(local_shards):
    index = json.loads((local_shards / "index.json").read_text())
    import hashlib
    for shard in index["shards"]:
        data = (local_shards / shard["raw_data"]["basename"]).read_bytes()
        assert shard["raw_data"]["hashes"] == {"sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd", "part-00000/../../x.mds", "a//b.mds"])
def test_a_shard_basename_leaving_the_dataset_is_refused(local_shards, tmp_path, bad):
    from dmvae_scale.data.shards import ShardIndexError
    from dmvae_scale.data.stream import ImageStreamDataset
    ds = _with_index(local_shards, tmp_path / "ds", lambda s: s["raw_data"].update(basename=bad))
    with pytest.raises(ShardIndexError, match=rf"^{ds}/index.json: shard basename {bad!r} is not a safe relative "
                                              rf"name"):
        ImageStreamDataset(str(ds), batch_size=4, image_size=28)


def test_a_shard_symlinked_out_of_the_dataset_is_refused(local_shards, tmp_path):
    from dmvae_scale.data.shards import ShardIndexError, load_index
    ds = _with_index(local_shards, tmp_path / "ds", lambda s: None)
    name = json.loads((ds / "index.json").read_text())["shards"][0]["raw_data"]["basename"]
    outside = tmp_path / "outside.mds"
    (ds / name).rename(outside)
    (ds / name).symlink_to(outside)
    with pytest.raises(ShardIndexError, match=rf"shard {name} resolves to {outside}, outside {ds}"):
        load_index(str(ds))


def test_a_shard_without_sha256_or_compressed_is_refused(local_shards, tmp_path, capsys):
    from dmvae_scale.cli import main
    from dmvae_scale.data.shards import ShardIndexError, load_index
    sha1 = _with_index(local_shards, tmp_path / "sha1", lambda s: s["raw_data"].update(hashes={"sha1": "ab" * 20}))
    with pytest.raises(ShardIndexError, match=r"shard part-00000/shard.00000.mds records no sha256 \(hashes: "
                                              r"\['sha1'\]\); every shard must"):
        load_index(str(sha1))
    assert main(["data", "verify", str(sha1)]) == 2
    err = capsys.readouterr().err
    assert "records no sha256" in err and "Traceback" not in err

    def compress(shard):
        shard["compression"] = "zstd:7"
        shard["zip_data"] = {"basename": shard["raw_data"]["basename"] + ".zstd", "bytes": 10, "hashes": {}}
    zipped = _with_index(local_shards, tmp_path / "zipped", compress)
    with pytest.raises(ShardIndexError, match=r"shard part-00000/shard.00000.mds is compressed \(zstd:7\); this "
                                              r"version reads uncompressed shards only"):
        load_index(str(zipped))


# ----------------------------------------------------------------------------------------------------------------------
# Pins: inputs.<key>_sha256
# ----------------------------------------------------------------------------------------------------------------------

def test_a_pinned_upstream_with_another_content_hash_is_refused(small_artifact, s3_bucket, temp_root):
    from dmvae_scale.config import ConfigError
    from dmvae_scale.train.stages.common import open_upstream
    url = f"{s3_bucket}/art"
    upload_artifact(small_artifact, url)
    found = artifact_info(url).content_hash
    wanted = "0" * 64
    with pytest.raises(ConfigError, match=rf"^inputs.tokenizer_sha256: expects content hash {wanted}, but {url} has "
                                          rf"{found}; refusing it"):
        open_upstream("inputs.tokenizer", url, "raw", wanted)
    assert open_upstream("inputs.tokenizer", url, "raw", found).info.content_hash == found  # the right pin opens


def test_a_pin_must_be_a_hash_of_a_given_input():
    from dmvae_scale.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"^inputs.tokenizer_sha256: must be an artifact's content hash \(64 "
                                          r"lowercase hex digits"):
        load_config("configs/demo/generator.yaml", ["inputs.tokenizer=/x", "inputs.tokenizer_sha256=abc"])
    with pytest.raises(ConfigError, match=r"^inputs.real_score_sha256: pins inputs.real_score, which is not given"):
        load_config("configs/demo/generator.yaml", ["inputs.tokenizer=/x", f"inputs.real_score_sha256={'a' * 64}"])


# ----------------------------------------------------------------------------------------------------------------------
# Bounded input: image pixels, download sizes
# ----------------------------------------------------------------------------------------------------------------------

def _png(w: int, h: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (w, h), 7).save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_beyond_the_pixel_bound_is_refused_before_decoding(monkeypatch):
    from PIL import Image

    from dmvae_scale.data import shards, transforms
    assert transforms.MAX_IMAGE_PIXELS == 2 ** 27 and Image.MAX_IMAGE_PIXELS == 2 ** 27
    monkeypatch.setenv("DMVAE_MAX_IMAGE_PIXELS", "400")
    assert transforms.decode_image(_png(20, 20)).size == (20, 20)  # at the bound: decoded
    with pytest.raises(transforms.ImageTooLargeError, match=r"^image of 21 x 20 = 420 pixels exceeds the bound of "
                                                            r"400 pixels \(a decompression bomb\?\); refusing"):
        transforms.decode_image(_png(21, 20))
    with pytest.raises(transforms.ImageTooLargeError):
        shards.check_decodes(_png(21, 20))  # `data shards` counts it as corrupt (or fails, with --on-corrupt fail)
    # PIL's own warning is an error in a process that imported the data package, wherever PIL opens an image (a
    # fresh interpreter: pytest resets warning filters around each test).
    import subprocess
    import sys
    code = ("import io, sys; import dmvae_scale.data.transforms; from PIL import Image\n"
            "try:\n    Image.open(io.BytesIO(sys.stdin.buffer.read()))\n"
            "except Image.DecompressionBombWarning as e:\n    print('refused:', e)")
    done = subprocess.run([sys.executable, "-c", code], input=_png(12000, 12000), capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stdout.decode().startswith("refused: Image size (144000000 pixels) exceeds "
                                                                    "limit of 134217728 pixels"), done.stderr


def test_a_checkpoint_file_larger_than_its_manifest_says_is_not_downloaded(s3_bucket, tmp_path):
    from dmvae_scale.train import checkpoint as ckpt
    store = ckpt.CheckpointStore(f"{s3_bucket}/run", cache_dir=str(tmp_path / "writer"))
    name = ckpt.checkpoint_name(8)
    store.prepare(name)
    staged = Path(store.staging_dir(name, rank=0))
    (staged / "ranks").mkdir(parents=True)
    (staged / "ranks" / "rank-00000.pt").write_bytes(b"x" * 100)
    store.upload(name, rank=0)
    info = store.write_manifest(name, images_seen=8, step=1, world_size=1, zero_stage=0, engines=[], meaning={},
                                config_hash="c")
    storage.write_bytes(f"{s3_bucket}/run/checkpoints/{name}/ranks/rank-00000.pt", b"x" * 10_000)
    reader = ckpt.CheckpointStore(f"{s3_bucket}/run", cache_dir=str(tmp_path / "reader"))
    with pytest.raises(ckpt.CheckpointError, match=rf"{name}/ranks/rank-00000.pt: 10000 bytes, but the manifest of "
                                                   rf".* lists 100; refusing to download it"):
        reader.local_view(info)
    assert not list((tmp_path / "reader").rglob("rank-00000.pt*"))


# ----------------------------------------------------------------------------------------------------------------------
# config.yaml inside the content hash; artifact downloads capped at the recorded sizes
# ----------------------------------------------------------------------------------------------------------------------

def test_config_yaml_is_inside_the_content_hash(small_artifact):
    from dmvae_scale.artifacts import load_artifact, read_artifact_info
    info = read_artifact_info(small_artifact)
    assert info.format == 2 and info.content_hash == content_hash_of(small_artifact)
    assert info.sizes == {n: (small_artifact / n).stat().st_size
                          for n in ("weights.safetensors", "ema.safetensors", "config.yaml")}
    (small_artifact / "config.yaml").write_text("stage: tokenizer\ntokenizer: {latent_channels: 64}\n")
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        load_artifact(small_artifact, "raw")


def test_a_format_1_artifact_is_still_read(small_artifact):
    import hashlib

    from dmvae_scale.artifacts import load_artifact
    raw = json.loads((small_artifact / "artifact.json").read_text())
    h = hashlib.sha256(hashlib.sha256((small_artifact / "weights.safetensors").read_bytes()).hexdigest().encode())
    h.update(hashlib.sha256((small_artifact / "ema.safetensors").read_bytes()).hexdigest().encode())
    raw.update(format=1, content_hash=h.hexdigest())
    raw.pop("sizes")
    (small_artifact / "artifact.json").write_text(json.dumps(raw))
    info, weights = load_artifact(small_artifact, "ema")
    assert info.format == 1 and torch.equal(weights["net"]["w"], torch.ones(3, 4))


def test_an_artifact_file_larger_than_recorded_is_not_downloaded(small_artifact, s3_bucket, temp_root):
    url = f"{s3_bucket}/art"
    upload_artifact(small_artifact, url)
    storage.write_bytes(f"{url}/config.yaml", b"x" * 5000)
    recorded = json.loads((small_artifact / "artifact.json").read_text())["sizes"]["config.yaml"]
    with pytest.raises(ArtifactError, match=rf"^{url}/config.yaml: 5000 bytes, but {url}/artifact.json records "
                                            rf"{recorded}; refusing to download it"):
        open_artifact(url)


@pytest.mark.unit
def test_the_id_names_the_weights_wherever_the_artifact_was_written(small_artifact, tmp_path):
    """config.yaml is inside the content hash but holds paths (run_dir, inputs): two stores holding the same
    weights give the same id, different content hashes; a forged weights hash is refused."""
    import shutil

    from dmvae_scale.artifacts import hash_problem, load_artifact, read_artifact_info
    other = tmp_path / "elsewhere"
    shutil.copytree(small_artifact, other)
    with open(other / "config.yaml", "a") as f:
        f.write("# run_dir: s3://another-store/runs/tokenizer\n")
    manifest = json.loads((other / "artifact.json").read_text())
    manifest["content_hash"] = content_hash_of(other)
    manifest["sizes"]["config.yaml"] = (other / "config.yaml").stat().st_size
    (other / "artifact.json").write_text(json.dumps(manifest))
    a, b = read_artifact_info(small_artifact), read_artifact_info(other)
    assert a.content_hash != b.content_hash and a.id == b.id and a.weights_hash == b.weights_hash
    assert hash_problem(other, b) is None
    manifest["weights_hash"] = "0" * 64
    (other / "artifact.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="content hash mismatch .*not to the weights hash 0000"):
        load_artifact(other, "raw")
