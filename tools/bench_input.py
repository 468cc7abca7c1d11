"""Input-pipeline benchmark (#20 item 3): images per second per CPU core for the imagenet256 tokenizer's reader.

Photo-sized JPEGs (about 500x375, quality 90: Fashion-MNIST pixels upscaled, tinted and given sensor-like noise, as
tools/bench_data.py makes them) are written as shards to a SeaweedFS server started here (data/object_store.py), then
streamed back through the project's ImageStreamDataset + StreamingDataLoader at 256 px (center crop, flip), with 0, 1
and 2 DataLoader workers, from full-size shards and from shards written at 256 x 256 (write_shards(image_size=256):
short side resized bicubic, center-cropped, JPEG quality 95; the loader's center crop then has nothing to resize). Each run starts from a cold local cache, so
downloads count. img/s is wall-clock; img/s per core is images per CPU-second of this process and its workers (on a
shared machine wall time also measures the neighbours; CPU seconds measure the pipeline's own cost).

The cores per GPU implied: GPU img/s / (img/s per core). No imagenet256 tokenizer step has been timed on a GPU yet
(#22), so --gpu-img-s is an assumption: 600 img/s per H200, from FLOPs: the frozen ViT-L/16 forward at 256 px (~160
GFLOP/img) plus the conv decoder's and discriminator's forward and backward and the LPIPS-VGG16 passes (~450
GFLOP/img together), at 40% of the H200's ~990 bf16 TFLOP/s. Replace it with #22's measurement once there is one.

Prints a table whose last line is the headline ratio (pre-resized / full-size img/s per core, 2 workers) and writes
JSON (--json).
    OMP_NUM_THREADS=1 python tools/bench_input.py --images 512 --json bench_input.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import make_photo_tree, object_store, timed_epoch  # noqa: E402


def run(args) -> dict:
    from dmvae_scale.data import storage
    from dmvae_scale.data.shards import write_shards
    from dmvae_scale.data.stream import ImageStreamDataset, make_loader
    work = Path(tempfile.mkdtemp(prefix="bench-input-"))
    rows = []
    try:
        with object_store(args, work):
            make_photo_tree(work / "photos", args.images)
            base = f"s3://{args.bucket}/bench-input-{os.getpid()}"
            sets = {"full-size": f"{base}/full/train", "pre-resized": f"{base}/small/train"}
            try:
                for (name, url), size in zip(sets.items(), (None, args.image_size)):
                    summary = write_shards(str(work / "photos"), url, shard_bytes=int(args.shard_mb * 2**20),
                                           progress=False, image_size=size)
                    print(f"# {name}: {summary.line()}", file=sys.stderr)
                for workers in args.workers:
                    for name, url in sets.items():
                        cache = work / f"cache-{name}-{workers}"
                        ds = ImageStreamDataset(url, batch_size=args.batch, image_size=args.image_size,
                                                crop="center", hflip=True, cache_dir=str(cache), seed=0)
                        n, clock = timed_epoch(make_loader(ds, num_workers=workers, persistent_workers=False)
                                               if workers else make_loader(ds))
                        del ds
                        shutil.rmtree(cache, ignore_errors=True)
                        rows.append({"shards": name, "workers": workers, "images": n, "img_s": n / clock.wall,
                                     "img_s_per_core": n / clock.cpu, "wall_s": clock.wall, "cpu_s": clock.cpu})
            finally:
                storage.remove(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": args.images, "image_size": args.image_size, "batch": args.batch, "cpus": os.cpu_count(),
            "gpu_img_s_assumed": args.gpu_img_s, "rows": rows}


def report(result: dict) -> None:
    rows = result["rows"]
    print(f"{'shards':<12} {'workers':>7} {'img/s':>8} {'img/s/core':>10} {'cores/GPU':>9}")
    for r in rows:
        r["cores_per_gpu"] = result["gpu_img_s_assumed"] / r["img_s_per_core"]
        print(f"{r['shards']:<12} {r['workers']:>7} {r['img_s']:>8.1f} {r['img_s_per_core']:>10.1f} "
              f"{r['cores_per_gpu']:>9.1f}")
    top = max(r["workers"] for r in rows)
    full = next(r for r in rows if r["shards"] == "full-size" and r["workers"] == top)
    small = next(r for r in rows if r["shards"] == "pre-resized" and r["workers"] == top)
    result["headline_ratio"] = small["img_s_per_core"] / full["img_s_per_core"]
    print(f"pre-resized / full-size img/s per core ({top} workers): {result['headline_ratio']:.2f}x; cores per GPU at "
          f"{result['gpu_img_s_assumed']:.0f} img/s: {full['cores_per_gpu']:.1f} full-size, "
          f"{small['cores_per_gpu']:.1f} pre-resized")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shard-mb", type=float, default=8.0)
    p.add_argument("--gpu-img-s", type=float, default=600.0, help="img/s one GPU's tokenizer step consumes (assumed)")
    p.add_argument("--bucket", default="bench")
    p.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting SeaweedFS")
    p.add_argument("--out", "--json", dest="json", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
