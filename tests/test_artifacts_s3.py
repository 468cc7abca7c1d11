"""Stage artifacts on the S3 server (SeaweedFS): uploaded manifest last, downloaded once per node into a cache keyed by
the content hash, and read by a stage-2 training run whose input and run directory are both s3:// URLs."""
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from repo import DEMO
from dmvae_scale.artifacts import ArtifactError, load_artifact
from dmvae_scale.cli import main
from dmvae_scale.config import load_config
from dmvae_scale.data import storage
from dmvae_scale.data.artifact_store import artifact_info, cache_root, open_artifact, open_tokenizer, upload_artifact
from dmvae_scale.data.datasets import in_memory_dataset
from dmvae_scale.train.batches import stats_batches
from dmvae_scale.train.stages import AutoencoderStage, save_stage_artifact
from plain_engine import EMA

pytestmark = pytest.mark.integration

SMALL = ["total_images=64", "log_every_images=32", "data.limit=128", "ckpt_every_images=64"]


@pytest.fixture
def tokenizer_artifact(tmp_path):
    cfg = load_config(DEMO / "tokenizer.yaml", [f"run_dir={tmp_path}/tokenizer"])
    stage = AutoencoderStage(cfg)
    ema = EMA(stage.tokenizer, 0.9)
    with torch.no_grad():  # EMA differs from raw: a test can tell which one was read
        for p in stage.tokenizer.parameters():
            p.add_(0.01)
    save_stage_artifact(stage, {"tokenizer": ema}, cfg, tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_upload_puts_the_manifest_last_and_a_half_upload_is_not_an_artifact(tokenizer_artifact, s3_bucket,
                                                                              monkeypatch):
    url = f"{s3_bucket}/tok"
    fs = storage.filesystem(url)[0].wrapped  # the store's own instance, under the retrying wrapper
    order = []
    real_put = fs.put_file

    def recording_put(lpath, rpath, *args, **kwargs):
        order.append(Path(rpath).name)
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", recording_put)  # fsspec hands the same (cached) instance to the upload
    upload_artifact(tokenizer_artifact, url)
    monkeypatch.undo()
    assert order[-1] == "artifact.json" and set(order) == {"artifact.json", "config.yaml", "ema.safetensors",
                                                          "weights.safetensors"}
    assert artifact_info(url).content_hash == json.loads((tokenizer_artifact / "artifact.json").read_text())[
        "content_hash"]

    half = f"{s3_bucket}/half"
    storage.write_bytes(f"{half}/weights.safetensors", (tokenizer_artifact / "weights.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match=f"{half}/artifact.json: missing; {half} is not a complete artifact"):
        open_artifact(half)
    with pytest.raises(ArtifactError, match=f"artifact not found: {s3_bucket}/nowhere"):
        open_artifact(f"{s3_bucket}/nowhere")  # both slashes kept


def _open_in_child(url, env, queue):
    os.environ.update(env)
    a = open_artifact(url)
    queue.put((str(a.directory), a.verified, os.stat(a.directory / "weights.safetensors").st_ino))


def test_remote_artifact_is_fetched_once_per_node_into_a_hash_keyed_cache(tokenizer_artifact, s3_bucket,
                                                                         s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))  # this test's own cache (the children's)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))  # and this process's
    (tmp_path / "node-tmp").mkdir()
    url = f"{s3_bucket}/tok"
    upload_artifact(tokenizer_artifact, url)
    info = artifact_info(url)
    env = {k: os.environ[k] for k in ("TMPDIR", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(url, env, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    final = tmp_path / "node-tmp" / f"dmvae-{os.geteuid()}" / "artifacts" / f"{info.content_hash}-{info.config_hash}"
    assert {d for d, _, _ in results} == {str(final)}
    # one process downloaded, the other found its copy (the same file) and hashed it again: both verified
    assert all(fresh for _, fresh, _ in results) and len({ino for _, _, ino in results}) == 1
    assert sorted(os.listdir(final)) == ["artifact.json", "config.yaml", "ema.safetensors", "weights.safetensors"]
    assert [n for n in os.listdir(final.parent) if ".part-" in n] == []

    tok, artifact = open_tokenizer(url, "ema")
    _, local = load_artifact(tokenizer_artifact, "ema")
    for k, v in tok.state_dict().items():
        assert torch.equal(v, local["tokenizer"][k]), k
    assert artifact.location == url and cache_root() == final.parent


def test_reference_stage_trains_from_an_s3_tokenizer_into_an_s3_run_directory(tokenizer_artifact, s3_bucket,
                                                                             capsys):
    tok_url, run_url = f"{s3_bucket}/tokenizer/artifact", f"{s3_bucket}/reference"
    upload_artifact(tokenizer_artifact, tok_url)
    try:
        rc = main(["train", str(DEMO / "reference.yaml"), f"run_dir={run_url}", f"inputs.tokenizer={tok_url}",
                   *SMALL, "--launcher", "ray", "--no-progress"])
    finally:  # the node's download cache (driver and workers share this machine's /tmp)
        info = artifact_info(tok_url)
        shutil.rmtree(cache_root() / f"{info.content_hash}-{info.config_hash}", ignore_errors=True)
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "reference: 64 images in" in captured.out

    made = artifact_info(f"{run_url}/artifact")
    tok_info = artifact_info(tok_url)
    assert made.upstream == {"tokenizer": tok_info.id}
    # The latent statistics are those of the S3 tokenizer's EMA weights, measured on the first images.
    tok, _ = open_tokenizer(tok_url, "ema")
    cfg = load_config(DEMO / "reference.yaml", SMALL)
    with torch.no_grad():
        zs = [tok.encode(b["image"]) for b in stats_batches(in_memory_dataset(cfg), cfg.batch_size,
                                                            cfg.data.stats_images)]
    assert made.latent.mean == pytest.approx(float(torch.stack([z.mean() for z in zs]).mean()), rel=1e-4, abs=1e-6)
    assert made.latent.scale == pytest.approx(float(torch.stack([1 / z.std() for z in zs]).mean()), rel=1e-4)
