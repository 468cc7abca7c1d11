"""`dmvae-scale eval ref | samples | tokenizer` end to end on real images (Fashion-MNIST), a real `sample` output and
a demo tokenizer artifact; the refusals a user meets (few samples, another network's statistics, float arrays).

CPU-sized: 16 reference images, 8 samples, 6 validation images, so FID runs with --allow-few-samples.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from dmvae_scale import cli
from dmvae_scale.eval.images import as_uint8_nchw
from dmvae_scale.eval.metrics import psnr
from dmvae_scale.eval.sources import open_image_set
from dmvae_scale.eval.stats import load_stats
from dmvae_scale.models.vit import VisionTransformer
from test_eval_sample import artifacts  # noqa: F401  (fixture: demo tokenizer + generator artifacts)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    """A random ViT-tiny in the official DINOv2 checkpoint layout (37x37 position grid, 14 px patches)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vit_tiny14_random.pth"
    torch.save(VisionTransformer("vit_tiny", 518, 14).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dinov2_weights):
    out = tmp_path_factory.mktemp("ref") / "fmnist-test-32.npz"
    rc = cli.main(["eval", "ref", "fashion-mnist", "--split", "test", "--limit", "16", "--image-size", "32",
                   "--out", str(out), "--dinov2", str(dinov2_weights), "--dinov2-arch", "vit_tiny", "--no-progress"])
    assert rc == 0
    return out


def test_reference_statistics_carry_network_identity(reference):
    stats = load_stats(reference)
    assert (stats.network, stats.num_images, stats.dim) == ("tf-inception-2015-12-05", 16, 2048)
    assert len(stats.fingerprint) == 64 and stats.features.shape == (16, 2048)
    dino = load_stats(reference.with_name("fmnist-test-32-dinov2.npz"))
    assert dino.network == "dinov2-vit_tiny14-cls-224" and dino.dim == 96


def test_eval_samples_of_a_sample_run_writes_report(artifacts, reference, dinov2_weights, tmp_path):  # noqa: F811
    samples = tmp_path / "samples"
    assert cli.main(["sample", str(artifacts / "generator"), "sampler.steps=2", "sampler.cfg_scale=1.5",
                     "--out", str(samples), "--local", "--num-samples", "8", "--batch-size", "4",
                     "--no-progress"]) == 0
    report = tmp_path / "report"
    rc = cli.main(["eval", "samples", str(samples), "--ref", str(reference), "--out", str(report),
                   "--allow-few-samples", "--dinov2", str(dinov2_weights), "--dinov2-arch", "vit_tiny",
                   "--dinov2-ref", str(reference.with_name("fmnist-test-32-dinov2.npz")), "--no-progress"])
    assert rc == 0
    result = json.loads((report / "metrics.json").read_text())
    m, settings = result["metrics"], result["settings"]
    assert m["num_samples"] == 8 and m["fid"] > 1.0 and m["fd_dinov2"] > 0.0
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert "inception_score" not in m and any("Inception Score not computed" in n for n in result["notes"])
    # The sampler settings travel with the number, and the FID's protocol in one place.
    assert (settings["sampling.steps"], settings["sampling.cfg_scale"], settings["sampling.method"]) == \
        (2, 1.5, "ode_heun")
    protocol = m["protocol"]
    assert {k: protocol[k] for k in ("num_samples", "sampler", "steps", "cfg_scale", "time_shift", "label_sampling",
                                     "dtype", "reference_images", "feature_network")} == {
        "num_samples": 8, "sampler": "ode_heun", "steps": 2, "cfg_scale": 1.5, "time_shift": 1.0,
        "label_sampling": "balanced: sample i has label i % num_classes", "dtype": "fp32", "reference_images": 16,
        "feature_network": "tf-inception-2015-12-05"}
    assert protocol["reference_sha256"] == hashlib.sha256(reference.read_bytes()).hexdigest()
    assert protocol["network_fingerprint"] == load_stats(reference).fingerprint
    # 8 samples and 16 reference images are too few for KID's 10 disjoint subsets: said, not computed
    assert "kid" not in m and any(n.startswith("KID not computed: 8 samples and 16 reference") for n in result["notes"])
    text = (report / "report.md").read_text()
    assert "| fid |" in text and "| sampling.steps | 2 |" in text and "![samples](grid.png)" in text
    assert "## Protocol" in text and "| reference_sha256 | " in text
    assert (report / "grid.png").is_file()


def test_too_few_samples_refused_before_any_feature_work(reference, tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "few.npz", images)
    rc = cli.main(["eval", "samples", str(tmp_path / "few.npz"), "--ref", str(reference), "--out",
                   str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "30 images for 2048-d" in err and "use at least 2049" in err
    assert not (tmp_path / "r").exists()


def test_statistics_of_another_network_refused(reference, tmp_path, capsys):
    dino_ref = reference.with_name("fmnist-test-32-dinov2.npz")
    np.savez(tmp_path / "s.npz", np.zeros((4, 32, 32, 3), np.uint8) + 9)
    rc = cli.main(["eval", "samples", str(tmp_path / "s.npz"), "--ref", str(dino_ref), "--out", str(tmp_path / "r"),
                   "--allow-few-samples"])
    err = capsys.readouterr().err
    assert rc == 2 and "computed with feature network 'dinov2-vit_tiny14-cls-224'" in err
    assert "recompute the reference with `dmvae-scale eval ref`" in err


def test_float_sample_arrays_refused(reference, tmp_path, capsys):
    np.savez(tmp_path / "f.npz", np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32))
    rc = cli.main(["eval", "samples", str(tmp_path / "f.npz"), "--ref", str(reference), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "arr_0 is float32" in err and "uint8 N x H x W x 3" in err


def test_eval_tokenizer_reports_rfid_and_exact_psnr(artifacts, tmp_path):  # noqa: F811
    out = tmp_path / "tok"
    rc = cli.main(["eval", "tokenizer", str(artifacts / "tokenizer"), "--source", "fashion-mnist", "--split", "test",
                   "--limit", "6", "--out", str(out), "--allow-few-samples", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    # Recompute the PSNR here from the same artifact and images.
    from dmvae_scale.data.artifact_store import open_tokenizer
    tok, artifact = open_tokenizer(artifacts / "tokenizer")
    cfg = artifact.config()
    images = next(open_image_set("fashion-mnist", "test", cfg.tokenizer.image_size, 6).batches(6))
    x = as_uint8_nchw(images)
    with torch.no_grad():
        y = tok.decode(tok.encode(x.float() / 127.5 - 1)).clamp(-1, 1)
    expected = psnr(x, as_uint8_nchw(y, value_range=(-1, 1))).mean().item()
    assert m["num_images"] == 6 and m["psnr"] == pytest.approx(expected, rel=1e-9)
    assert m["rfid"] > 0.0 and 0.0 < m["ssim"] < 1.0
    assert (out / "grid.png").is_file() and "| rfid |" in (out / "report.md").read_text()


def test_eval_tokenizer_with_the_originals_statistics_given_scores_the_same_without_recomputing_them(
        artifacts, reference, tmp_path):  # noqa: F811
    """A pipeline's real_stats step shares the originals' statistics between tokenizers: the same rFID."""
    from dmvae_scale.errors import UserError
    from dmvae_scale.eval.commands import eval_tokenizer
    from dmvae_scale.eval.evaluate import EvalOptions
    opts = EvalOptions(allow_few_samples=True, progress=False)
    tok = str(artifacts / "tokenizer")
    alone = eval_tokenizer(tok, "fashion-mnist", str(tmp_path / "alone"), limit=16, opts=opts)
    shared = eval_tokenizer(tok, "fashion-mnist", str(tmp_path / "shared"), limit=16, opts=opts,
                            reference=str(reference), reference_image_size=32)
    assert shared["rfid"] == pytest.approx(alone["rfid"], rel=1e-9, abs=1e-9)
    assert (shared["psnr"], shared["num_images"]) == (alone["psnr"], 16)
    assert "originals_statistics" in (tmp_path / "shared" / "report.md").read_text()
    with pytest.raises(UserError, match=r"hold 16 images, the validation set \(.*\) has 6: not the same images"):
        eval_tokenizer(tok, "fashion-mnist", str(tmp_path / "six"), limit=6, opts=opts, reference=str(reference),
                       reference_image_size=32)
    with pytest.raises(UserError, match=r"are of images at 28 px, the tokenizer .* reconstructs 32 px images: "
                                        r"compute them at image_size 32"):
        eval_tokenizer(tok, "fashion-mnist", str(tmp_path / "size"), limit=16, opts=opts, reference=str(reference),
                       reference_image_size=28)


def test_reference_from_shards_equals_reference_from_the_same_images(reference, tmp_path):
    """`eval ref` over MDS shards of the same 16 images (same ADM resize) gives the same statistics."""
    from dmvae_scale.data.shards import write_shards
    shards = tmp_path / "shards"
    write_shards("fashion-mnist", str(shards), split="test", limit=16, progress=False)
    out = tmp_path / "from-shards.npz"
    assert cli.main(["eval", "ref", str(shards), "--image-size", "32", "--out", str(out), "--no-progress"]) == 0
    a, b = load_stats(out), load_stats(reference)
    assert a.num_images == b.num_images == 16 and a.fingerprint == b.fingerprint
    assert np.abs(a.features - b.features).max() < 1e-4


def test_an_eval_with_a_classifier_carries_fd_classifier_and_says_why_it_is_not_computed_for_few_samples(tmp_path):
    """score_samples as the pipeline's eval step calls it (classifier and the real set named): 8 samples are too
    few for the classifier's 128-d features, so fd_classifier is None with its reason, never a number."""
    from dmvae_scale.eval.classifier import ClassifierReport, EvalClassifier, save_classifier
    from dmvae_scale.eval.score import RealImages, real_statistics, score_samples
    torch.manual_seed(0)
    save_classifier(EvalClassifier().eval(), ClassifierReport(0, 0, 0, 0.0, 0.0, 0), tmp_path / "clf")
    images = open_image_set("fashion-mnist", "test", 32, 8)
    x = np.concatenate(list(images.batches(8)))
    np.savez(tmp_path / "samples.npz", arr_0=x, arr_1=images.labels[:8])
    real = RealImages("fashion-mnist", "test", limit=16, image_size=32)
    stats = real_statistics(real, tmp_path / "real")
    m = score_samples(tmp_path / "samples.npz", stats, tmp_path / "out", classifier=tmp_path / "clf", real=real)
    assert m["fd_classifier"] is None and m["fd_classifier_not_computed"].startswith(
        "FD-classifier not computed: 8 samples and 16 real images for 128-d classifier features")
    protocol = m["fd_classifier_protocol"]
    assert (protocol["feature_dim"], protocol["num_samples"], protocol["num_real"], protocol["real_images"]) == \
        (128, 8, 16, real.key())
    assert 0.0 <= m["classifier_accuracy"] <= 1.0
