"""The numbers: FID, Inception Score, precision/recall (torch-fidelity's math), PSNR and SSIM (by hand: no installed
library has them for tensors).

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


def _check_rank(stats: FeatureStats, role: str, allow_low_rank: bool) -> None:
    check_sample_count(stats.num_images, stats.dim, stats.network, allow_low_rank, role)


def fid(samples: FeatureStats, reference: FeatureStats, allow_low_rank: bool = False) -> float:
    """Frechet distance between two Gaussians fitted to the features (torch-fidelity's computation).

    When both sides carry all their features and one has at most D of them, the same number comes from the
    features directly (`_fid_from_features`): exact, and seconds instead of minutes of a D x D eigenproblem on CPU.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    check_comparable(reference, samples.network, samples.fingerprint, samples.dim)
    _check_rank(samples, "sample set", allow_low_rank)
    if reference.num_images:  # ADM files without arr_0 do not say; they hold 50k-image statistics
        _check_rank(reference, "reference", allow_low_rank)
    f1, f2 = samples.complete_features, reference.complete_features
    if f1 is not None and f2 is not None and min(len(f1), len(f2)) <= samples.dim:
        return _fid_from_features(f1, f2)
    a = {"mu": samples.mu.astype(np.float64), "sigma": samples.sigma.astype(np.float64)}
    b = {"mu": reference.mu.astype(np.float64), "sigma": reference.sigma.astype(np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


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
