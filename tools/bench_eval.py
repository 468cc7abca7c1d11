"""Benchmark of the evaluation path: TF-Inception feature throughput (299 px, batch 32) and the sampling throughput of
the demo generator (configs/demo/generator.yaml: DiT + tokenizer decoder, random weights, its sampler settings).
The Inception baseline in the same run: the graph with its batch norms unfolded (what forward ran before).

    python tools/bench_eval.py [--device auto|cpu|cuda] [--batches 4] [--out bench_eval.json]

Prints a table whose last line is the headline, and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_inception(device: torch.device, batches: int, batch_size: int = 32) -> dict:
    from dmvae_scale.data.builtin import load_fashion_mnist
    from dmvae_scale.eval.inception import load_inception

    net = load_inception(device=device)
    # Real images brought to 299 px beforehand, so the figure is the network's (its own resize is then a no-op).
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(images[:batch_size])[:, None].float()
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous().to(device)

    def timed(forward) -> float:
        forward(x)  # warm-up (allocations, cuDNN autotuning)
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(batches):
                forward(x)
        _sync(device)
        return time.perf_counter() - start

    unfolded = timed(net.graph)  # the baseline: the same graph with its batch norms as separate layers
    seconds = timed(net)
    return {"images": batches * batch_size, "seconds": seconds, "images_per_s": batches * batch_size / seconds,
            "unfolded_seconds": unfolded, "unfolded_images_per_s": batches * batch_size / unfolded,
            "batch_size": batch_size, "image_px": 299}


def bench_sampling(device: torch.device, batches: int, batch_size: int = 32) -> dict:
    from dmvae_scale.artifacts import LatentSpec
    from dmvae_scale.config import load_config
    from dmvae_scale.eval.sampling import LatentImageSampler, SamplingPlan
    from dmvae_scale.models.dit import LightningDiT
    from dmvae_scale.models.tokenizer import Tokenizer

    cfg = load_config("configs/demo/generator.yaml")
    torch.manual_seed(0)
    dit = LightningDiT(cfg.score).eval().to(device)
    tok = Tokenizer(cfg.tokenizer, load_pretrained=False).eval().to(device)
    s = cfg.sampler
    plan = SamplingPlan(batches * batch_size, cfg.score.num_classes, batch_size, s.seed, s.method, s.steps,
                        s.cfg_scale, list(s.guidance_interval) if s.guidance_interval else None, "bench", "raw")
    sampler = LatentImageSampler(dit, tok.decode, LatentSpec(*tok.latent_shape), plan, dit.null_label, device)
    sampler.batch(0)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for b in range(batches):
        sampler.batch(b)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": batches * batch_size, "seconds": seconds, "images_per_s": batches * batch_size / seconds,
            "batch_size": batch_size, "sampler": s.method, "steps": s.steps, "cfg_scale": s.cfg_scale,
            "image_px": cfg.tokenizer.image_size, "dit_params": sum(p.numel() for p in dit.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, default=4, help="timed batches of 32 per benchmark (default 4)")
    parser.add_argument("--out", default="bench_eval.json")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    inception = bench_inception(device, args.batches)
    sampling = bench_sampling(device, args.batches)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {"device": str(device), "where": where, "inception": inception, "sampling": sampling}
    print(f"{'benchmark':<34}{'images':>8}{'seconds':>10}{'img/s':>10}")
    print(f"{'Inception, batch norms unfolded':<34}{inception['images']:>8}{inception['unfolded_seconds']:>10.2f}"
          f"{inception['unfolded_images_per_s']:>10.2f}")
    print(f"{'Inception pool3 (299 px, batch 32)':<34}{inception['images']:>8}{inception['seconds']:>10.2f}"
          f"{inception['images_per_s']:>10.2f}")
    label = f"demo sampling ({sampling['sampler']} {sampling['steps']})"
    print(f"{label:<34}{sampling['images']:>8}{sampling['seconds']:>10.2f}{sampling['images_per_s']:>10.2f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    ratio = sampling["images_per_s"] / inception["images_per_s"]
    folded = inception["images_per_s"] / inception["unfolded_images_per_s"]
    print(f"headline on {device} ({where}): Inception {inception['images_per_s']:.1f} img/s ({folded:.2f}x the "
          f"unfolded graph), demo sampling {sampling['images_per_s']:.1f} img/s (ratio sampling/Inception "
          f"{ratio:.2f})")


if __name__ == "__main__":
    main()
