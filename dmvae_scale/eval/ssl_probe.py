"""Quality bar of a self-supervised `teacher` artifact: probes on its features must beat probes on raw pixels and on
the same architecture at random init, all fit on the same seeded random Fashion-MNIST training images and scored on
the whole test split (10,000 images) in one run.

Features, two ways for the teacher and the random-init network (pixels: the same images the teacher sees, one
channel, both ways):
- "pooled": the last-layer normalised patch tokens averaged over positions (D numbers);
- "patch": the patch tokens kept in their spatial order (the layout the tokenizer consumes), each position's D
  numbers, flattened. The token grid is average-pooled per position to at most PATCH_GRID x PATCH_GRID first, so the
  dimension stays PATCH_GRID**2 * D (3,072 for vit_tiny) and the L-BFGS probe on 10,000 images fits 2 CPU cores: a
  pool of neighbours keeps the order (which region holds which feature) that a random projection would mix.
Probes (eval/probe.py), both on each cell: a linear probe (multinomial logistic regression, L-BFGS, standardised
inputs) and a kNN probe (k=20, cosine, similarity-weighted vote, the training features as memory bank).
The report keeps the linear probe on pooled features as "results" / "ssl_minus_pixels_points" and adds
"table": {features: {probe: {"ssl", "random", "pixels", "ssl_minus_random_points"}}}.
Used by `tools/ssl_probe.py` and by the pipeline's `probe` step (the demo's report shows it).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..log import progress as show_progress
from ..errors import UserError

FASHION_MNIST_TRAIN = 60_000
FASHION_MNIST_TEST = 10_000
PATCH_GRID = 4  # the patch features' token grid is average-pooled to at most this many positions a side
KNN_K = 20


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


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, D): the mean over positions (order-free)."""
    return tokens.float().mean(dim=1)


def patch_tokens(tokens: torch.Tensor, grid: int = PATCH_GRID) -> torch.Tensor:
    """(B, g*g, D) row-major tokens -> (B, min(g, grid)**2 * D): average-pooled per position to at most grid x grid,
    flattened in spatial order (position-major, then feature)."""
    b, length, d = tokens.shape
    g = math.isqrt(length)
    if g * g != length:
        raise ValueError(f"patch features need a square token grid, got {length} tokens")
    x = tokens.float().transpose(1, 2).reshape(b, d, g, g)
    if g > grid:
        x = F.adaptive_avg_pool2d(x, grid)
    return x.flatten(2).transpose(1, 2).flatten(1)


@torch.no_grad()
def teacher_features(teacher, x: torch.Tensor, desc: str, batch: int = 500,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """{"pooled": (N, D), "patch": (N, P)} of `teacher` on images x, one encode per batch."""
    parts = show_progress(x.split(batch), desc=desc, unit="batch", leave=False, enabled=progress)
    out = {"pooled": [], "patch": []}
    for part in parts:
        tokens = teacher.encode(part)
        out["pooled"].append(pool_tokens(tokens))
        out["patch"].append(patch_tokens(tokens))
    return {name: torch.cat(v) for name, v in out.items()}


def probe_teacher(artifact: str, train_images: int = 10_000, weights: str = "ema", seed: int = 0,
                  progress: bool = True, test_images: int | None = None) -> dict:
    """Probe accuracies of raw pixels, a random network of the teacher's architecture and the teacher itself;
    scored on the whole test split, or on its first `test_images` (a quicker check)."""
    from ..data.artifact_store import open_artifact
    from ..distributed.teachers import TeacherSpec, build_teacher
    from .probe import knn_probe_accuracy, linear_probe_accuracy

    if not 10 <= train_images <= FASHION_MNIST_TRAIN:
        raise UserError(f"probe: train_images must be in 10..{FASHION_MNIST_TRAIN}, got {train_images}")
    if test_images is not None and not 10 <= test_images <= FASHION_MNIST_TEST:
        raise UserError(f"probe: test_images must be in 10..{FASHION_MNIST_TEST} (or unset: the whole test split), "
                        f"got {test_images}")
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
    pixels = (train_x[:, 0].flatten(1), test_x[:, 0].flatten(1))
    feats = {"pixels": {"pooled": pixels, "patch": pixels}}
    for key, name, teacher in (("random", "random ViT (same arch)", rand), ("ssl", "SSL teacher", ssl)):
        tr = teacher_features(teacher, train_x, f"{name} train", progress=progress)
        te = teacher_features(teacher, test_x, f"{name} test", progress=progress)
        feats[key] = {way: (tr[way], te[way]) for way in ("pooled", "patch")}
    probes = {"linear": linear_probe_accuracy,
              "knn": lambda a, ay, b, by: knn_probe_accuracy(a, ay, b, by, k=KNN_K)}
    table = {}
    for way in ("pooled", "patch"):
        table[way] = {}
        for probe, fit in probes.items():
            cell = {}
            for key in ("ssl", "random", "pixels"):
                if key == "pixels" and way == "patch":
                    cell[key] = table["pooled"][probe]["pixels"]  # the same pixels: fit once
                else:
                    cell[key] = fit(feats[key][way][0], train_y, feats[key][way][1], test_y)
            cell["ssl_minus_random_points"] = 100 * (cell["ssl"] - cell["random"])
            table[way][probe] = cell
    names = {"raw pixels": "pixels", "random ViT (same arch)": "random", "SSL teacher": "ssl"}
    results = {name: {"dim": int(feats[key]["pooled"][0].shape[1]), "accuracy": table["pooled"]["linear"][key]}
               for name, key in names.items()}
    dims = {way: {key: int(feats[key][way][0].shape[1]) for key in ("ssl", "random", "pixels")}
            for way in ("pooled", "patch")}
    gain = 100 * (results["SSL teacher"]["accuracy"] - results["raw pixels"]["accuracy"])
    return {"artifact": str(artifact), "weights": weights, "train_images": int(len(train_y)),
            "test_images": int(len(test_y)), "results": results, "ssl_minus_pixels_points": gain,
            "table": table, "dims": dims, "knn_k": KNN_K, "seconds": time.perf_counter() - start}


def probe_table_rows(report: dict) -> list[list[str]]:
    """Rows (features, probe, SSL teacher, random init, pixels, SSL - random) of a report's table, accuracies in %."""
    label = {"linear": "linear", "knn": f"kNN k={report.get('knn_k', KNN_K)}"}
    return [[way, label[probe], *(f"{100 * cell[key]:.2f}%" for key in ("ssl", "random", "pixels")),
             f"{cell['ssl_minus_random_points']:+.2f}"]
            for way, by_probe in report["table"].items() for probe, cell in by_probe.items()]


PROBE_TABLE_HEADER = ["features", "probe", "SSL teacher", "random init", "pixels", "SSL - random (points)"]


def format_probe(report: dict) -> str:
    lines = [f"linear probe, Fashion-MNIST: fit on {report['train_images']} training images, scored on "
             f"{report['test_images']} test images", f"{'representation':<24}{'dim':>6}{'accuracy':>10}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<24}{r['dim']:>6}{100 * r['accuracy']:>9.2f}%")
    if "table" in report:
        widths = [9, 10, 13, 13, 9, 22]
        lines.append("".join(f"{h:<{w}}" for h, w in zip(PROBE_TABLE_HEADER, widths)).rstrip())
        lines += ["".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in probe_table_rows(report)]
    lines.append(f"SSL teacher vs raw pixels: {report['ssl_minus_pixels_points']:+.2f} points (goal > 0), "
                 f"{report['seconds']:.0f} s")
    return "\n".join(lines)
