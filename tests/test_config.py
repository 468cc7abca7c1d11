"""Typed configs: strict loading, dotted overrides, one-line CLI errors, the shipped recipe files."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repo import REPO
from dmvae_scale.config import (ConfigError, RunConfig, config_hash, dump_yaml, load_config, save_resolved)

pytestmark = pytest.mark.unit
# pipeline.yaml lists steps (tests/test_pipeline.py); configs/scaling/ holds sweeps (tests/test_scaling_sweep.py);
# configs/study/ a study (tests/test_study.py)
CONFIGS = [p for p in sorted((REPO / "configs").glob("*/*.yaml"))
           if p.name != "pipeline.yaml" and p.parent.name not in ("scaling", "study")]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "dmvae_scale.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    assert len(CONFIGS) >= 10
    for path in CONFIGS:
        cfg = load_config(path)
        out = save_resolved(cfg, tmp_path / path.stem)
        again = load_config(out)
        assert again == cfg, path
        assert config_hash(again) == config_hash(cfg)


def test_imagenet_recipe_matches_method():
    dmd = load_config(REPO / "configs/imagenet256/dmd.yaml")
    assert (dmd.optim.lr, dmd.dm.lambda_dm, dmd.dm.cfg_scale, dmd.dm.tokenizer_every) == (2e-5, 10.0, 5.0, 5)
    tok = load_config(REPO / "configs/imagenet256/tokenizer.yaml")
    assert (tok.optim.lr, tok.optim.betas, tok.optim.weight_decay, tok.optim.warmup_steps) == (1e-4, (0.9, 0.95), 0.005,
                                                                                              1000)
    assert tok.total_images == 40_000 * 256 and tok.tokenizer.latent_channels == 32
    ref = load_config(REPO / "configs/imagenet256/reference.yaml")
    assert (ref.score.size, ref.optim.lr, ref.batch_size, ref.total_images) == ("XL", 2e-4, 1024, 500_000 * 1024)
    gen = load_config(REPO / "configs/imagenet256/generator.yaml")
    assert gen.sampler.method == "sde_euler_maruyama" and gen.sampler.steps == 250


def test_imagenet_dmd_recipe_is_the_official_one_and_the_discriminator_gets_its_own_weight_decay():
    from dmvae_scale.train.stages import discriminator_optim
    dmd = load_config(REPO / "configs/imagenet256/dmd.yaml")
    assert (dmd.loss.gan_start_step, dmd.optim.warmup_steps, dmd.optim.weight_decay) == (5000, 1000, 0.005)
    disc = discriminator_optim(dmd)
    assert (disc.weight_decay, disc.lr, disc.warmup_steps) == (0.0005, 2e-5, 1000)
    # Without the key the discriminator shares the run's settings.
    tok = load_config(REPO / "configs/imagenet256/tokenizer.yaml")
    assert discriminator_optim(tok) == tok.optim
    # The stage hands the discriminator's engine its own settings.
    from dmvae_scale.train.stages import build_stage
    stage = build_stage(load_config(REPO / "configs/demo/tokenizer.yaml", ["discriminator.weight_decay=0.0005",
                                                                          "optim.weight_decay=0.005"]))
    assert stage.models()["discriminator"].optim.weight_decay == 0.0005
    assert stage.models()["tokenizer"].optim.weight_decay == 0.005


def test_dotted_overrides_are_typed():
    cfg = load_config(REPO / "configs/demo/reference.yaml",
                      ["score.depth=3", "optim.lr=3e-4", "optim.betas=[0.8, 0.99]", "sampler.guidance_interval=[0.1, 0.9]",
                       "inputs.tokenizer=null"])
    assert cfg.score.depth == 3 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.99)
    assert cfg.sampler.guidance_interval == (0.1, 0.9) and cfg.inputs.tokenizer is None
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override,message", [
    ("scor.depth=3", "unknown config key 'scor'; did you mean score?"),
    ("score.dpth=3", "unknown config key 'score.dpth'; did you mean score.depth?"),
    ("score.depth=abc", "score.depth: expected an integer or null, got 'abc'"),
    ("stage=tokeniser", "stage: expected one of 'teacher', 'tokenizer', 'reference', 'dmd', 'decoder', 'generator'"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("distributed.use_gpu=1", "distributed.use_gpu: expected true or false, got 1"),
    ("score.depth", "must look like key.path=value"),
    ("score.depth.x=1", "'score.depth' is not a section"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/demo/reference.yaml", [override])
    assert message in str(err.value)


def test_unknown_key_in_file_names_key_and_nearest(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"stage": "tokenizer", "optim": {"learning_rate": 1e-4}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'; valid keys: lr, betas"):
        load_config(f)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="batch_size: 30 is not divisible by distributed.num_workers"):
        load_config(None, ["batch_size=30", "distributed.num_workers=4"])
    with pytest.raises(ConfigError, match="tokenizer.image_size: 250 is not a multiple of tokenizer.encoder.patch_size"):
        load_config(None, ["tokenizer.image_size=250"])
    with pytest.raises(ConfigError, match="data.stats_images: must be positive, got 0"):
        load_config(None, ["data.stats_images=0"])


@pytest.mark.parametrize("args,message", [
    (["config", "show", "configs/demo/dmd.yaml", "dm.lambda_dmm=1"], "error: unknown config key 'dm.lambda_dmm'"),
    (["config", "show", "configs/demo/dmd.yaml", "dm.lambda_dm=big"], "error: dm.lambda_dm: expected a number"),
    (["config", "show", "configs/demo/nope.yaml"], "error: config file not found: configs/demo/nope.yaml"),
])
def test_cli_config_errors_are_one_line_without_traceback(args, message):
    r = cli(*args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_config_show_prints_resolved_config():
    r = cli("config", "show", "configs/demo/generator.yaml", "score.depth=5")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["score"]["depth"] == 5 and shown["stage"] == "generator"
    assert load_config(REPO / "configs/demo/generator.yaml", ["score.depth=5"]) == load_config_from_text(r.stdout)


def load_config_from_text(text, tmp=Path("/tmp")):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return load_config(f.name)


def test_defaults_are_a_valid_config():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert "stage: tokenizer" in dump_yaml(cfg)


def test_a_file_written_before_the_real_score_rename_still_loads(tmp_path, capsys):
    """An artifact's config.yaml from before `inputs.reference` became `inputs.real_score` loads, with a note."""
    old = tmp_path / "config.yaml"
    old.write_text("stage: dmd\ninputs: {tokenizer: t/artifact, reference: r/artifact}\n")
    cfg = load_config(old)
    assert cfg.inputs.real_score == "r/artifact"
    assert "inputs.reference is now called inputs.real_score" in capsys.readouterr().err
    old.write_text("stage: dmd\ninputs: {reference: r/artifact, real_score: s/artifact}\n")
    with pytest.raises(ConfigError, match="both inputs.reference .* and inputs.real_score are set"):
        load_config(old)
