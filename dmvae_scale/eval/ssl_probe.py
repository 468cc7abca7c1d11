"""Quality bar of a self-supervised `teacher` artifact: a linear probe on its pooled features must beat one on raw
pixels, both fit on the same seeded random Fashion-MNIST training images and scored on the whole test split (10,000
images) in one run. A randomly initialised network of the same architecture is probed too, for scale.

Features: the teacher's last-layer normalised patch tokens averaged over positions; pixels: the same images the
teacher sees, one channel. Probe: eval/probe.py (multinomial logistic regression, L-BFGS, standardised inputs).
Used by `tools/ssl_probe.py` and by the pipeline's `probe` step (the demo's report shows it).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..log import progress as show_progress
from ..errors import UserError

FASHION_MNIST_TRAIN = 60_000


def fashion_mnist_at(split: str, size: int, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) in [-1, 1] (bicubic, antialiased, as the training data) and labels."""
    from ..data.builtin import load_fashion_mnist
    images, labels = load_fashion_mnist(split)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]
    if size != x.shape[-1]:
        x = torch.cat([F.interpolate(part, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
                       for part in x.split(2000)]).clamp_(-1.0, 1.0)
    return x.expand(-1, 3, -1, -1), torch.from_numpy(labels)


@torch.no_grad()
def pooled_features(teacher, x: torch.Tensor, desc: str, batch: int = 500, progress: bool = True) -> torch.Tensor:
    parts = show_progress(x.split(batch), desc=desc, unit="batch", leave=False, enabled=progress)
    return torch.cat([teacher.encode(part).float().mean(dim=1) for part in parts])


def probe_teacher(artifact: str, train_images: int = 10_000, weights: str = "ema", seed: int = 0,
                  progress: bool = True, test_images: int | None = None) -> dict:
    """Probe accuracies of raw pixels, a random network of the teacher's architecture and the teacher itself;
    scored on the whole test split, or on its first `test_images` (a quicker check)."""
    from ..data.artifact_store import open_artifact
    from ..distributed.teachers import TeacherSpec, build_teacher
    from .probe import linear_probe_accuracy

    if not 10 <= train_images <= FASHION_MNIST_TRAIN:
        raise UserError(f"probe: train_images must be in 10..{FASHION_MNIST_TRAIN}, got {train_images}")
    cfg = open_artifact(artifact).config()
    if cfg.stage != "teacher":
        raise UserError(f"probe: {artifact} is a {cfg.stage} artifact; name a `teacher` stage artifact")
    enc, size = cfg.tokenizer.encoder, cfg.tokenizer.image_size
    geometry = dict(image_size=size, grid=size // enc.patch_size, arch=enc.arch, patch_size=enc.patch_size, chunk=250)
    ssl = build_teacher(TeacherSpec(name="ssl", weights=str(artifact), artifact_weights=weights, **geometry))
    rand = build_teacher(TeacherSpec(name="random_vit", seed=seed, **geometry))

    start = time.perf_counter()
    pick = np.random.default_rng(seed).permutation(FASHION_MNIST_TRAIN)[:train_images]
    train_x, train_y = fashion_mnist_at("train", size, np.sort(pick))
    test_x, test_y = fashion_mnist_at("test", size, None if test_images is None else np.arange(test_images))
    rows = {"raw pixels": (train_x[:, 0].flatten(1), test_x[:, 0].flatten(1))}
    for name, teacher in (("random ViT (same arch)", rand), ("SSL teacher", ssl)):
        rows[name] = (pooled_features(teacher, train_x, f"{name} train", progress=progress),
                      pooled_features(teacher, test_x, f"{name} test", progress=progress))
    results = {name: {"dim": int(tr.shape[1]), "accuracy": linear_probe_accuracy(tr, train_y, te, test_y)}
               for name, (tr, te) in rows.items()}
    gain = 100 * (results["SSL teacher"]["accuracy"] - results["raw pixels"]["accuracy"])
    return {"artifact": str(artifact), "weights": weights, "train_images": int(len(train_y)),
            "test_images": int(len(test_y)), "results": results, "ssl_minus_pixels_points": gain,
            "seconds": time.perf_counter() - start}


def format_probe(report: dict) -> str:
    lines = [f"linear probe, Fashion-MNIST: fit on {report['train_images']} training images, scored on "
             f"{report['test_images']} test images", f"{'representation':<24}{'dim':>6}{'accuracy':>10}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<24}{r['dim']:>6}{100 * r['accuracy']:>9.2f}%")
    lines.append(f"SSL teacher vs raw pixels: {report['ssl_minus_pixels_points']:+.2f} points (goal > 0), "
                 f"{report['seconds']:.0f} s")
    return "\n".join(lines)
