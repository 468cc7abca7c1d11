"""Fidelity to the official recipe (issue 23): the DiT embeds time as LightningDiT does, the dmd stage hands on its
tokenizer's raw weights (an EMA only where the config asks), and checkpoints and artifacts made before these changes
are refused with the reason."""
from __future__ import annotations

import json
import math

import pytest
import torch

from repo import DEMO, demo_config as demo
from dmvae_scale.artifacts import METHOD_VERSION, ArtifactError, ArtifactInfo, read_artifact_info, save_artifact
from dmvae_scale.cli import main
from dmvae_scale.config import config_hash, dump_yaml
from dmvae_scale.models.dit import LightningDiT
from dmvae_scale.models.layers import TimestepEmbedding
from dmvae_scale.train.checkpoint import MANIFEST, CheckpointStore, ResumeRefusedError
from dmvae_scale.train.checkpoint.meaning import METHOD_KEY, check_method_version
from dmvae_scale.train.launch import run_local
from dmvae_scale.train.stages import AutoencoderStage, build_stage
from test_stages import tiny as upstream  # noqa: F401  (fixture: tokenizer, reference, dmd artifacts)

T_VALUES = [0.0, 1e-4, 0.03, 0.25, 0.5, 0.7311, 0.999, 1.0]


def lightningdit_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """LightningDiT's timestep features, written here from its description: half = dim / 2 frequencies
    f_k = exp(-ln(max_period) * k / half), k = 0 .. half - 1, of the raw t; the cosines, then the sines."""
    half = dim // 2
    rows = []
    for value in t.tolist():
        angles = [value * math.exp(-math.log(max_period) * k / half) for k in range(half)]
        rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.unit
def test_the_time_embedding_is_lightningdits_formula_on_raw_t():
    t = torch.tensor(T_VALUES)
    emb = TimestepEmbedding(64)
    reference = lightningdit_frequencies(t)
    ours = emb.sinusoid(t).double()
    assert ours.shape == (len(T_VALUES), 256)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    # then the MLP (Linear 256 -> D, SiLU, Linear D -> D) on those features
    with torch.no_grad():
        w1, b1, w2, b2 = (p.double() for p in (emb.mlp[0].weight, emb.mlp[0].bias, emb.mlp[2].weight, emb.mlp[2].bias))
        expected = torch.nn.functional.silu(reference @ w1.T + b1) @ w2.T + b2
        torch.testing.assert_close(emb(t).double(), expected, rtol=0, atol=1e-6)
    # t = 1 is one radian at the fastest frequency: the t * 1000 embedding of before would be 1000 radians
    assert float(ours[-1, 128]) == pytest.approx(math.sin(1.0), abs=1e-6)


@pytest.mark.unit
def test_the_dit_feeds_the_raw_time_to_its_embedding():
    cfg = demo("reference").score
    dit = LightningDiT(cfg).eval()
    seen = []
    dit.t_embed.register_forward_hook(lambda module, args, out: seen.append((args[0].clone(), out.detach())))
    t = torch.tensor(T_VALUES[:4])
    with torch.no_grad():
        dit(torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size), t, torch.arange(4))
    torch.testing.assert_close(seen[0][0], t, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(seen[0][1], dit.t_embed.mlp(lightningdit_frequencies(t).float()), rtol=0,
                                   atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The dmd stage's tokenizer: raw weights forward, an EMA only on request
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_the_dmd_stage_keeps_a_tokenizer_ema_only_where_the_config_asks(upstream):
    base = [f"inputs.tokenizer={upstream}/tokenizer", f"inputs.real_score={upstream}/reference"]
    default = demo("dmd", *base)
    assert default.dm.tokenizer_ema is False
    assert build_stage(default).models()["tokenizer"].ema is False
    assert build_stage(demo("dmd", *base, "dm.tokenizer_ema=true")).models()["tokenizer"].ema is True
    # the shipped recipes hand the dmd stage's raw weights to the decoder, and the decoder's raw ones onward
    for stage in ("decoder", "generator"):
        assert demo(stage).inputs.tokenizer_weights == "raw"


@pytest.mark.integration
def test_a_decoder_asking_for_the_dmd_stages_ema_is_told_there_is_none(upstream, tmp_path, capsys):
    rc = main(["train", str(DEMO / "dmd.yaml"), f"run_dir={tmp_path}/dmd",
               f"inputs.tokenizer={upstream}/tokenizer", f"inputs.real_score={upstream}/reference",
               "total_images=32", "batch_size=16", "data.limit=64", "dm.tokenizer_every=2", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    assert not (tmp_path / "dmd" / "artifact" / "ema.safetensors").exists()
    capsys.readouterr()
    rc = main(["train", str(DEMO / "decoder.yaml"), f"run_dir={tmp_path}/dec",
               f"inputs.tokenizer={tmp_path}/dmd/artifact", "inputs.tokenizer_weights=ema", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "dmd/artifact has no ema weights; set inputs.tokenizer_weights=raw" in err


# ----------------------------------------------------------------------------------------------------------------------
# Made before these changes: refused, saying why
# ----------------------------------------------------------------------------------------------------------------------

def _as_before_method_2(manifest_path):
    raw = json.loads(manifest_path.read_text())
    raw.pop("method")
    manifest_path.write_text(json.dumps(raw))


@pytest.mark.unit
def test_an_artifact_holding_a_dit_from_before_method_version_2_is_refused_with_the_reason(upstream, tmp_path):
    assert read_artifact_info(upstream / "reference").method == METHOD_VERSION == 2
    old = tmp_path / "old_reference"
    old.mkdir()
    for name in ("artifact.json", "weights.safetensors", "ema.safetensors", "config.yaml"):
        (old / name).write_bytes((upstream / "reference" / name).read_bytes())
    _as_before_method_2(old / "artifact.json")
    expected = (f"{old}/artifact.json: this reference artifact (real_score) was made with the DiT time embedding "
                f"t*1000 (before method version 2: the DiT embeds t in [0, 1], as LightningDiT does), so its score "
                f"model computes another function here; retrain it, and the stages after it, with this version "
                f"(delete the old run directory and artifact first)")
    with pytest.raises(ArtifactError) as err:
        read_artifact_info(old)
    assert str(err.value) == expected
    # ... and where a stage would read it, as one line with exit status 2
    rc = main(["train", str(DEMO / "dmd.yaml"), f"inputs.tokenizer={upstream}/tokenizer",
               f"inputs.real_score={old}"])
    assert rc == 2
    # A tokenizer's function did not change: one from before is read as it was.
    cfg = demo("tokenizer")
    tok_dir = tmp_path / "old_tokenizer"
    save_artifact(tok_dir, ArtifactInfo("tokenizer", [], config_hash(cfg)),
                  {"tokenizer": AutoencoderStage(cfg).tokenizer.state_dict()}, config_yaml=dump_yaml(cfg))
    _as_before_method_2(tok_dir / "artifact.json")
    assert read_artifact_info(tok_dir).method == 1


@pytest.mark.integration
def test_a_dit_checkpoint_from_before_method_version_2_is_refused_with_the_reason(tmp_path):
    args = [f"run_dir={tmp_path}/ref", "reference.kind=gaussian", "inputs.tokenizer=null", "batch_size=16",
            "data.limit=64", "ckpt_every_images=32"]
    run_local(demo("reference", *args, "total_images=32"), progress=False)
    store = CheckpointStore(str(tmp_path / "ref"))
    latest = store.latest()
    assert latest.meaning[METHOD_KEY] == METHOD_VERSION
    manifest = tmp_path / "ref" / "checkpoints" / latest.name / MANIFEST
    raw = json.loads(manifest.read_text())
    raw["meaning"].pop(METHOD_KEY)
    manifest.write_text(json.dumps(raw))
    with pytest.raises(ResumeRefusedError) as err:
        run_local(demo("reference", *args, "total_images=64"), progress=False)
    assert str(err.value) == (
        f"checkpoint {latest.url} was made with the DiT time embedding t*1000 (before method version 2: the DiT "
        f"embeds t in [0, 1], as LightningDiT does), so its score model computes another function here; retrain "
        f"it, and the stages after it, with this version (delete the old run directory and artifact first)")


@pytest.mark.unit
def test_checkpoints_of_stages_without_a_dit_resume_across_the_method_version():
    current = {"stage": "tokenizer", METHOD_KEY: METHOD_VERSION, "tokenizer.latent_channels": 4}
    before = {"stage": "tokenizer", "tokenizer.latent_channels": 4}
    assert check_method_version(before, current, "checkpoint x") == current
    with pytest.raises(ResumeRefusedError, match=r"^checkpoint x was made with the DiT time embedding t\*1000"):
        check_method_version({"stage": "generator"}, {**current, "stage": "generator"}, "checkpoint x")
