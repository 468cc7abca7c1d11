"""`sample`: a demo-sized generator artifact (random weights, real DiT + tokenizer) sampled to PNGs and an ADM .npz,
resumed exactly after lost files, refused on changed settings, and spread over Ray workers with the same result."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch

from repo import tokenizer_artifact
from dmvae_scale import cli
from dmvae_scale.artifacts import ArtifactInfo, save_artifact
from dmvae_scale.config import config_hash, dump_yaml, load_config
from dmvae_scale.data.artifact_store import upload_artifact
from dmvae_scale.errors import UserError
from dmvae_scale.eval.sample_run import plan_for, run_sample
from dmvae_scale.eval.sampling import png_path
from dmvae_scale.models.dit import LightningDiT

pytestmark = pytest.mark.integration

SDE = ["sampler.method=sde_euler_maruyama", "sampler.steps=3", "sampler.cfg_scale=2.0",
       "sampler.guidance_interval=[0.2,0.9]", "sampler.seed=7"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Tokenizer (decoder stage, with latent statistics) and generator artifacts as the stages write them."""
    root = tmp_path_factory.mktemp("artifacts")
    tok_info, _, _ = tokenizer_artifact(root / "tokenizer", "decoder", latent=(0.1, 2.0), ema=True)
    latent = tok_info.latent
    gen_cfg = load_config("configs/demo/generator.yaml", [f"inputs.tokenizer={root / 'tokenizer'}"])
    dit = LightningDiT(gen_cfg.score)
    with torch.no_grad():  # adaLN-Zero starts at v = 0; give the output and modulation layers weights
        for p in dit.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    save_artifact(root / "generator", ArtifactInfo("generator", [], config_hash(gen_cfg), latent,
                                                   upstream={"tokenizer": tok_info.id}),
                  {"generator": dit.state_dict()}, ema={"generator": dit.state_dict()},
                  config_yaml=dump_yaml(gen_cfg))
    return root


@pytest.fixture(scope="module")
def local_run(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray workers run one thread; same reduction order, same bits
    try:
        npz = run_sample(str(artifacts / "generator"), str(out), num_samples=10, batch_size=4, overrides=SDE,
                         use_ray=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, np.load(npz)


def test_default_plan_is_50_per_class_from_the_artifact_config(artifacts):
    plan, tok = plan_for(artifacts / "generator", None, None, 64)
    counts = np.bincount(plan.labels(range(plan.num_samples)))
    assert plan.num_samples == 500 and list(counts) == [50] * 10
    assert (plan.method, plan.steps, plan.cfg_scale) == ("ode_heun", 20, 1.0)  # configs/demo/generator.yaml
    assert tok == str(artifacts / "tokenizer")


def test_local_sampling_writes_pngs_npz_grid_and_settings(local_run):
    out, data = local_run
    assert data["arr_0"].shape == (10, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert list(data["arr_1"]) == [i % 10 for i in range(10)]
    assert data["arr_0"].std() > 5  # decoded images, not a constant
    settings = json.loads((out / "sampling.json").read_text())
    assert (settings["method"], settings["steps"], settings["cfg_scale"], settings["guidance_interval"],
            settings["seed"], settings["batch_size"]) == ("sde_euler_maruyama", 3, 2.0, [0.2, 0.9], 7, 4)
    assert len(list((out / "images").glob("*.png"))) == 10 and (out / "grid.png").is_file()


def test_resume_rewrites_exactly_the_missing_samples(local_run, artifacts, capsys):
    out, data = local_run
    before = {i: os.stat(png_path(out, i)).st_mtime_ns for i in range(10)}
    for i in (2, 9):
        png_path(out, i).unlink()
    (out / "samples.npz").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        npz = run_sample(str(artifacts / "generator"), str(out), num_samples=10, batch_size=4, overrides=SDE,
                         use_ray=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert "wrote 2 new images" in capsys.readouterr().out
    assert np.array_equal(np.load(npz)["arr_0"], data["arr_0"])  # the same pixels as the uninterrupted run
    assert all(os.stat(png_path(out, i)).st_mtime_ns == before[i] for i in range(10) if i not in (2, 9))


def test_resume_with_other_settings_is_refused(local_run, artifacts):
    out, _ = local_run
    with pytest.raises(UserError, match=r"made with steps=3, this run asks for steps=5"):
        run_sample(str(artifacts / "generator"), str(out), num_samples=10, batch_size=4,
                   overrides=SDE + ["sampler.steps=5"], use_ray=False, progress=False)


def test_ray_workers_produce_the_same_samples(local_run, artifacts, tmp_path, ray_driver):  # noqa: F811
    _, data = local_run
    npz = run_sample(str(artifacts / "generator"), str(tmp_path / "ray"), num_samples=10, batch_size=4,
                     overrides=SDE, workers=2, gpus_per_worker=0, progress=False)
    assert np.array_equal(np.load(npz)["arr_0"], data["arr_0"])


def test_generator_and_tokenizer_on_s3_sample_the_same_images(local_run, artifacts, s3_bucket, tmp_path,
                                                              monkeypatch):
    _, data = local_run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's artifact download cache
    gen_url, tok_url = f"{s3_bucket}/generator/artifact", f"{s3_bucket}/tokenizer/artifact"
    upload_artifact(artifacts / "generator", gen_url)
    upload_artifact(artifacts / "tokenizer", tok_url)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        npz = run_sample(gen_url, str(tmp_path / "s3"), num_samples=10, batch_size=4, overrides=SDE,
                         tokenizer=tok_url, use_ray=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.load(npz)["arr_0"], data["arr_0"])
    copies = [d for d in (tmp_path / f"dmvae-{os.geteuid()}" / "artifacts").iterdir() if d.is_dir()]
    assert len(copies) == 2  # generator and tokenizer, each fetched once into a directory named by its content hash


def test_cli_refuses_model_overrides_and_foreign_tokenizer(artifacts, tmp_path, capsys):
    rc = cli.main(["sample", str(artifacts / "generator"), "score.depth=3", "--out", str(tmp_path / "x"), "--local"])
    assert rc == 2 and "only sampler.* settings can be overridden" in capsys.readouterr().err
    other = tmp_path / "other_tok"
    cfg = load_config("configs/demo/decoder.yaml")
    save_artifact(other, ArtifactInfo("decoder", [], config_hash(cfg)), {"tokenizer": {"w": torch.ones(1)}},
                  config_yaml=dump_yaml(cfg))
    rc = cli.main(["sample", str(artifacts / "generator"), "--tokenizer", str(other), "--out", str(tmp_path / "y"),
                   "--local"])
    assert rc == 2 and "was trained on the latents of" in capsys.readouterr().err
