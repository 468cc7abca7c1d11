"""Metric math and input checks, on arrays whose right answers are known in closed form (no feature network)."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dmvae_scale.errors import UserError
from dmvae_scale.eval.images import ImageFormatError, as_uint8_nchw, to_uint8_nhwc
from dmvae_scale.eval.inception import INCEPTION_NAME
from dmvae_scale.eval.metrics import (FIDError, TooFewSamplesError, fid, inception_score, kid, precision_recall, psnr,
                                      ssim)
from dmvae_scale.eval.stats import FeatureStats, StatsError, load_stats

pytestmark = pytest.mark.unit


def _stats(feats, network=INCEPTION_NAME, fingerprint="abc"):
    return FeatureStats.from_features(feats, network, fingerprint)


# ---------------------------------------------------------------------------------------------------------- images

def test_uint8_layouts_and_grayscale_become_nchw_rgb():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    out = as_uint8_nchw(nhwc)
    assert out.shape == (2, 3, 5, 7) and torch.equal(out.permute(0, 2, 3, 1), torch.from_numpy(nhwc))
    gray = rng.integers(0, 256, (2, 5, 7), dtype=np.uint8)
    g = as_uint8_nchw(gray)
    assert g.shape == (2, 3, 5, 7) and torch.equal(g[:, 1], torch.from_numpy(gray))
    assert np.array_equal(to_uint8_nhwc(out), nhwc)


def test_float_images_quantise_like_png_when_range_declared():
    u = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    x = u.float() / 127.5 - 1.0  # the model range
    assert torch.equal(as_uint8_nchw(x, value_range=(-1, 1)), u)
    assert torch.equal(as_uint8_nchw(u.float() / 255, value_range=(0, 1)), u)


def test_float_without_declared_range_is_refused():
    with pytest.raises(ImageFormatError, match=r"need a declared value range.*value_range=\(-1, 1\)"):
        as_uint8_nchw(torch.zeros(2, 3, 8, 8))


def test_float_outside_declared_range_is_refused():
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    with pytest.raises(ImageFormatError, match=r"values span \[-1, 1\], outside the declared value_range \(0, 1\)"):
        as_uint8_nchw(x, value_range=(0, 1))


def test_wrong_dtype_and_unit_range_uint8_are_refused():
    with pytest.raises(ImageFormatError, match="dtype int64 is not accepted"):
        as_uint8_nchw(np.zeros((2, 8, 8, 3), dtype=np.int64))
    with pytest.raises(ImageFormatError, match=r"maximum is 1: this looks like \[0, 1\] data cast to uint8"):
        as_uint8_nchw(np.ones((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ImageFormatError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        as_uint8_nchw(np.zeros((2, 4, 8, 8), dtype=np.uint8), layout="NCHW")


# ------------------------------------------------------------------------------------------------------------- FID

def test_fid_of_shifted_gaussians_equals_squared_shift():
    # Two isotropic Gaussians differing by a mean shift m: FID = |m|^2 exactly (covariance terms cancel).
    rng = np.random.default_rng(1)
    d, n = 8, 40_000
    shift = np.array([1.0, -0.5, 0, 0, 2.0, 0, 0, 0])
    a = _stats(rng.standard_normal((n, d)))
    b = _stats(rng.standard_normal((n, d)) + shift)
    assert fid(a, b) == pytest.approx(float(shift @ shift), abs=0.05)
    # Scaled covariance: N(0, I) vs N(0, 4I): FID = d * (1 + 4 - 2*2) = d.
    c = _stats(2.0 * rng.standard_normal((n, d)))
    assert fid(a, c) == pytest.approx(d, abs=0.1)


def test_fid_refuses_too_few_samples_and_names_the_minimum():
    rng = np.random.default_rng(2)
    few = _stats(rng.standard_normal((100, 2048)).astype(np.float32))
    with pytest.raises(TooFewSamplesError, match=r"100 images for 2048-d .* use at least 2049"):
        fid(few, few)
    assert fid(few, few, allow_low_rank=True) == pytest.approx(0.0, abs=1e-2)  # rough: rank-deficient


def test_fid_from_features_equals_the_library_formula_when_rank_deficient():
    # 40 and 30 samples in 64-d: rank-deficient covariances; the feature (Gram) route must equal torch-fidelity's
    # eigenvalue route on the statistics alone.
    rng = np.random.default_rng(7)
    a = _stats(rng.standard_normal((40, 64)))
    b = _stats(rng.standard_normal((30, 64)) * 1.5 + 0.3)
    from_features = fid(a, b, allow_low_rank=True)
    a.features = b.features = None  # statistics only: the library's route
    assert from_features == pytest.approx(fid(a, b, allow_low_rank=True), rel=1e-6)


def test_fid_equals_torch_fidelitys_number_on_sound_statistics():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    rng = np.random.default_rng(11)
    a = _stats(rng.standard_normal((300, 32)) ** 2)
    b = _stats(rng.standard_normal((200, 32)) * 1.3 + 0.2)
    a.features = b.features = None  # the statistics route, whose square root is now checked
    library = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    assert fid(a, b) == pytest.approx(library[KEY_METRIC_FID], rel=1e-12)


def test_fid_refuses_a_complex_matrix_square_root_naming_the_sample_counts():
    # A "covariance" with a negative eigenvalue (what an ill-conditioned, too-small sample can give in floating
    # point): sqrt of eigenvalues (1, 1, 1, -1) is (1, 1, 1, i), an imaginary part of 1 against a real trace of 3.
    # torch-fidelity drops the imaginary part silently and reports a number.
    d = 4
    bad = FeatureStats(np.zeros(d), np.diag([1.0, 1.0, 1.0, -1.0]), 5, INCEPTION_NAME, "abc")
    ref = FeatureStats(np.zeros(d), np.eye(d), 7, INCEPTION_NAME, "abc")
    with pytest.raises(FIDError) as err:
        fid(bad, ref)
    assert str(err.value) == (
        "FID: the matrix square root of the covariances' product is complex (imaginary part 1 against a real trace "
        "of 3; N = 5 samples and 7 reference images of 4-d tf-inception-2015-12-05 features): most likely too few "
        "samples for the feature dimension (or statistics that are no covariance); use more images (50,000 for "
        "gFID) rather than report this number")
    # Rank-deficient but sound statistics (fewer samples than dimensions) leave only rounding in the imaginary
    # part: a (rough) number, not a refusal.
    rng = np.random.default_rng(5)
    a, b = _stats(rng.standard_normal((40, 64))), _stats(rng.standard_normal((50, 64)))
    a.features = b.features = None
    assert np.isfinite(fid(a, b, allow_low_rank=True))


def test_fid_refuses_nan_statistics():
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((20, 8))
    feats[3, 2] = np.nan
    with pytest.raises(FIDError, match=r"^FID: the sample statistics hold NaN or inf \(N = 20 samples and 30 "
                                       r"reference images of 8-d .* features\)"):
        fid(_stats(feats), _stats(rng.standard_normal((30, 8))))


# ------------------------------------------------------------------------------------------------------------- KID

def _mmd2_by_pairs(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_mean_of_unbiased_mmd_over_disjoint_blocks_with_its_standard_error():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((24, 5)), rng.standard_normal((30, 5)) + 0.4
    mean, se = kid(x, y, subsets=3, seed=7)
    perm = np.random.default_rng(7)
    px, py = x[perm.permutation(24)], y[perm.permutation(30)]
    blocks = [_mmd2_by_pairs(px[i * 8:(i + 1) * 8], py[i * 10:(i + 1) * 10]) for i in range(3)]
    assert mean == pytest.approx(np.mean(blocks), rel=1e-10)
    assert se == pytest.approx(np.std(blocks, ddof=1) / np.sqrt(3), rel=1e-10)
    # one block of everything is torch-fidelity's estimator (its subsets drawn from all the images)
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
    lib = kid_features_to_metric(torch.tensor(x[:20]), torch.tensor(y[:20]), kid_subsets=1, kid_subset_size=20,
                                 verbose=False)[KEY_METRIC_KID_MEAN]
    assert _mmd2_by_pairs(x[:20], y[:20]) == pytest.approx(float(lib), rel=1e-10)


def test_kid_standard_error_matches_the_spread_of_independent_repeats():
    # The point of disjoint blocks: the standard error is one. Over 40 independent sample sets the KIDs spread about
    # as the standard errors say (within 35%), and a shift is detected where none gives ~0.
    rng = np.random.default_rng(1)
    d, n = 16, 400
    shifted = [kid(rng.standard_normal((n, d)) + 0.3, rng.standard_normal((n, d)), subsets=10, seed=s)
               for s in range(40)]
    means, ses = np.array([m for m, _ in shifted]), np.array([s for _, s in shifted])
    assert 0.65 < means.std(ddof=1) / np.sqrt(np.mean(ses ** 2)) < 1.35
    assert means.mean() > 5 * ses.mean()
    same, se = kid(rng.standard_normal((n, d)), rng.standard_normal((n, d)), subsets=10)
    assert abs(same) < 3 * se


def test_kid_refuses_too_few_images_for_its_subsets():
    rng = np.random.default_rng(2)
    with pytest.raises(TooFewSamplesError, match=r"^KID: the sample set has 15 images for 10 disjoint subsets of "
                                                 r"at least 2; use at least 20 images or fewer subsets$"):
        kid(rng.standard_normal((15, 4)), rng.standard_normal((40, 4)))


def test_fid_refuses_statistics_of_another_network():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((50, 4))
    ours = _stats(feats)
    other = _stats(feats, network="dinov2-vit_l14-cls-224")
    with pytest.raises(StatsError, match="computed with feature network 'dinov2-vit_l14-cls-224'.*'tf-inception"):
        fid(ours, other)
    with pytest.raises(StatsError, match="another weights file"):
        fid(ours, _stats(feats, fingerprint="def"))


def test_stats_round_trip_and_adm_reference_format(tmp_path):
    rng = np.random.default_rng(4)
    s = _stats(rng.standard_normal((30, 6)).astype(np.float32))
    back = load_stats(s.save(tmp_path / "ref.npz"))
    assert np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    assert (back.network, back.fingerprint, back.num_images) == (s.network, s.fingerprint, 30)
    assert np.array_equal(back.features, s.features)
    # ADM's reference batch: mu/sigma (2048-d) + arr_0 images; read as TF-Inception statistics.
    mu, sigma = rng.standard_normal(2048), np.eye(2048)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=np.zeros((5, 16, 16, 3), np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(7), sigma_s=np.eye(7))
    adm = load_stats(tmp_path / "VIRTUAL_ref.npz")
    assert adm.network == INCEPTION_NAME and adm.fingerprint is None and adm.images.shape == (5, 16, 16, 3)
    assert np.array_equal(adm.mu, mu)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="no mu/sigma arrays"):
        load_stats(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------------------------------- IS and PR

def test_inception_score_extremes():
    n, c = 1000, 10
    assert inception_score(torch.zeros(n, c))[0] == pytest.approx(1.0)  # every p(y|x) uniform: KL 0
    confident = torch.full((n, c), -50.0)
    confident[torch.arange(n), torch.arange(n) % c] = 50.0  # certain and evenly spread over c classes: IS = c
    assert inception_score(confident)[0] == pytest.approx(c, rel=1e-6)
    with pytest.raises(TooFewSamplesError, match="at least 10"):
        inception_score(torch.zeros(5, c))


def test_precision_recall_identical_disjoint_and_half_covered():
    rng = np.random.default_rng(5)
    # 8 well-separated modes in 4-d; the k=3 ball estimate covers ~90 % of a same-distribution set.
    centers = rng.standard_normal((8, 4)) * 50
    ref = np.concatenate([c + rng.standard_normal((100, 4)) for c in centers])
    same = np.concatenate([c + rng.standard_normal((100, 4)) for c in centers])
    p, r = precision_recall(same, ref)
    assert p > 0.85 and r > 0.85
    p, r = precision_recall(ref + 1000.0, ref)
    assert p == 0.0 and r == 0.0
    half = np.concatenate([c + rng.standard_normal((200, 4)) for c in centers[:4]])  # covers 4 of 8 modes
    p, r = precision_recall(half, ref)
    assert p > 0.85 and 0.35 < r < 0.55
    with pytest.raises(TooFewSamplesError, match="at least 4"):
        precision_recall(ref[:3], ref)


# --------------------------------------------------------------------------------------------------- PSNR and SSIM

def test_psnr_from_known_error():
    a = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    b = a.clone()
    b[1] += 10  # MSE = (10/255)^2
    got = psnr(a, b)
    assert got[0] == pytest.approx(100.0)  # identical: MSE floored at 1e-10
    assert got[1].item() == pytest.approx(20 * np.log10(255 / 10), rel=1e-9)


def test_ssim_matches_an_independent_scipy_computation():
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, (1, 3, 40, 48), dtype=np.uint8)
    noise = rng.normal(0, 20, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)

    def reference(x, y):  # Wang et al. with scipy's Gaussian filter (11 taps), valid region only
        x, y = x / 255.0, y / 255.0
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()

    expected = np.mean([reference(a[0, c], b[0, c]) for c in range(3)])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert ssim(ta, tb).item() == pytest.approx(expected, abs=1e-9)
    assert ssim(ta, ta).item() == pytest.approx(1.0)
    worse = torch.from_numpy(np.clip(a + 3 * noise, 0, 255).astype(np.uint8))
    assert ssim(ta, worse).item() < ssim(ta, tb).item()
