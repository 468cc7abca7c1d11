"""The numbers: FID, Inception Score, precision/recall (torch-fidelity's math), KID (by hand: disjoint subsets, for a
standard error), PSNR and SSIM (by hand: no installed library has them for tensors).

Each function checks what would make its number meaningless and refuses with a message that says what to do.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dmvae_scale.errors import UserError

from .stats import FeatureStats, check_comparable


class TooFewSamplesError(UserError, ValueError):
    """Fewer samples than a metric needs to be meaningful."""


def min_samples_for_fid(dim: int) -> int:
    """A D-dimensional covariance has full rank only from D + 1 samples on."""
    return dim + 1


def check_sample_count(count: int, dim: int, network: str, allow_low_rank: bool, role: str = "sample set") -> None:
    """FID needs a full-rank covariance: refuse fewer than dim + 1 images unless allowed, naming the minimum."""
    need = min_samples_for_fid(dim)
    if count < need and not allow_low_rank:
        raise TooFewSamplesError(
            f"FID: the {role} has {count} images for {dim}-d {network} features, so its covariance is "
            f"rank-deficient and the FID is biased; use at least {need} images (50,000 is the standard for gFID), "
            f"or pass allow_low_rank=True (--allow-few-samples) for a rough, non-comparable number")


class FIDError(UserError, ValueError):
    """An FID that would be a wrong number (NaN statistics, a complex matrix square root): refused, never reported."""


def _check_rank(stats: FeatureStats, role: str, allow_low_rank: bool) -> None:
    check_sample_count(stats.num_images, stats.dim, stats.network, allow_low_rank, role)


def _counts(samples: FeatureStats, reference: FeatureStats) -> str:
    ref = reference.num_images or "an unknown number of"
    return f"N = {samples.num_images} samples and {ref} reference images of {samples.dim}-d {samples.network} features"


def _check_finite(samples: FeatureStats, reference: FeatureStats) -> None:
    for role, stats in (("sample", samples), ("reference", reference)):
        arrays = [stats.mu, stats.sigma] + ([stats.features] if stats.features is not None else [])
        if not all(np.isfinite(a).all() for a in arrays):
            raise FIDError(f"FID: the {role} statistics hold NaN or inf ({_counts(samples, reference)}): the "
                           f"images gave non-finite features (NaN images from a diverged generator?); no FID")


# sum |Im sqrt(eigenvalues)| above this share of sum Re: not rounding (rank-deficient but sound covariances give
# ~1e-8) but statistics whose product has clearly negative or complex eigenvalues
SQRT_IMAGINARY_TOLERANCE = 1e-3


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, counts: str) -> float:
    """tr sqrt(sigma1 sigma2) as the sum of the square roots of the product's eigenvalues (torch-fidelity's
    computation); a result with a significant imaginary part, or NaN, is refused naming the sample counts."""
    roots = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128))
    real, imaginary = float(roots.real.sum()), float(np.abs(roots.imag).sum())
    if not (np.isfinite(real) and np.isfinite(imaginary)):
        raise FIDError(f"FID: the matrix square root of the covariances' product is NaN ({counts}): the covariances "
                       f"are degenerate, most likely from too few samples for the feature dimension; use more images")
    if imaginary > SQRT_IMAGINARY_TOLERANCE * max(abs(real), 1.0):
        raise FIDError(f"FID: the matrix square root of the covariances' product is complex (imaginary part "
                       f"{imaginary:.4g} against a real trace of {real:.4g}; {counts}): most likely too few samples "
                       f"for the feature dimension (or statistics that are no covariance); use more images (50,000 "
                       f"for gFID) rather than report this number")
    return real


def fid(samples: FeatureStats, reference: FeatureStats, allow_low_rank: bool = False) -> float:
    """Frechet distance between two Gaussians fitted to the features (torch-fidelity's computation). NaN statistics
    or a matrix square root with a significant imaginary part raise FIDError instead of giving a number.

    When both sides carry all their features and one has at most D of them, the same number comes from the
    features directly (`_fid_from_features`): exact, and seconds instead of minutes of a D x D eigenproblem on CPU.
    """
    check_comparable(reference, samples.network, samples.fingerprint, samples.dim)
    _check_rank(samples, "sample set", allow_low_rank)
    if reference.num_images:  # ADM files without arr_0 do not say; they hold 50k-image statistics
        _check_rank(reference, "reference", allow_low_rank)
    _check_finite(samples, reference)
    f1, f2 = samples.complete_features, reference.complete_features
    if f1 is not None and f2 is not None and min(len(f1), len(f2)) <= samples.dim:
        value = _fid_from_features(f1, f2)
    else:
        mu1, mu2 = samples.mu.astype(np.float64), reference.mu.astype(np.float64)
        s1, s2 = samples.sigma.astype(np.float64), reference.sigma.astype(np.float64)
        diff = mu1 - mu2
        value = float(diff @ diff + np.trace(s1) + np.trace(s2)
                      - 2 * trace_sqrt_product(s1, s2, _counts(samples, reference)))
    if not np.isfinite(value):
        raise FIDError(f"FID: the result is {value} ({_counts(samples, reference)}); no FID")
    return value


def _fid_from_features(x1: np.ndarray, x2: np.ndarray) -> float:
    """FID from centred feature matrices A1 (n1 x D), A2 (n2 x D), with S_i = A_i^T A_i / (n_i - 1).

    tr sqrt(S1 S2): the non-zero eigenvalues of A1^T A1 A2^T A2 equal those of M M^T with M = A1 A2^T (n1 x n2), i.e.
    the squared singular values of M; so tr sqrt(S1 S2) = sum(singular values of M) / sqrt((n1 - 1)(n2 - 1)).
    """
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1, a2 = x1 - mu1, x2 - mu2
    n1, n2 = len(x1), len(x2)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (a1 ** 2).sum() / (n1 - 1) + (a2 ** 2).sum() / (n2 - 1) - 2 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between the sets x (m x D) and y (n x D) with k(a, b) = (a.b / D + 1)^3: the within-set means
    leave out the diagonal (i = j)."""
    d = x.shape[1]
    kxx, kyy, kxy = (((a @ b.T) / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kid(sample_features: np.ndarray, reference_features: np.ndarray, subsets: int = 10,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial kernel
    k(a, b) = (a.b / D + 1)^3, averaged over `subsets` blocks; returns (mean, standard error of the mean).

    Each set is shuffled (seeded) and cut into `subsets` disjoint blocks, block i of the samples against block i of
    the reference. Every block's estimate is unbiased, so the mean estimates the same MMD^2 as the usual 100
    overlapping subsets of 1,000 do; the blocks share no image, so their estimates are independent and std / sqrt(
    subsets) is a standard error of the mean (overlapping subsets give a spread, not an error bar)."""
    x = np.asarray(sample_features, dtype=np.float64)
    y = np.asarray(reference_features, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID: sample features {x.shape} vs reference {y.shape}")
    if subsets < 2:
        raise ValueError(f"KID: subsets must be >= 2 for a standard error, got {subsets}")
    for role, n in (("sample set", len(x)), ("reference", len(y))):
        if n < 2 * subsets:
            raise TooFewSamplesError(f"KID: the {role} has {n} images for {subsets} disjoint subsets of at least 2; "
                                     f"use at least {2 * subsets} images or fewer subsets")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise FIDError(f"KID: the features hold NaN or inf (N = {len(x)} samples, {len(y)} reference images); no KID")
    rng = np.random.default_rng(seed)
    xs = np.array_split(x[rng.permutation(len(x))], subsets)
    ys = np.array_split(y[rng.permutation(len(y))], subsets)
    values = np.array([_mmd2_unbiased(a, b) for a, b in zip(xs, ys)])
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(subsets))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` splits of exp(E KL(p(y|x) || p(y))), from unbiased Inception logits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    if logits.dim() != 2:
        raise ValueError(f"logits must be N x classes, got {tuple(logits.shape)}")
    if len(logits) < splits:
        raise TooFewSamplesError(f"Inception Score: {len(logits)} samples for {splits} splits; use at least {splits}")
    # Fixed order (no shuffle): a resumed or re-run evaluation of the same samples gives the same number.
    out = isc_features_to_metric(logits, splits=splits, shuffle=False)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def precision_recall(sample_features: np.ndarray, reference_features: np.ndarray, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each set's features."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    gen = torch.as_tensor(np.asarray(sample_features, dtype=np.float32))
    ref = torch.as_tensor(np.asarray(reference_features, dtype=np.float32))
    if gen.shape[1:] != ref.shape[1:]:
        raise ValueError(f"precision/recall: sample features {tuple(gen.shape)} vs reference {tuple(ref.shape)}")
    for role, n in (("sample set", len(gen)), ("reference", len(ref))):
        if n <= k:
            raise TooFewSamplesError(f"precision/recall: the {role} has {n} images; k={k} nearest neighbours need "
                                     f"at least {k + 1}")
    out = prc_features_to_metric(gen, ref, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True,
                                 verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction metrics (tokenizer): images as uint8 N x 3 x H x W, compared in [0, 1]
# ----------------------------------------------------------------------------------------------------------------------

def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"reconstruction metrics: originals {tuple(a.shape)} vs reconstructions {tuple(b.shape)}")
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError("reconstruction metrics take uint8 images (eval.images.as_uint8_nchw)")
    return a.double() / 255.0, b.double() / 255.0


def psnr(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB over 8-bit images; identical images count as 100 dB (MSE floored at 1e-10), so a mean
    over a set stays finite."""
    a, b = _pair(originals, reconstructions)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, data range 1,
    averaged over the valid (unpadded) window positions and the RGB channels."""
    a, b = _pair(originals, reconstructions)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {tuple(a.shape[-2:])}")
    g = _gaussian_window()
    c = a.shape[1]
    wx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(x):  # separable Gaussian filter, valid positions only
        return F.conv2d(F.conv2d(x, wx, groups=c), wy, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
