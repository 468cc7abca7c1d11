"""Benchmark: tokenizer-stage steps fed by the remote TeacherService (with prefetch) vs the in-process teacher.

The step is the trainable part of stage 1 on the demo geometry (Fashion-MNIST at 32 px): bottleneck + conv decoder,
L1 loss, AdamW, on frozen teacher features. The teacher's compute is held equal: it runs with the same number of
torch threads (1) in-process and in the service actor; the trainer also uses 1 thread. The service runs on a loopback
Ray head started here (2 CPUs; the teacher actor asks num_cpus=0) and stopped at the end.

    python tools/bench_teacher.py [--arch vit_tiny] [--steps 30] [--batch 32] [--out bench_teacher.json]

Prints a table (the last line is the headline ratio) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dmvae_scale.config import load_config  # noqa: E402
from dmvae_scale.data.builtin import ImageArrayDataset, load_fashion_mnist  # noqa: E402
from dmvae_scale.distributed.ray_local import connected, start_local_cluster  # noqa: E402
from dmvae_scale.distributed.teacher_service import (  # noqa: E402
    LocalFeatures, ServiceOptions, TeacherClient, start_teacher_service, stop_teacher_service)
from dmvae_scale.distributed.teachers import TeacherSpec, build_teacher  # noqa: E402
from dmvae_scale.models.tokenizer import Tokenizer  # noqa: E402


def make_batches(count: int, batch: int) -> list[dict]:
    images, labels = load_fashion_mnist("train")
    ds = ImageArrayDataset(images[:count * batch], labels[:count * batch], 32, hflip=False)
    items = [ds[i] for i in range(count * batch)]
    return [{"image": torch.stack([it["image"] for it in items[b * batch:(b + 1) * batch]])} for b in range(count)]


class StageStep:
    """Stage 1's trainable part on given features: bottleneck -> decoder -> L1, one AdamW step."""

    def __init__(self, arch: str, grid: int):
        cfg = load_config("configs/demo/tokenizer.yaml", [f"tokenizer.encoder.arch={arch}"])
        torch.manual_seed(0)
        self.tok = Tokenizer(cfg.tokenizer)
        self.grid, self.channels = grid, cfg.tokenizer.latent_channels
        params = list(self.tok.bottleneck.parameters()) + list(self.tok.decoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=5e-4)

    def __call__(self, batch: dict) -> float:
        x, feats = batch["image"], batch["teacher_features"]
        z = self.tok.bottleneck(feats).transpose(1, 2).reshape(len(x), self.channels, self.grid, self.grid)
        loss = (self.tok.decoder(z) - x).abs().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def step_times(source, batches: list[dict], arch: str, grid: int, warmup: int, depth: int, label: str
               ) -> list[float]:
    """Wall time between consecutive finished steps, after `warmup` steps (a fresh model each run)."""
    step = StageStep(arch, grid)
    times, t_last = [], None
    feeds = source.attach([dict(b) for b in batches], depth=depth)
    for i, batch in enumerate(tqdm(feeds, total=len(batches), desc=label, leave=False)):
        step(batch)
        now = time.perf_counter()
        if i >= warmup and t_last is not None:
            times.append(now - t_last)
        t_last = now
    return times


def service_latency(client: TeacherClient, batches: list[dict], in_flight: int) -> dict:
    """Sequential requests (latency) and `in_flight` outstanding requests (throughput), measured at the client."""
    client.latencies.clear()
    for b in batches:
        client.features(b["image"])
    lat = np.array(client.latencies)
    t0 = time.perf_counter()
    for _ in client.attach([dict(b) for b in batches], depth=in_flight):
        pass
    rate = len(batches) / (time.perf_counter() - t0)
    return {"latency_p50_ms": 1000 * float(np.percentile(lat, 50)),
            "latency_p99_ms": 1000 * float(np.percentile(lat, 99)), "batches_per_s": rate, "in_flight": in_flight}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_tiny",
                    help="random-ViT teacher: vit_tiny (the demo encoder, default), vit_s, vit_b")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode, over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of all modes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="bench_teacher.json")
    args = ap.parse_args()

    torch.set_num_threads(1)
    spec = TeacherSpec(name="random_vit", image_size=32, grid=8, arch=args.arch, patch_size=4, seed=0,
                       chunk=args.batch)
    per_round = args.steps // args.rounds
    batches = make_batches(per_round + args.warmup, args.batch)
    modes = {"in-process teacher (1 thread)": 0, "remote, no prefetch": 0, "remote + prefetch (1 ahead)": 1}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cluster = start_local_cluster(num_cpus=2)  # up for every mode: its daemons load the machine equally
    try:
        with connected(cluster, log_to_driver=False):
            pool = start_teacher_service(spec, ServiceOptions(name="bench-teacher", num_cpus=0, threads=1))
            client, local = TeacherClient(pool), LocalFeatures(build_teacher(spec))
            # Rounds interleave the modes, so a change in background load hits all of them alike.
            for r in range(args.rounds):
                for mode, depth in modes.items():
                    source = local if mode.startswith("in-process") else client
                    times[mode] += step_times(source, batches, args.arch, 8, args.warmup, depth, f"{r}: {mode}")
            service = service_latency(client, batches[:20], in_flight=4)
            service.update({k: pool.info()[0][k] for k in ("requests", "batches", "images")})
            stop_teacher_service(pool)
    finally:
        cluster.stop()
    rows = {m: {"steps_per_s": 1.0 / float(np.median(t)), "step_ms_p50": 1000 * float(np.median(t)),
                "step_ms_mean": 1000 * float(np.mean(t)), "steps": len(t)} for m, t in times.items()}

    base = rows["in-process teacher (1 thread)"]["steps_per_s"]
    print(f"\nteacher random {args.arch} (32 px, 64 tokens), batch {args.batch}, {args.steps} timed steps per mode "
          f"in {args.rounds} interleaved rounds (median step time), {os.cpu_count()} cores")
    print(f"{'mode':<32} {'steps/s':>8} {'p50 ms':>8} {'mean ms':>8} {'vs in-process':>14}")
    for name, r in rows.items():
        print(f"{name:<32} {r['steps_per_s']:>8.2f} {r['step_ms_p50']:>8.1f} {r['step_ms_mean']:>8.1f} "
              f"{r['steps_per_s'] / base:>13.2f}x")
    print(f"service: latency p50 {service['latency_p50_ms']:.1f} ms, p99 {service['latency_p99_ms']:.1f} ms "
          f"(one request at a time); {service['batches_per_s']:.2f} batches/s with {service['in_flight']} in flight")
    ratio = rows["remote + prefetch (1 ahead)"]["steps_per_s"] / base
    print(f"headline: remote teacher + prefetch runs the stage at {ratio:.2f}x the in-process teacher's step rate")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "service": service, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
