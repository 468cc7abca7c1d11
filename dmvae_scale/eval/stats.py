"""Feature statistics (mean, covariance, optionally the features themselves) tied to the network that made them.

Saved as `.npz` with keys mu, sigma, num_images, network, fingerprint and, when kept, features (for precision/recall).
ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`: mu, sigma, arr_0 images, mu_s/sigma_s) are read too; their
statistics are by definition TF-Inception pool3 ones, so they are tagged with that network and no fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dmvae_scale.artifacts import sha256_of_file
from dmvae_scale.errors import UserError

from .inception import INCEPTION_NAME, POOL_DIM

ADM_FORMAT = "adm"


class StatsError(UserError):
    """Statistics that are unreadable, or that cannot be compared with the ones at hand."""


@dataclass
class FeatureStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int
    network: str  # feature network name, e.g. "tf-inception-2015-12-05"
    fingerprint: Optional[str]  # hash of its weights; None when unknown (ADM reference files)
    features: Optional[np.ndarray] = None  # (M, D) float32, kept for precision/recall
    images: Optional[np.ndarray] = None  # ADM's arr_0 reference images (uint8 NHWC), when read from such a file
    source: str = ""
    file_sha256: Optional[str] = None  # of the .npz file it was read from: which reference an FID used

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def complete_features(self) -> Optional[np.ndarray]:
        """The features behind mu/sigma when all of them were kept, else None."""
        if self.features is not None and len(self.features) == self.num_images:
            return self.features
        return None

    @classmethod
    def from_features(cls, features: np.ndarray, network: str, fingerprint: Optional[str],
                      keep_features: Optional[int] = None, source: str = "") -> "FeatureStats":
        """Mean and covariance via torch-fidelity (float64); keep the first `keep_features` rows (all if None).

        Sets of at most D images always keep all rows: FID then comes from the features (exact, fast; metrics.fid).
        """
        import torch
        from torch_fidelity.metric_fid import fid_features_to_statistics

        feats = np.asarray(features)
        if feats.ndim != 2 or len(feats) < 2:
            raise StatsError(f"statistics need at least 2 feature vectors of shape (N, D), got {feats.shape}")
        stats = fid_features_to_statistics(torch.from_numpy(feats.astype(np.float64)))
        if keep_features is not None and len(feats) <= feats.shape[1]:
            keep_features = max(keep_features, len(feats))
        kept = feats if keep_features is None else feats[:keep_features]
        return cls(stats["mu"], stats["sigma"], len(feats), network, fingerprint,
                   kept.astype(np.float32) if len(kept) else None, source=source)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.features is None else {"features": self.features}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                 network=np.str_(self.network), fingerprint=np.str_(self.fingerprint or ""), **extra)
        tmp.replace(path)  # never leave a half-written statistics file under the final name
        return path


def load_stats(path: str | Path) -> FeatureStats:
    """Our statistics file, or an ADM reference batch (mu/sigma computed by TF-Inception pool3)."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"reference statistics not found: {path} (compute them with `dmvae-scale eval ref`, or give "
                         f"ADM's VIRTUAL_imagenet256_labeled.npz)")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise StatsError(f"{path}: not a readable .npz file ({exc})") from None
    digest = sha256_of_file(path)
    if not {"mu", "sigma"} <= keys:
        raise StatsError(f"{path}: no mu/sigma arrays (keys: {sorted(keys)}); expected statistics from "
                         f"`dmvae-scale eval ref` or an ADM reference batch")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if "network" in keys:
        fingerprint = str(data["fingerprint"]) or None
        features = data["features"] if "features" in keys else None
        return FeatureStats(mu, sigma, int(data["num_images"]), str(data["network"]), fingerprint, features,
                            source=str(path), file_sha256=digest)
    # ADM reference batch: statistics of TF-Inception pool3 over the reference images (arr_0 when present).
    if mu.shape[0] != POOL_DIM:
        raise StatsError(f"{path}: ADM-style statistics must be {POOL_DIM}-d Inception pool3 ones, got {mu.shape[0]}-d")
    images = data["arr_0"] if "arr_0" in keys else None
    num = len(images) if images is not None else 0
    return FeatureStats(mu, sigma, num, INCEPTION_NAME, None, None, images=images, source=f"{ADM_FORMAT}:{path}",
                        file_sha256=digest)



def check_comparable(reference: FeatureStats, network: str, fingerprint: Optional[str], dim: int,
                     what: str = "reference statistics") -> None:
    """Refuse statistics of another feature network (by name, weights fingerprint or dimension)."""
    where = f" ({reference.source})" if reference.source else ""
    if reference.network != network:
        raise StatsError(f"{what}{where} were computed with feature network '{reference.network}', but these "
                         f"features come from '{network}'; recompute the reference with `dmvae-scale eval ref` and "
                         f"the same network")
    if reference.fingerprint and fingerprint and reference.fingerprint != fingerprint:
        raise StatsError(f"{what}{where} come from '{network}' weights with fingerprint {reference.fingerprint[:12]}, "
                         f"these features from weights {fingerprint[:12]}: another weights file; use the same one "
                         f"for both, or recompute the reference")
    if reference.dim != dim:
        raise StatsError(f"{what}{where} are {reference.dim}-d, these features {dim}-d")
