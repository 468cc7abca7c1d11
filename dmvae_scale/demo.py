"""`dmvae-scale demo`: the main job on its embedded default, every stage end to end on real data.

On one machine, with nothing but what the installer put there:
  1. real images: Debian's Fashion-MNIST written as MDS shards into a local object-store directory;
  2. an embedded Ray on loopback; each of the five stages (configs/demo/) trained by DeepSpeed workers launched by Ray
     Train, each loading the previous stage's artifact;
  3. class-balanced samples of the generator over Ray workers, FID against real test images, a report.
Re-running the demo with the same --out resumes: finished shards, artifacts and samples are kept.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .errors import UserError

STAGES = ("tokenizer", "reference", "dmd", "decoder", "generator")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"


@dataclass
class DemoOptions:
    out: str = "runs/demo"
    images: int = 2048  # training images (Fashion-MNIST train split, first N)
    workers: int = 2  # DeepSpeed workers per stage (Ray Train)
    zero_stage: int = 2
    scale: float = 1.0  # multiplies each stage's total_images (0.1 for a smoke run)
    per_class: int = 10  # samples per class for the FID at the end
    eval_images: int = 500  # real test images for the reference statistics
    config_dir: str = str(CONFIG_DIR)


def _stage_overrides(stage: str, o: DemoOptions, out: Path, shards: Path, total: int) -> list[str]:
    ov = [f"run_dir={out / stage}", f"data.source={shards}", f"distributed.num_workers={o.workers}",
          f"distributed.zero_stage={o.zero_stage}", "data.limit=null", f"total_images={total}"]
    upstream = {"reference": "tokenizer", "dmd": "tokenizer", "decoder": "dmd", "generator": "decoder"}
    if stage in upstream:
        ov.append(f"inputs.tokenizer={out / upstream[stage] / 'artifact'}")
    if stage == "dmd":
        ov.append(f"inputs.reference={out / 'reference' / 'artifact'}")
    return ov


def _scaled_total(cfg_total: int, batch: int, scale: float) -> int:
    return max(batch * 2, int(cfg_total * scale) // batch * batch)


def run_demo(o: DemoOptions) -> dict:
    """Run every stage and the evaluation; returns the summary (also written to OUT/summary.json)."""
    import ray

    from .data.shards import write_shards
    from .eval.commands import eval_ref, eval_samples
    from .eval.evaluate import EvalOptions
    from .eval.sample_run import run_sample
    from .train.launch import train

    config_dir = Path(o.config_dir)
    if not all((config_dir / f"{s}.yaml").is_file() for s in STAGES):
        raise UserError(f"demo configs not found in {config_dir}: run the demo from a checkout of dmvae-scale "
                        f"(configs/demo/*.yaml) or pass --config-dir")
    if o.workers < 1 or o.images < 64 or o.scale <= 0:
        raise UserError("demo: --workers >= 1, --images >= 64 and --scale > 0 are required")
    out = Path(o.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows: list[dict] = []

    print(f"[demo 1/4] Fashion-MNIST ({o.images} train images) -> MDS shards in {out / 'store'}", flush=True)
    shards = out / "store" / "fashion-mnist" / "train"
    summary = write_shards("fashion-mnist", str(shards), split="train", limit=o.images, workers=1)
    print(summary.line(), flush=True)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started_ray = False
    if not ray.is_initialized():
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=max(2, o.workers),
                 configure_logging=False, log_to_driver=True)
        started_ray = True
    try:
        for i, stage in enumerate(STAGES, 1):
            base = load_config(config_dir / f"{stage}.yaml")
            total = _scaled_total(base.total_images, base.batch_size, o.scale)
            cfg = load_config(config_dir / f"{stage}.yaml", _stage_overrides(stage, o, out, shards, total))
            print(f"[demo 2/4] stage {i}/5 {stage}: {total} images on {o.workers} DeepSpeed worker(s), "
                  f"ZeRO-{o.zero_stage}", flush=True)
            res = train(cfg)  # prints its own summary line
            last = res.history[-1] if res.history else {}
            rows.append({"stage": stage, "images": res.images_seen, "steps": res.steps, "seconds": round(res.seconds, 1),
                         "artifact": res.artifact, **{k: v for k, v in last.items() if k.startswith("loss")}})

        print(f"[demo 3/4] sampling {o.per_class} per class from the generator over {o.workers} Ray worker(s)",
              flush=True)
        samples = run_sample(str(out / "generator" / "artifact"), str(out / "samples"), num_per_class=o.per_class,
                             batch_size=50, workers=o.workers)
    finally:
        if started_ray:
            ray.shutdown()

    print(f"[demo 4/4] FID of the samples against {o.eval_images} real Fashion-MNIST test images", flush=True)
    opts = EvalOptions(allow_few_samples=True)
    ref = out / "eval" / "fashion-mnist-test.npz"
    if not ref.is_file():
        eval_ref("fashion-mnist", str(ref), split="test", image_size=32, limit=o.eval_images, opts=opts)
    metrics = eval_samples(str(samples), str(ref), str(out / "eval"), opts=opts)

    result = {"stages": rows, "metrics": metrics, "seconds": round(time.perf_counter() - began, 1),
              "report": str(out / "eval" / "report.md"), "samples": str(samples)}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    print()
    print(f"{'stage':<10} {'images':>7} {'steps':>6} {'seconds':>8}  artifact")
    for r in rows:
        print(f"{r['stage']:<10} {r['images']:>7} {r['steps']:>6} {r['seconds']:>8}  {r['artifact']}")
    fid = metrics.get("fid") if isinstance(metrics, dict) else None
    print(f"demo done in {result['seconds']:.0f} s: FID {fid if fid is None else round(fid, 2)} "
          f"({o.per_class * 10} samples vs {o.eval_images} real test images; tiny CPU models, a plumbing number); "
          f"report {result['report']}; summary {out / 'summary.json'}")
    return result
