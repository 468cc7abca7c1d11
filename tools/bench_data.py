"""Data-plane benchmark.

1. stream: images/s of StreamingDataset from a loopback S3 server (SeaweedFS, the embedded store, started here unless
   --endpoint is given; download + decode + augment, cold local cache each repetition) against decoding the same
   encoded bytes held in memory, with the same DataLoader layout (batch size, workers) and the same transform.
   Goal: ratio >= 0.9.
2. generator: steps/s of the generator stage's step (LightningDiT flow matching, AdamW) fed by cached latents read
   from the same S3 server against encoding images (streamed from it too) with the tokenizer on the fly.
   Goal: ratio >= 1.4.

Prints a table whose last line is the headline ratio and writes JSON (--json). CPU example:
    OMP_NUM_THREADS=1 python tools/bench_data.py --images 2000 --workers 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


# ----------------------------------------------------------------------------------------------------------------------
# 1. streaming from S3 vs decoding from memory
# ----------------------------------------------------------------------------------------------------------------------

def make_photo_tree(root: Path, n: int, seed: int = 0) -> None:
    """ImageNet-sized JPEGs (about 500x375, quality 90) made from real Fashion-MNIST pixels plus sensor-like noise,
    so files weigh what photos weigh; 10 class folders."""
    from dmvae_scale.data.builtin import load_fashion_mnist
    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    for i in range(n):
        size = (int(rng.integers(400, 520)), int(rng.integers(330, 400)))
        base = Image.fromarray(images[i]).convert("RGB").resize(size, Image.BICUBIC)
        array = np.asarray(base, dtype=np.float32) * rng.uniform(0.4, 1.0, 3) + rng.normal(0, 10, (size[1], size[0], 3))
        d = root / "train" / f"n{int(labels[i]):08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(d / f"img_{i:06d}.JPEG", quality=90)


class InMemoryImages(Dataset):
    """The same encoded bytes, decoded and augmented exactly like ImageStreamDataset does."""

    def __init__(self, items: list[tuple[bytes, int]], image_size: int, seed: int = 0):
        from dmvae_scale.data.transforms import ImageTransform
        self.items, self.seed = items, seed
        self.transform = ImageTransform(image_size, "random", True)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from dmvae_scale.data.transforms import decode_image, sample_rng
        data, label = self.items[i]
        return {"image": self.transform(decode_image(data), sample_rng(self.seed, 0, i)),
                "label": torch.tensor(label)}


@contextlib.contextmanager
def object_store(args, work: Path):
    """The S3 endpoint both parts use: --endpoint, or a SeaweedFS server started here (stopped on exit); the bucket
    exists on return and this process's environment points s3fs / Streaming / boto3 at it."""
    import boto3
    from dmvae_scale.data.object_store import ObjectStore
    store = None
    if args.endpoint:
        os.environ["S3_ENDPOINT_URL"] = args.endpoint
    else:
        store = ObjectStore(work / "seaweedfs").start()
        os.environ.update(store.env())
    try:
        client = boto3.session.Session().client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=args.bucket)
        yield os.environ["S3_ENDPOINT_URL"]
    finally:
        if store is not None:
            store.stop()


class Clock:
    """Wall seconds and CPU seconds (this process + children reaped meanwhile, e.g. DataLoader workers).

    On a machine shared with other jobs, wall time measures the neighbours too; CPU seconds per image measure
    the pipeline's own cost, which is what bounds throughput once the cores are ours."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall0, self._cpu() - self.cpu0

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_epoch(loader) -> tuple[int, Clock]:
    """Images in one epoch and its Clock; clock.first is the wall time to the first batch (worker start-up and,
    when streaming, the first shard's download)."""
    n = 0
    with Clock() as clock:
        for batch in loader:
            if n == 0:
                clock.first = time.perf_counter() - clock.wall0
            n += len(batch["label"])
        del batch
    return n, clock


def bench_stream(args, work: Path) -> dict:
    from dmvae_scale.data import storage
    from dmvae_scale.data.shards import load_index, write_shards
    from dmvae_scale.data.stream import ImageStreamDataset, make_loader
    url = f"s3://{args.bucket}/bench-{os.getpid()}/train"
    try:
        tree = work / "photos"
        make_photo_tree(tree, args.images)
        summary = write_shards(str(tree), url, workers=args.workers, shard_bytes=int(args.shard_mb * 2**20),
                               progress=False)
        print(f"# source: {summary.line()}", file=sys.stderr)
        index = load_index(url)
        items = []
        for path in sorted(tree.rglob("*.JPEG")):
            items.append((path.read_bytes(), int(path.parent.name[1:])))
        mib = sum(len(b) for b, _ in items) / 2**20

        def memory_epoch(rep):
            # persistent_workers=False: workers exit (and are reaped, so their CPU time counts) at epoch end
            mem = DataLoader(InMemoryImages(items, args.image_size), batch_size=args.batch, shuffle=True,
                             num_workers=args.workers, drop_last=True, generator=torch.Generator().manual_seed(rep))
            return timed_epoch(mem)

        def stream_epoch(rep):
            cache = work / f"cache-{rep}"  # cold cache: every repetition downloads all shards again
            ds = ImageStreamDataset(url, batch_size=args.batch, image_size=args.image_size, crop="random",
                                    cache_dir=str(cache), seed=rep)
            try:
                return timed_epoch(make_loader(ds, num_workers=args.workers, persistent_workers=False))
            finally:
                del ds
                shutil.rmtree(cache, ignore_errors=True)

        rows = []
        for rep in range(args.repeats):
            # Paired runs back to back; the order alternates so slow drift of a shared machine favours neither side.
            if rep % 2 == 0:
                (n_mem, c_mem), (n_str, c_str) = memory_epoch(rep), stream_epoch(rep)
            else:
                (n_str, c_str), (n_mem, c_mem) = stream_epoch(rep), memory_epoch(rep)
            row = {"images": n_str, "memory_img_s": n_mem / c_mem.wall, "stream_img_s": n_str / c_str.wall,
                   "memory_img_cpu_s": n_mem / c_mem.cpu, "stream_img_cpu_s": n_str / c_str.cpu,
                   "memory_first_batch_s": c_mem.first, "stream_first_batch_s": c_str.first,
                   # after the first batch: the rate a long run sees once workers run and shards flow
                   "memory_steady_img_s": (n_mem - args.batch) / (c_mem.wall - c_mem.first),
                   "stream_steady_img_s": (n_str - args.batch) / (c_str.wall - c_str.first)}
            row["steady_ratio"] = row["stream_steady_img_s"] / row["memory_steady_img_s"]
            row["ratio"] = row["stream_img_s"] / row["memory_img_s"]
            row["cpu_ratio"] = row["stream_img_cpu_s"] / row["memory_img_cpu_s"]
            rows.append(row)
            print(f"# repeat {rep}: memory {row['memory_img_s']:.1f} img/s ({row['memory_img_cpu_s']:.1f} per CPU-s), "
                  f"stream {row['stream_img_s']:.1f} img/s ({row['stream_img_cpu_s']:.1f} per CPU-s), "
                  f"ratio {row['ratio']:.3f}, CPU ratio {row['cpu_ratio']:.3f}", file=sys.stderr)
        # Paired repetitions (memory, then stream, back to back) and the median over pairs.
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0] if k != "images"}
        return {"images": args.images, "source_mib": mib, "shards": len(index["shards"]), "image_size": args.image_size,
                "batch": args.batch, "workers": args.workers, "store": "SeaweedFS" if not args.endpoint else
                args.endpoint, "repeats": rows, **med}
    finally:
        storage.remove(url.rsplit("/", 1)[0])


# ----------------------------------------------------------------------------------------------------------------------
# 2. generator step: cached latents vs on-the-fly encoding
# ----------------------------------------------------------------------------------------------------------------------

PRESETS = {
    # CPU: the demo tokenizer and generator (configs/demo)
    "demo": ("configs/demo/tokenizer.yaml", "configs/demo/generator.yaml"),
    # GPU: the paper's shapes (ViT-L/16 encoder at 256 px, LightningDiT-XL/1 on 16x16x32)
    "imagenet256": ("configs/imagenet256/tokenizer.yaml", "configs/imagenet256/generator.yaml"),
}


def bench_generator(args, work: Path) -> dict:
    from dmvae_scale.artifacts import ArtifactInfo, save_artifact
    from dmvae_scale.config import config_hash, dump_yaml, load_config
    from dmvae_scale.data import storage
    from dmvae_scale.data.artifact_store import open_tokenizer
    from dmvae_scale.data.latents import LatentStreamDataset, cache_latents, resolve_device
    from dmvae_scale.data.shards import write_shards
    from dmvae_scale.data.stream import ImageStreamDataset, close_iteration, make_loader
    from dmvae_scale.method.flow import flow_matching_loss
    from dmvae_scale.models.dit import LightningDiT
    from dmvae_scale.models.tokenizer import Tokenizer

    tok_file, gen_file = PRESETS[args.preset]
    tok_cfg = load_config(tok_file, ["tokenizer.encoder.weights=null"])
    gen_cfg = load_config(gen_file)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    art = work / "tokenizer"
    save_artifact(art, ArtifactInfo("tokenizer", [], config_hash(tok_cfg)),
                  {"tokenizer": Tokenizer(tok_cfg.tokenizer, load_pretrained=False).state_dict()},
                  config_yaml=dump_yaml(tok_cfg))
    root = f"s3://{args.bucket}/bench-gen-{os.getpid()}"  # images and latents both on the S3 server
    images_url, latents_url = f"{root}/fm", f"{root}/latents"
    n = args.steps_images
    write_shards("fashion-mnist", images_url, limit=n, workers=max(1, args.workers), progress=False)
    t0 = time.perf_counter()
    cache_latents(images_url, latents_url, str(art), weights="raw", batch_size=args.gen_batch, workers=args.workers,
                  device=str(device), progress=False)
    cache_s = time.perf_counter() - t0
    tokenizer, artifact = open_tokenizer(str(art), "raw")
    info = artifact.info
    tokenizer.to(device)
    score = gen_cfg.score
    dit = LightningDiT(score).to(device)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(z, y):
        with autocast:
            loss = flow_matching_loss(dit, z, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(dataset, latents_of, n_steps):
        """(steps per second, steps per CPU-second) after warm-up; the loader restarts if an epoch runs out."""
        loader = make_loader(dataset, num_workers=args.gen_workers, persistent_workers=False)
        it = iter(loader)
        clock = Clock()
        for i in range(args.warmup + n_steps):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                clock.__enter__()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            z = latents_of(batch)
            step(z, batch["label"].to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock.__exit__()
        del it, loader
        close_iteration(dataset)
        return n_steps / clock.wall, n_steps / clock.cpu

    def encode_on_the_fly(batch):
        x = batch["image"].to(device, non_blocking=True)
        with torch.no_grad(), autocast:
            if tokenizer.cfg.in_channels == 1:
                x = x.mean(1, keepdim=True)
            z = tokenizer.encode(x).float()
        spec = info.latent
        return spec.normalize(z) if spec is not None else z

    images = ImageStreamDataset(images_url, batch_size=args.gen_batch, image_size=tokenizer.cfg.image_size,
                                crop="adm", hflip=True, cache_dir=str(work / "gen-images-cache"))
    latents = LatentStreamDataset(latents_url, batch_size=args.gen_batch, hflip=True,
                                  cache_dir=str(work / "gen-latents-cache"))
    spec = latents.latent_spec
    pairs = []
    for _ in range(args.gen_repeats):  # paired and back to back, as in the streaming part
        fly, fly_cpu = run(images, encode_on_the_fly, args.steps)
        cached, cached_cpu = run(latents, lambda b: spec.normalize(b["latent"].to(device, non_blocking=True)),
                                 args.steps)
        pairs.append({"on_the_fly_steps_s": fly, "cached_steps_s": cached, "ratio": cached / fly,
                      "on_the_fly_steps_cpu_s": fly_cpu, "cached_steps_cpu_s": cached_cpu,
                      "cpu_ratio": cached_cpu / fly_cpu})
        print(f"# pair: on the fly {fly:.2f} steps/s ({fly_cpu:.2f} per CPU-s), cached {cached:.2f} steps/s "
              f"({cached_cpu:.2f} per CPU-s), ratio {cached / fly:.3f}, CPU ratio {cached_cpu / fly_cpu:.3f}",
              file=sys.stderr)
    del images, latents
    storage.remove(root)
    med = {k: float(np.median([r[k] for r in pairs])) for k in pairs[0]}
    return {"preset": args.preset, "device": str(device), "batch": args.gen_batch, "steps": args.steps,
            "loader_workers": args.gen_workers, "dit_params": sum(p.numel() for p in dit.parameters()),
            "encoder_params": sum(p.numel() for p in tokenizer.encoder.parameters()) +
            sum(p.numel() for p in tokenizer.bottleneck.parameters()),
            "cache_latents_s": cache_s, "pairs": pairs, **med}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("stream", "generator", "all"), default="all")
    p.add_argument("--images", type=int, default=2000,
                   help="photo-sized JPEGs for the streaming part (an epoch of a few seconds; at a few hundred, "
                        "worker start-up and the first download dominate what is meant to be a steady rate)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (both sides of each comparison)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shard-mb", type=float, default=4.0, help="shard size for the streaming part (MiB)")
    p.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting SeaweedFS here")
    p.add_argument("--bucket", default="dmvae-bench")
    p.add_argument("--preset", choices=tuple(PRESETS), default="demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--gen-workers", type=int, default=0,
                   help="DataLoader workers for the generator part (default 0: on a 2-core CPU, loader processes "
                        "would compete with the step itself; use several on GPU nodes)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps-images", type=int, default=2048, help="Fashion-MNIST images for the generator part")
    p.add_argument("--out", "--json", dest="json", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dmvae-bench-"))
    results = {}
    try:
        with object_store(args, work):
            if args.part in ("stream", "all"):
                results["stream"] = bench_stream(args, work)
            if args.part in ("generator", "all"):
                results["generator"] = bench_generator(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'measure':<62}{'wall':>10}{'per CPU-s':>12}")
    if "generator" in results:
        g = results["generator"]
        print(f"{'generator steps, encoding on the fly':<62}{g['on_the_fly_steps_s']:>10.2f}"
              f"{g['on_the_fly_steps_cpu_s']:>12.2f}")
        print(f"{'generator steps, cached latents from S3':<62}{g['cached_steps_s']:>10.2f}"
              f"{g['cached_steps_cpu_s']:>12.2f}")
        print(f"{'generator ratio cached / on the fly, median (goal >= 1.4)':<62}{g['ratio']:>10.2f}"
              f"{g['cpu_ratio']:>12.2f}")
    if "stream" in results:
        r = results["stream"]
        print(f"{'images decoded from memory':<62}{r['memory_img_s']:>10.1f}{r['memory_img_cpu_s']:>12.1f}")
        print(f"{'images streamed from loopback S3 (SeaweedFS)':<62}{r['stream_img_s']:>10.1f}"
              f"{r['stream_img_cpu_s']:>12.1f}")
        print(f"{'seconds to first batch: memory / stream (median)':<62}"
              f"{r['memory_first_batch_s']:>10.2f}{r['stream_first_batch_s']:>12.2f}")
        print(f"{'after the first batch: img/s memory / stream (median)':<62}"
              f"{r['memory_steady_img_s']:>10.1f}{r['stream_steady_img_s']:>12.1f}")
        print(f"{'steady ratio S3 / memory after the first batch (median)':<62}{r['steady_ratio']:>10.2f}")
        print(f"{'stream ratio S3 / memory, whole epoch, median (goal >= 0.9)':<62}{r['ratio']:>10.2f}"
              f"{r['cpu_ratio']:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
