"""Evaluations end to end: reference statistics, generated samples (gFID/KID/IS/precision/recall/FD_DINOv2, with the
protocol they were measured under), and a tokenizer's reconstructions (rFID/PSNR/SSIM). Each writes metrics.json,
report.md and a grid PNG, and prints one summary line.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..log import progress, say
from dmvae_scale.errors import UserError

from .features import extract_features
from .images import as_uint8_nchw
from .metrics import check_sample_count, fid, inception_score, kid, precision_recall, psnr, ssim
from .report import save_grid, write_report
from .sources import ImageSet
from .stats import FeatureStats, check_comparable


@dataclass
class EvalOptions:
    batch_size: int = 32  # images per feature-network forward
    allow_few_samples: bool = False  # FID below feature-dim + 1 images: a rough number instead of a refusal
    is_splits: int = 10
    pr_k: int = 3
    pr_max: int = 10_000  # features per side for precision/recall and KID (ADM: the 10k-image reference batch)
    kid_subsets: int = 10  # disjoint blocks per side for KID's mean and standard error (metrics.kid)
    progress: bool = True


def check_count(total: int, dim: int, network_name: str, opts: EvalOptions, role: str = "sample set") -> None:
    """The rank check of metrics.fid, made before any feature is computed."""
    check_sample_count(total, dim, network_name, opts.allow_few_samples, role)


def compute_reference(images: ImageSet, network, out_path: str | Path, opts: EvalOptions) -> FeatureStats:
    """Statistics (and up to pr_max features, for precision/recall) of a real image set, saved to out_path."""
    feats = extract_features(network, images.batches(opts.batch_size), images.total, desc="reference",
                             progress=opts.progress)["pool"]
    stats = FeatureStats.from_features(feats, network.name, network.fingerprint, keep_features=opts.pr_max,
                                       source=images.description)
    stats.save(out_path)
    say("eval", f"reference: {stats.num_images} images of {images.description} -> {out_path} "
                f"({network.name}, {stats.dim}-d, fingerprint {str(network.fingerprint)[:12]})")
    return stats


def _reference_features(reference: FeatureStats, network, opts: EvalOptions) -> Optional[np.ndarray]:
    """Features of the reference for precision/recall: stored ones, or computed from an ADM file's arr_0 images."""
    if reference.features is not None:
        return reference.features[:opts.pr_max]
    if reference.images is not None:
        images = reference.images[:opts.pr_max]
        batches = (images[i:i + opts.batch_size] for i in range(0, len(images), opts.batch_size))
        return extract_features(network, batches, len(images), desc="reference images (ADM arr_0)",
                                progress=opts.progress)["pool"]
    return None


def fid_protocol(samples: ImageSet, reference: FeatureStats, network, num_samples: int,
                 kid_reference_images: Optional[int], opts: EvalOptions) -> dict:
    """What an FID (and the KID beside it) was measured under, carried in the JSON beside the number: how the samples
    were drawn (the sample set's sampling.json; None where unknown, e.g. a folder of images), how many, which
    reference statistics (their file's sha256) and which feature network."""
    drawn = samples.settings
    return {"num_samples": num_samples, "sampler": drawn.get("method"), "steps": drawn.get("steps"),
            "cfg_scale": drawn.get("cfg_scale"), "guidance_interval": drawn.get("guidance_interval"),
            "time_shift": drawn.get("time_shift"), "label_sampling": drawn.get("label_sampling"),
            "dtype": drawn.get("precision"), "sampling_seed": drawn.get("seed"), "generator": drawn.get("generator"),
            "generator_weights": drawn.get("weights"), "reference": reference.source or None,
            "reference_images": reference.num_images or None, "reference_sha256": reference.file_sha256,
            "feature_network": network.name, "network_fingerprint": network.fingerprint,
            "kid_reference_images": kid_reference_images, "kid_subsets": opts.kid_subsets}


def evaluate_samples(samples: ImageSet, reference: FeatureStats, network, out_dir: str | Path,
                     opts: EvalOptions, dinov2=None, dinov2_reference: Optional[FeatureStats] = None) -> dict:
    """gFID, IS (when the network has a classifier), precision/recall (when reference features exist), FD_DINOv2."""
    if (dinov2 is None) != (dinov2_reference is None):
        raise UserError("FD_DINOv2 needs both the DINOv2 weights (--dinov2) and reference statistics computed with "
                        "them (--dinov2-ref, from `dmvae-scale eval ref --dinov2`)")
    # Refuse a mismatched reference or too small a set before spending minutes on features.
    check_comparable(reference, network.name, network.fingerprint, network.dim)
    check_count(samples.total, network.dim, network.name, opts)
    if dinov2 is not None:
        check_comparable(dinov2_reference, dinov2.name, dinov2.fingerprint, dinov2.dim, "DINOv2 reference statistics")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    feats = extract_features(network, samples.batches(opts.batch_size), samples.total, desc="samples",
                             progress=opts.progress)
    stats = FeatureStats.from_features(feats["pool"], network.name, network.fingerprint, keep_features=0)
    metrics: dict = {"num_samples": stats.num_images, "fid": fid(stats, reference, opts.allow_few_samples)}
    notes = []
    if opts.allow_few_samples and stats.num_images < stats.dim + 1:
        notes.append(f"FID from {stats.num_images} samples (< {stats.dim + 1}): rank-deficient, not comparable to "
                     f"published 50k-sample numbers")
    if "logits" in feats:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(feats["logits"], opts.is_splits)
    else:
        notes.append("Inception Score not computed: the bundled Inception network has no classifier layer; pass the "
                     "standard pt_inception-2015-12-05-6726825d.pth (--inception) for IS")
    ref_feats = _reference_features(reference, network, opts)
    if ref_feats is not None:
        metrics["precision"], metrics["recall"] = precision_recall(feats["pool"][:opts.pr_max], ref_feats, opts.pr_k)
        if min(len(feats["pool"]), len(ref_feats)) >= 2 * opts.kid_subsets:
            metrics["kid"], metrics["kid_se"] = kid(feats["pool"], ref_feats, opts.kid_subsets)
        else:
            notes.append(f"KID not computed: {len(feats['pool'])} samples and {len(ref_feats)} reference features "
                         f"for {opts.kid_subsets} disjoint subsets of at least 2 each")
    else:
        notes.append(f"precision/recall and KID not computed: {reference.source} holds no reference features or "
                     f"images")
    if dinov2 is not None:
        dfeats = extract_features(dinov2, samples.batches(opts.batch_size), samples.total, desc="samples (DINOv2)",
                                  progress=opts.progress)["pool"]
        dstats = FeatureStats.from_features(dfeats, dinov2.name, dinov2.fingerprint, keep_features=0)
        metrics["fd_dinov2"] = fid(dstats, dinov2_reference, opts.allow_few_samples)
    metrics["protocol"] = fid_protocol(samples, reference, network, stats.num_images,
                                       None if ref_feats is None else len(ref_feats), opts)
    settings = {"samples": samples.description, "reference": reference.source or "-",
                "reference_images": reference.num_images, "feature_network": network.name,
                "network_weights": getattr(network, "source", "-"), "fingerprint": str(network.fingerprint)[:16],
                **{f"sampling.{k}": v for k, v in samples.settings.items()}, **asdict(opts)}
    grid = save_grid(next(iter(samples.batches(64))), out_dir / "grid.png")
    write_report(out_dir, "Generated samples", metrics, settings, notes, grid)
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                      if not isinstance(v, dict))
    say("eval", f"{shown} ({time.perf_counter() - started:.0f} s) -> {out_dir / 'report.md'}")
    return metrics


Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # uint8 N x 3 x H x W -> uint8 N x 3 x H x W


def evaluate_reconstructions(images: ImageSet, reconstruct: Reconstruct, network, out_dir: str | Path,
                             opts: EvalOptions, title: str = "Tokenizer reconstructions",
                             settings: Optional[dict] = None, reference: Optional[FeatureStats] = None) -> dict:
    """rFID (reconstructions vs the originals), mean PSNR and SSIM over a validation set. `reference`: the originals'
    statistics computed before (a pipeline's real_stats step, shared by every tokenizer scored on the same images):
    their features are then not computed again, and the rFID is the same number."""
    check_count(images.total, network.dim, network.name, opts, "validation set")
    if reference is not None:
        check_comparable(reference, network.name, network.fingerprint, network.dim)
        if reference.num_images != images.total:
            raise UserError(f"reference statistics {reference.source or ''} hold {reference.num_images} images, the "
                            f"validation set ({images.description}) has {images.total}: not the same images")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    orig_feats, recon_feats, psnrs, ssims, first = [], [], [], [], None
    bar = progress(total=images.total, desc="reconstruct", unit="img", enabled=opts.progress, leave=False)
    for batch in images.batches(opts.batch_size):
        x = as_uint8_nchw(batch)
        y = as_uint8_nchw(reconstruct(x), what="reconstructions")
        if y.shape != x.shape:
            raise UserError(f"reconstructions have shape {tuple(y.shape)}, originals {tuple(x.shape)}")
        psnrs.append(psnr(x, y))
        if min(x.shape[-2:]) >= 11:
            ssims.append(ssim(x, y))
        device = next(network.parameters()).device
        if reference is None:
            orig_feats.append(network(x.to(device))["pool"].cpu().numpy())
        recon_feats.append(network(y.to(device))["pool"].cpu().numpy())
        if first is None:
            first = torch.cat([x[:32], y[:32]])  # originals row block, then their reconstructions
        bar.update(len(x))
    bar.close()
    ref = reference if reference is not None else FeatureStats.from_features(
        np.concatenate(orig_feats), network.name, network.fingerprint, 0)
    rec = FeatureStats.from_features(np.concatenate(recon_feats), network.name, network.fingerprint, 0)
    metrics = {"num_images": rec.num_images, "rfid": fid(rec, ref, opts.allow_few_samples),
               "psnr": float(torch.cat(psnrs).mean())}
    if ssims:
        metrics["ssim"] = float(torch.cat(ssims).mean())
    grid = save_grid(first, out_dir / "grid.png", max_images=len(first), nrow=len(first) // 2)
    if reference is not None:
        settings = {**(settings or {}), "originals_statistics": f"{reference.source} (sha256 {reference.file_sha256})"}
    write_report(out_dir, title, metrics, {"images": images.description, "feature_network": network.name,
                                          **(settings or {}), **asdict(opts)},
                 ["grid: top half originals, bottom half their reconstructions"], grid)
    say("eval", f"tokenizer: rFID {metrics['rfid']:.3f}, PSNR {metrics['psnr']:.2f} dB"
          + (f", SSIM {metrics['ssim']:.4f}" if "ssim" in metrics else "")
          + f" over {rec.num_images} images ({time.perf_counter() - started:.0f} s) -> {out_dir / 'report.md'}")
    return metrics
