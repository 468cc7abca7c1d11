"""Quality bar of the self-supervised teacher: a linear probe on its pooled features must beat one on raw pixels.

    python tools/ssl_probe.py runs/demo/teacher/artifact [--train-images 10000] [--weights ema] [--out probe.json]

Both probes (and one on a randomly initialised network of the same architecture, for scale) are fit on the same
seeded random Fashion-MNIST training images and scored on the whole test split (10,000 images), in this one run.
Features: the teacher's last-layer normalised patch tokens averaged over positions; pixels: the same 32 px images the
teacher sees, one channel. Probe: eval/probe.py (multinomial logistic regression, L-BFGS, standardised inputs).
Prints a table whose last line is the headline (SSL minus pixels, in accuracy points), and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def fashion_mnist_at(split: str, size: int, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) in [-1, 1] (bicubic, antialiased, as the training data) and labels."""
    from dmvae_scale.data.builtin import load_fashion_mnist
    images, labels = load_fashion_mnist(split)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]
    if size != x.shape[-1]:
        x = torch.cat([F.interpolate(part, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
                       for part in x.split(2000)]).clamp_(-1.0, 1.0)
    return x.expand(-1, 3, -1, -1), torch.from_numpy(labels)


@torch.no_grad()
def pooled_features(teacher, x: torch.Tensor, desc: str, batch: int = 500) -> torch.Tensor:
    return torch.cat([teacher.encode(part).float().mean(dim=1)
                      for part in tqdm(x.split(batch), desc=desc, unit="batch", leave=False)])


def main() -> None:
    from dmvae_scale.config import load_config
    from dmvae_scale.distributed.teachers import TeacherSpec, build_teacher
    from dmvae_scale.eval.probe import linear_probe_accuracy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="a `teacher` stage artifact directory")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    cfg = load_config(Path(args.artifact) / "config.yaml")
    enc, size = cfg.tokenizer.encoder, cfg.tokenizer.image_size
    geometry = dict(image_size=size, grid=size // enc.patch_size, arch=enc.arch, patch_size=enc.patch_size, chunk=250)
    ssl = build_teacher(TeacherSpec(name="ssl", weights=str(args.artifact), artifact_weights=args.weights, **geometry))
    rand = build_teacher(TeacherSpec(name="random_vit", seed=args.seed, **geometry))

    start = time.perf_counter()
    pick = np.random.default_rng(args.seed).permutation(60_000)[:args.train_images]
    train_x, train_y = fashion_mnist_at("train", size, np.sort(pick))
    test_x, test_y = fashion_mnist_at("test", size)
    rows = {"raw pixels": (train_x[:, 0].flatten(1), test_x[:, 0].flatten(1))}
    for name, teacher in (("random ViT (same arch)", rand), ("SSL teacher", ssl)):
        rows[name] = (pooled_features(teacher, train_x, f"{name} train"), pooled_features(teacher, test_x, f"{name} test"))
    results = {}
    for name, (tr, te) in rows.items():
        results[name] = {"dim": tr.shape[1], "accuracy": linear_probe_accuracy(tr, train_y, te, test_y)}
    seconds = time.perf_counter() - start

    print(f"linear probe, Fashion-MNIST: fit on {len(train_y)} training images, scored on {len(test_y)} test images")
    print(f"{'representation':<24}{'dim':>6}{'accuracy':>10}")
    for name, r in results.items():
        print(f"{name:<24}{r['dim']:>6}{100 * r['accuracy']:>9.2f}%")
    gain = 100 * (results["SSL teacher"]["accuracy"] - results["raw pixels"]["accuracy"])
    print(f"SSL teacher vs raw pixels: {gain:+.2f} points (goal > 0), {seconds:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"artifact": str(args.artifact), "weights": args.weights,
                                              "train_images": len(train_y), "test_images": len(test_y),
                                              "results": results, "ssl_minus_pixels_points": gain,
                                              "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
