"""The 2-D distribution-matching toy, the reference sources behind it, and `dmvae-scale toy`."""
import math

import numpy as np
import pytest
import torch

from dmvae_scale.cli import main
from dmvae_scale.method.references import (FileSamples, GaussianMixture, NoisyTokenizerLatents, StandardGaussian,
                                           TokenizerLatents, random_means, ring_means)
from dmvae_scale.method.toy import ToySettings, run_toy, sliced_wasserstein


@pytest.mark.unit
def test_sliced_wasserstein_measures_a_shift_and_is_near_zero_for_equal_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=g)
    b = torch.randn(2000, 2, generator=g)
    assert float(sliced_wasserstein(a, b, generator=g)) < 0.05
    # Shifting by (3, 0): each unit direction theta sees a shift of 3*|cos(theta)|, whose mean is 3 * 2/pi.
    shifted = float(sliced_wasserstein(a + torch.tensor([3.0, 0.0]), b, num_projections=1000, generator=g))
    assert shifted == pytest.approx(3 * 2 / math.pi, rel=0.05)


@pytest.mark.unit
def test_reference_sources_yield_latent_shaped_samples():
    g = torch.Generator().manual_seed(0)
    gauss, labels = StandardGaussian((4, 2, 2)).sample(3000, g)
    assert gauss.shape == (3000, 4, 2, 2) and labels is None
    assert abs(float(gauss.mean())) < 0.05 and float(gauss.std()) == pytest.approx(1.0, abs=0.05)

    means = ring_means(8, 2.0)
    assert torch.allclose(means.norm(dim=1), torch.full((8,), 2.0))
    gmm, _ = GaussianMixture(means, 0.1).sample(2000, g)
    nearest = torch.cdist(gmm, means).min(dim=1).values
    assert float(nearest.mean()) == pytest.approx(0.1 * math.sqrt(math.pi / 2), rel=0.1)  # Rayleigh mean
    assert torch.equal(random_means(3, (2, 4), seed=5), random_means(3, (2, 4), seed=5))

    data = torch.arange(10.0).view(5, 2)
    file_src = FileSamples(data, torch.tensor([0, 1, 2, 3, 4]))
    drawn, drawn_labels = file_src.sample(50, g)
    assert file_src.conditional
    assert torch.equal(drawn, data[drawn_labels])  # each sample keeps its own label

    def encode(x):
        return x[:, :2, ::2, ::2] * 3.0

    images = torch.randn(6, 3, 4, 4)
    y = torch.arange(6)
    z, zy = TokenizerLatents(encode, (2, 2, 2)).sample(6, g, images=images, labels=y)
    assert torch.equal(z, encode(images)) and torch.equal(zy, y)
    noisy, _ = NoisyTokenizerLatents(encode, (2, 2, 2), t=1.0).sample(6, g, images=images, labels=y)
    assert torch.equal(noisy, encode(images))  # t = 1 is clean
    pure, _ = NoisyTokenizerLatents(encode, (2, 2, 2), t=0.0).sample(6, torch.Generator().manual_seed(9),
                                                                     images=images)
    assert torch.equal(pure, torch.randn(6, 2, 2, 2, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError, match="pass a batch of images"):
        TokenizerLatents(encode, (2, 2, 2)).sample(6, g)


@pytest.mark.unit
def test_dm_loss_alone_moves_outputs_onto_a_ring_of_eight_gaussians():
    """Real score pretrained on the ring, fake score online, encoder trained only by the DM loss."""
    source = GaussianMixture(ring_means(8, 2.0), 0.1)
    result = run_toy(source, ToySettings(hidden=64, seed=0))
    assert result.sw_before > 1.0  # starts as a small blob at the origin, far from the ring
    assert result.sw_after <= result.sw_before / 5, (result.sw_before, result.sw_after)
    # Every one of the 8 modes receives outputs (no mode dropped).
    nearest = torch.cdist(result.after, ring_means(8, 2.0)).argmin(dim=1)
    assert torch.bincount(nearest, minlength=8).min() > 0.05 * len(result.after)


@pytest.mark.unit
def test_toy_command_writes_a_png_for_a_file_reference(tmp_path, capsys):
    g = np.random.default_rng(0)
    samples = g.normal(size=(2000, 2)).astype(np.float32) * 0.3 + np.array([1.5, -1.0], np.float32)
    np.save(tmp_path / "ref.npy", samples)
    out = tmp_path / "toy.png"
    rc = main(["toy", "--reference", "file", "--path", str(tmp_path / "ref.npy"), "--steps", "600",
               "--pretrain-steps", "400", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = (float(v) for v in line.split("sliced Wasserstein ")[1].split(" (")[0].split(" -> "))
    assert after < 0.5 * before


@pytest.mark.unit
def test_toy_command_errors_name_the_flag(tmp_path, capsys):
    assert main(["toy", "--reference", "file", "--out", str(tmp_path / "x.png")]) == 2
    assert "--path" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((10, 3), np.float32))
    assert main(["toy", "--reference", "file", "--path", str(tmp_path / "bad.npy")]) == 2
    assert "shape (N, 2)" in capsys.readouterr().err
