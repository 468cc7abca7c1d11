"""The self-supervised teacher's objective (VICReg), augmentations, network and linear probe."""
import math
import re

import pytest
import torch

from dmvae_scale.eval.probe import linear_probe_accuracy
from dmvae_scale.method.ssl import ViewAugment, info_nce_loss, vicreg_loss
from dmvae_scale.models.ssl import SSLEncoder
from dmvae_scale.models.vit import VisionTransformer

pytestmark = pytest.mark.unit


def test_vicreg_terms_are_the_papers_and_catch_collapse():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 16, generator=g) * 2.0  # spread, decorrelated: only the sampling noise in cov remains
    loss, t = vicreg_loss(z, z)
    assert t["invariance"] == 0 and t["variance"] == 0  # every dim's std is ~2 > 1: no hinge
    cov = torch.cov(z.T)
    off = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / 16
    assert float(t["covariance"]) == pytest.approx(2 * float(off), rel=1e-4)
    assert float(loss) == pytest.approx(float(t["covariance"]), rel=1e-6)
    # A collapsed embedding (every image the same vector) pays the full variance hinge on both branches: 2 * 1.
    c = torch.ones(512, 16)
    _, tc = vicreg_loss(c, c)
    assert float(tc["variance"]) == pytest.approx(2 * (1 - 1e-2), rel=1e-4)
    # Perfectly correlated dims pay covariance; the invariance term is the mean squared difference.
    x = torch.randn(512, 1, generator=g).expand(-1, 4)
    _, tx = vicreg_loss(x, x + 0.5)
    assert float(tx["covariance"]) > 1.0 and float(tx["invariance"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="two \\(B >= 2, E\\) embeddings"):
        vicreg_loss(z, z[:, :8])


def test_info_nce_is_simclrs_nt_xent_and_rewards_finding_the_other_view():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    loss, t = info_nce_loss(z1, z2, temperature=0.5)
    # By hand: row i of the 2B normalised embeddings scores every other row; its positive is its other view.
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    by_hand = 0.0
    for i in range(16):
        sims = torch.stack([z[i] @ z[j] / 0.5 for j in range(16) if j != i])
        pos = (i + 8) % 16
        by_hand += -(z[i] @ z[pos] / 0.5 - torch.logsumexp(sims, 0))
    assert float(loss) == pytest.approx(float(by_hand) / 16, rel=1e-5)
    # Views that agree (the same embedding, well spread) are found: low loss, every positive ranked first.
    spread = torch.eye(8) * 3
    good, tg = info_nce_loss(spread, spread, temperature=0.1)
    assert float(tg["positive_top1"]) == 1.0 and float(good) < 0.01
    # A collapsed embedding cannot tell its other view from the rest: log(2B - 1).
    flat, tf = info_nce_loss(torch.ones(8, 5), torch.ones(8, 5), temperature=0.1)
    assert float(flat) == pytest.approx(math.log(15), rel=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce_loss(z1, z2, temperature=0.0)


def test_views_are_seeded_in_range_and_different():
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    aug = ViewAugment()
    a = aug(images, torch.Generator().manual_seed(1))
    b = aug(images, torch.Generator().manual_seed(1))
    c = aug(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    # With every random part switched off the view is the image itself.
    still = ViewAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.0, contrast=0.0)
    assert torch.allclose(still(images, torch.Generator().manual_seed(0)), images, atol=1e-5)
    flipped = ViewAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, brightness=0.0, contrast=0.0)
    assert torch.allclose(flipped(images, torch.Generator().manual_seed(0)), images.flip(-1), atol=1e-5)


def test_teacher_backbone_is_the_tokenizer_encoder_class_with_one_token_per_latent_position():
    torch.manual_seed(0)
    net = SSLEncoder("vit_tiny", 32, 4, expander_dim=64)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert net(x).shape == (4, 64) and net.pooled(x).shape == (4, 96)
    encoder = VisionTransformer("vit_tiny", 32, 4)
    encoder.load_state_dict(net.backbone.state_dict(), strict=True)  # the weights a tokenizer's encoder takes
    assert encoder(x).shape == (4, 8 * 8, 96)
    assert torch.equal(encoder(x).mean(1), net.pooled(x))
    loss, _ = vicreg_loss(net(x), net(x.flip(-1)))
    loss.backward()
    assert net.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_knn_probe_equals_a_brute_force_vote_and_is_exact_on_one_hot_labels():
    import numpy as np
    from dmvae_scale.eval.probe import knn_probe_accuracy
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(260, 12, generator=g), torch.randint(0, 5, (260,), generator=g)
    tr, te = x[:200].numpy().astype(np.float64), x[200:].numpy().astype(np.float64)
    tr, te = tr / np.linalg.norm(tr, axis=1, keepdims=True), te / np.linalg.norm(te, axis=1, keepdims=True)
    sim = te @ tr.T
    hits = 0
    for i, row in enumerate(sim):
        top = np.argsort(-row)[:20]
        votes = np.bincount(y[:200].numpy()[top], weights=row[top], minlength=5)
        hits += int(votes.argmax() == int(y[200 + i]))
    assert knn_probe_accuracy(x[:200], y[:200], x[200:], y[200:], k=20, batch=7) == hits / 60
    onehot = torch.nn.functional.one_hot(y, 5).float()
    assert knn_probe_accuracy(onehot[:200], y[:200], onehot[200:], y[200:]) == 1.0


def test_patch_features_keep_spatial_order_and_pooled_do_not():
    from dmvae_scale.eval.ssl_probe import patch_tokens, pool_tokens
    tokens = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(2))  # an 8 x 8 grid of 8-dim tokens
    moved = tokens[:, torch.randperm(64, generator=torch.Generator().manual_seed(3))]
    assert patch_tokens(tokens).shape == (3, 4 * 4 * 8)  # pooled per position to 4 x 4
    assert not torch.allclose(patch_tokens(tokens), patch_tokens(moved))
    assert torch.allclose(pool_tokens(tokens), pool_tokens(moved), atol=1e-6)
    small = torch.randn(2, 16, 8)  # a 4 x 4 grid is kept as is, position-major
    assert torch.equal(patch_tokens(small), small.flatten(1))


def test_linear_probe_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    centres = torch.randn(3, 5, generator=g) * 4
    x = centres[y] + torch.randn(600, 5, generator=g)
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.95
    noise = torch.randn(600, 5, generator=g)
    assert linear_probe_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.5


def _teacher_artifact(path, stage="teacher"):
    from dmvae_scale.artifacts import ArtifactInfo, save_artifact
    torch.manual_seed(1)
    net = SSLEncoder("vit_tiny", 32, 4, expander_dim=64)
    save_artifact(path, ArtifactInfo(stage=stage, models=[], config_hash="x"), {"teacher": net.state_dict()},
                  ema={"teacher": net.state_dict()})
    return net


def test_a_teacher_artifact_is_a_registry_teacher_and_the_tokenizer_encoder(tmp_path):
    from dmvae_scale.config import ConfigError, load_config
    from dmvae_scale.distributed.teachers import build_teacher, spec_from_config
    from dmvae_scale.train.stages import build_stage
    net = _teacher_artifact(tmp_path / "teacher")
    cfg = load_config("configs/demo/tokenizer.yaml", ["teacher.name=ssl", f"teacher.artifact={tmp_path}/teacher"])
    spec = spec_from_config(cfg)
    assert spec.name == "ssl" and spec.weights == str((tmp_path / "teacher").resolve())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = build_teacher(spec).encode(x)
    assert feats.shape == (3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(feats, net.backbone.eval()(x), atol=1e-5)
    # The tokenizer stage's frozen encoder is that network, and the artifact is its upstream.
    stage = build_stage(cfg)
    with torch.no_grad():
        assert torch.allclose(stage.tokenizer.encoder(x), feats, atol=1e-5)
    assert set(stage.artifact()["upstream"]) == {"teacher"}
    with pytest.raises(ConfigError, match="teacher.artifact: teacher.name=ssl needs"):
        spec_from_config(load_config("configs/demo/tokenizer.yaml", ["teacher.name=ssl"]))
    with pytest.raises(ConfigError, match=r"teacher.artifact: stage 'tokenizer' does not use it \(only teacher.name="):
        load_config("configs/demo/tokenizer.yaml", [f"teacher.artifact={tmp_path}/teacher"])
    _teacher_artifact(tmp_path / "other", stage="tokenizer")
    other = load_config("configs/demo/tokenizer.yaml", ["teacher.name=ssl", f"teacher.artifact={tmp_path}/other"])
    with pytest.raises(Exception, match="is a 'tokenizer' artifact; name the artifact of a `teacher` stage"):
        build_teacher(spec_from_config(other))


@pytest.mark.integration
def test_teacher_stage_trains_and_its_artifact_is_the_tokenizer_encoder(tmp_path):
    from dmvae_scale.artifacts import load_artifact
    from dmvae_scale.config import load_config
    from dmvae_scale.train.launch import run_local
    from dmvae_scale.train.stages import build_stage
    cfg = load_config("configs/demo/teacher.yaml", [f"run_dir={tmp_path}/teacher", "total_images=48", "batch_size=16",
                                                    "data.limit=64", "optim.warmup_steps=1"])
    run = run_local(cfg, progress=False)
    assert run.info.stage == "teacher" and run.info.models == ["teacher"]
    assert run.images_seen == 48 and set(run.final_metrics) >= {"loss", "variance", "covariance"}
    assert all(torch.isfinite(torch.tensor(v)) for v in run.final_metrics.values())
    _, raw = load_artifact(run.artifact, "raw")
    _, ema = load_artifact(run.artifact, "ema")
    fresh = SSLEncoder("vit_tiny", 32, 4)
    assert not torch.equal(raw["teacher"]["backbone.blocks.0.attn.qkv.weight"], fresh.backbone.blocks[0].attn.qkv.weight)
    tok = build_stage(load_config("configs/demo/tokenizer.yaml", ["teacher.name=ssl",
                                                                  f"teacher.artifact={run.artifact}"]))
    assert tok.artifact()["upstream"] == {"teacher": run.info.id}
    # The tokenizer's frozen encoder is the teacher's EMA backbone.
    assert torch.equal(tok.tokenizer.encoder.blocks[0].attn.qkv.weight, ema["teacher"]["backbone.blocks.0.attn.qkv.weight"])

    # Its quality bar, as the pipeline's `probe` step measures it: three linear probes on the same images.
    from dmvae_scale.eval.ssl_probe import format_probe, probe_teacher
    from dmvae_scale.errors import UserError
    probe = probe_teacher(run.artifact, train_images=200, progress=False, test_images=2000)
    acc = {k: v["accuracy"] for k, v in probe["results"].items()}
    assert set(acc) == {"raw pixels", "random ViT (same arch)", "SSL teacher"} and probe["test_images"] == 2000
    assert 0.5 < acc["raw pixels"] < 0.9 and all(0.1 < a <= 1 for a in acc.values())  # chance is 0.1
    assert probe["ssl_minus_pixels_points"] == pytest.approx(100 * (acc["SSL teacher"] - acc["raw pixels"]))
    assert format_probe(probe).splitlines()[-1].startswith("SSL teacher vs raw pixels: ")
    table = probe["table"]
    assert set(table) == {"pooled", "patch"} and all(set(t) == {"linear", "knn"} for t in table.values())
    cells = [c for t in table.values() for c in t.values()]
    assert all(0 <= c[k] <= 1 for c in cells for k in ("ssl", "random", "pixels"))
    assert all(c["ssl_minus_random_points"] == pytest.approx(100 * (c["ssl"] - c["random"])) for c in cells)
    assert table["pooled"]["linear"]["ssl"] == acc["SSL teacher"]
    assert sum(line.startswith(("pooled", "patch")) for line in format_probe(probe).splitlines()) == 4
    with pytest.raises(UserError, match="train_images must be in 10..60000"):
        probe_teacher(run.artifact, train_images=5)
    with pytest.raises(UserError, match=r"test_images must be in 10..10000 \(or unset: the whole test split\), "
                                        r"got 20000"):
        probe_teacher(run.artifact, train_images=200, test_images=20000)


def test_a_checkpoint_becomes_an_artifact_of_the_same_run_for_curves_over_training(tmp_path, capsys):
    from dmvae_scale.artifacts import ArtifactError, load_artifact, read_artifact_info
    from dmvae_scale.config import load_config
    from dmvae_scale.train.checkpoint.export import checkpoint_artifact
    from dmvae_scale.train.launch import run_local
    cfg = load_config("configs/demo/teacher.yaml", [f"run_dir={tmp_path}/run", "total_images=48", "batch_size=16",
                                                    "data.limit=64", "optim.warmup_steps=1", "ckpt_every_images=16",
                                                    "log_every_images=16"])
    run = run_local(cfg, progress=False)
    # Without a progress bar (a pipeline's in-process step, `train --no-progress`): one line per log interval.
    # Each carries the ETA of what is left at its rate, the last (nothing left) none.
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] teacher ") and "/48 " in ln]
    assert [ln.split(" images")[0] for ln in lines] == [f"[train] teacher {n}/48" for n in (16, 32, 48)]
    assert [re.sub(r"ETA \d+ s", "ETA N s", ln.split(": ")[0]) for ln in lines] == [
        "[train] teacher 16/48 images, ETA N s", "[train] teacher 32/48 images, ETA N s", "[train] teacher 48/48 images"]
    assert all("loss " in ln and "images_per_second " in ln for ln in lines)
    final_info, final = {}, {}
    for which in ("raw", "ema"):
        final_info, final[which] = load_artifact(run.artifact, which)
    # At the last checkpoint: the run's own artifact, tensor for tensor (raw and EMA), with the same config.
    last = checkpoint_artifact(f"{tmp_path}/run", 48, str(tmp_path / "at48"))
    for which in ("raw", "ema"):
        info, w = load_artifact(last, which)
        assert w["teacher"].keys() == final[which]["teacher"].keys()
        assert all(torch.equal(w["teacher"][k], final[which]["teacher"][k]) for k in w["teacher"])
    assert info.extra["images_seen"] == 48 and info.extra["from_artifact"] == final_info.id
    assert info.config_hash == final_info.config_hash and info.stage == "teacher"
    # Earlier: other weights, marked with the images they had seen.
    first_info, first = load_artifact(checkpoint_artifact(f"{tmp_path}/run", 16, str(tmp_path / "at16")), "ema")
    assert first_info.extra["images_seen"] == 16
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(first["teacher"][key], final["ema"]["teacher"][key])
    assert read_artifact_info(tmp_path / "at16").content_hash != final_info.content_hash
    with pytest.raises(ArtifactError, match=r"no complete checkpoint at 8 images; kept: 16, 32, 48"):
        checkpoint_artifact(f"{tmp_path}/run", 8, str(tmp_path / "at8"))


def test_teacher_stage_trains_with_the_simclr_objective_and_refuses_a_bad_temperature(tmp_path):
    from dmvae_scale.config import ConfigError, load_config
    from dmvae_scale.train.launch import run_local
    base = [f"run_dir={tmp_path}/teacher", "total_images=32", "batch_size=16", "data.limit=64", "optim.warmup_steps=1",
            "ssl.objective=simclr"]
    run = run_local(load_config("configs/demo/teacher.yaml", base), progress=False)
    assert set(run.final_metrics) >= {"loss", "positive_top1"} and "variance" not in run.final_metrics
    assert 0 <= run.final_metrics["positive_top1"] <= 1 and math.isfinite(run.final_metrics["loss"])
    with pytest.raises(ConfigError, match=r"ssl.temperature: must be > 0, got -0.1"):
        load_config("configs/demo/teacher.yaml", [*base, "ssl.temperature=-0.1"])
    with pytest.raises(ConfigError, match=r"ssl.objective"):
        load_config("configs/demo/teacher.yaml", [*base, "ssl.objective=dino"])
