"""The stages take frozen-encoder features from the teacher: in-process (teacher.remote=false) or from the
TeacherService on a loopback Ray cluster (true), with bit-identical artifacts and latent caches either way; the
configurations that cannot use a teacher are refused by key."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from repo import demo_config as demo
from dmvae_scale.config import ConfigError
from dmvae_scale.data.artifact_store import open_tokenizer
from dmvae_scale.data.latents import LatentStreamDataset
from dmvae_scale.data.shards import write_shards
from dmvae_scale.distributed.teacher_service import options_from_config, start_teacher_service, stop_teacher_service
from dmvae_scale.distributed.teachers import build_teacher, spec_from_config
from dmvae_scale.artifacts import read_artifact_info
from dmvae_scale.train.teacher_features import cache_latents_with_teacher
from dmvae_scale.train.launch import run_local
from dmvae_scale.train.stages import AutoencoderStage, StageInputError, build_stage

# Three steps of 32 images; the GAN starts at step 50 in the demo, so these steps are reconstruction only.
SHORT = ["total_images=96", "log_every_images=32", "data.limit=256"]



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-identical features need the same intra-op thread count here and in the service (which runs one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def artifact_tensors(artifact) -> dict[str, torch.Tensor]:
    artifact, out = Path(artifact), {}
    for name in ("weights", "ema"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(artifact / f"{name}.safetensors")).items()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def service_alive(name: str) -> bool:
    try:
        ray.get_actor(f"{name}-0")
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Without Ray
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_the_tokenizer_encoder_is_the_seeded_teacher_and_features_replace_it():
    cfg = demo("tokenizer")
    stage = AutoencoderStage(cfg)
    teacher = build_teacher(spec_from_config(cfg))
    ours, theirs = stage.tokenizer.encoder.state_dict(), teacher.network.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert stage.frozen_encoder is stage.tokenizer.encoder and stage.teacher_spec == spec_from_config(cfg)

    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon, z = stage.tokenizer(x)
        recon_f, z_f = stage.tokenizer(x, features=teacher.encode(x))
    torch.testing.assert_close(z_f, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon_f, recon, atol=1e-5, rtol=1e-5)
    stage.tokenizer.set_encoder_trainable(True)
    with pytest.raises(ValueError, match="the encoder is trainable"):
        stage.tokenizer(x, features=teacher.encode(x))


@pytest.mark.unit
@pytest.mark.parametrize("stage, overrides, error, message", [
    ("dmd", [], StageInputError, r"teacher.remote: stage 'dmd' has no frozen encoder .*\(stage 3 trains the encoder"),
    ("tokenizer", ["tokenizer.encoder.frozen=false"], StageInputError,
     r"teacher.remote: stage 'tokenizer' .*tokenizer.encoder.frozen=false"),
    ("reference", ["reference.kind=gaussian", "inputs.tokenizer=null"], StageInputError,
     r"teacher.remote: stage 'reference' .*reference.kind=gaussian uses no tokenizer"),
    ("tokenizer", ["teacher.name=dinov2"], ConfigError, r"tokenizer.encoder.arch: 'vit_tiny' has no official DINOv2"),
])
def test_a_remote_teacher_where_none_can_serve_is_refused_by_key(stage, overrides, error, message):
    with pytest.raises(error, match=message):
        build_stage(demo(stage, "teacher.remote=true", *overrides))


@pytest.mark.unit
def test_the_inception_teacher_is_refused_for_training_stages():
    for stage in ("tokenizer", "dmd"):
        with pytest.raises(ConfigError, match=r"teacher.name: 'inception' serves features only"):
            build_stage(demo(stage, "teacher.name=inception"))


@pytest.mark.unit
def test_later_stages_name_the_encoder_of_their_tokenizer_artifact(tmp_path, monkeypatch):
    from dmvae_scale.models.vit import WeightsFileError
    from plain_engine import EMA
    from dmvae_scale.train.stages import save_stage_artifact
    cfg = demo("tokenizer")
    stage = AutoencoderStage(cfg)
    with torch.no_grad():  # an encoder that is no longer the seeded teacher, as after DMD
        stage.tokenizer.encoder.norm.weight.mul_(1.5)
    save_stage_artifact(stage, {"tokenizer": EMA(stage.tokenizer, 0.9)}, cfg, tmp_path / "tok")

    monkeypatch.chdir(tmp_path)  # a relative path is made absolute: the service may run elsewhere
    ref = build_stage(demo("reference", "inputs.tokenizer=tok"))
    spec = ref.teacher_spec
    assert spec.name == "tokenizer" and spec.weights == str(tmp_path / "tok") and spec.artifact_weights == "ema"
    assert ref.frozen_encoder is ref.tokenizer.encoder
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    features = build_teacher(spec).encode(x)
    torch.testing.assert_close(features, stage.tokenizer.encoder(x))
    assert not torch.allclose(features, build_teacher(spec_from_config(cfg)).encode(x), atol=1e-3)
    with pytest.raises(WeightsFileError, match="the artifact changed"):
        build_teacher(dataclasses.replace(spec, sha256="0" * 64))


# ----------------------------------------------------------------------------------------------------------------------
# Remote (a loopback Ray cluster) against in-process
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_runs(ray_driver, tmp_path_factory):
    """The demo tokenizer stage, run with the in-process teacher and with the service."""
    root = tmp_path_factory.mktemp("tokenizer")
    runs = {}
    for remote in (False, True):
        cfg = demo("tokenizer", f"run_dir={root}/{remote}", f"teacher.remote={str(remote).lower()}", *SHORT)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runs[remote] = (cfg, run_local(cfg, progress=False), out.getvalue())
    return runs


@pytest.mark.integration
def test_tokenizer_stage_with_the_service_equals_in_process_bit_for_bit(tokenizer_runs, capsys):
    (_, local, local_out), (cfg, remote, remote_out) = tokenizer_runs[False], tokenizer_runs[True]
    assert local.steps == remote.steps == 3
    # Every step's batch went to the service (plus the one prefetched behind the last); none in-process.
    assert int(re.search(r"\[teacher\] service: (\d+) requests", remote_out).group(1)) == 4
    assert "teacher service" not in local_out
    assert_same_tensors(artifact_tensors(local.artifact), artifact_tensors(remote.artifact))
    # The runner started the service and stopped it at the end.
    name = options_from_config(cfg, spec=spec_from_config(cfg)).name
    assert not service_alive(name)


@pytest.mark.integration
def test_reference_stage_joins_a_running_service_and_equals_in_process(tokenizer_runs, tmp_path, capsys):
    tokenizer_dir = tokenizer_runs[False][1].artifact
    base = [f"inputs.tokenizer={tokenizer_dir}", "total_images=64", "log_every_images=32", "data.limit=64"]
    local = run_local(demo("reference", f"run_dir={tmp_path}/local", *base), progress=False)

    cfg = demo("reference", f"run_dir={tmp_path}/remote", "teacher.remote=true", *base)
    spec = build_stage(cfg).teacher_spec  # the encoder of the tokenizer artifact
    assert spec.name == "tokenizer" and spec.weights == str(tokenizer_dir)
    options = options_from_config(cfg, spec=spec)
    running = start_teacher_service(spec, options)  # what another run on the cluster would have started
    try:
        capsys.readouterr()
        remote = run_local(cfg, progress=False)
        served = running.info()[0]
        assert service_alive(options.name), "the runner stopped a service it did not start"
    finally:
        stop_teacher_service(running)
    # Latent statistics (2 batches of 32) and 2 training steps, each batch asked for once, + 1 prefetched behind the
    # last step (which the service may still be computing when the run ends).
    requests = int(re.search(r"\[teacher\] service: (\d+) requests", capsys.readouterr().out).group(1))
    assert requests == 5 and 4 <= served["requests"] <= 5
    assert read_artifact_info(remote.artifact).latent == read_artifact_info(local.artifact).latent
    assert_same_tensors(artifact_tensors(local.artifact), artifact_tensors(remote.artifact))


@pytest.mark.integration
def test_cache_latents_with_the_service_equals_in_process(tokenizer_runs, tmp_path):
    tokenizer_dir = str(tokenizer_runs[False][1].artifact)
    src = tmp_path / "images"
    write_shards("fashion-mnist", str(src), limit=40, part_size=40, progress=False)
    caches = {}
    for remote in (False, True):
        dest = tmp_path / f"latents-{remote}"
        summary = cache_latents_with_teacher(str(src), str(dest), tokenizer_dir, remote=remote, batch_size=16,
                                             device="cpu", workers=0, dtype="float32", progress=False)
        assert summary.images == 40
        ds = LatentStreamDataset(str(dest), batch_size=8, hflip=False, shuffle=False)
        caches[remote] = {k: torch.stack([torch.from_numpy(ds.get_item(i)[k]) for i in range(40)])
                          for k in ("latent", "latent_flip")}
        del ds
    assert_same_tensors(caches[False], caches[True])

    # And they are this tokenizer's latents of those images (its encoder run directly, not through the teacher).
    from dmvae_scale.data.stream import ImageStreamDataset
    tok, _ = open_tokenizer(tokenizer_dir)
    images = ImageStreamDataset(str(src), batch_size=8, image_size=32, crop="adm", hflip=False, shuffle=False)
    x = torch.stack([images[i]["image"] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(caches[True]["latent"][:8], tok.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[True]["latent_flip"][:8], tok.encode(x.flip(-1)), atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_two_deepspeed_workers_share_the_drivers_service_and_equal_in_process(ray_driver, tmp_path):
    """Ray Train: the driver starts the service, both workers connect to it, and the artifact equals the run with
    in-process features bit for bit (ZeRO-2, gloo, two workers on the two cores)."""
    from dmvae_scale.train.launch import train
    artifacts = {}
    for remote in ("false", "true"):
        cfg = demo("tokenizer", f"run_dir={tmp_path}/{remote}", f"teacher.remote={remote}", "batch_size=8",
                   "total_images=32", "log_every_images=16", "ckpt_every_images=1000", "data.limit=64",
                   "distributed.num_workers=2", "distributed.zero_stage=2")
        result = train(cfg)
        assert result.status == "done" and result.images_seen == 32
        artifacts[remote] = artifact_tensors(tmp_path / remote / "artifact")
    assert_same_tensors(artifacts["false"], artifacts["true"])
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("dmvae-teacher")]
