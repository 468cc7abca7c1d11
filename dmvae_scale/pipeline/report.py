"""The pipeline's report step: every evaluation, tokenizer score, probe and loss curve the store holds, as one study
report (eval/study_report.py draws it)."""
from __future__ import annotations

import json
import shutil
from typing import Any

from ..data import storage
from ..eval.study_report import write_study_report
from .spec import Step
from .state import read_json
from .steps import StepContext, put_files


def metrics_curve(run_url: str, key: str) -> list[tuple[float, float]]:
    """(images, value) of one metric over a run, from its metrics.jsonl."""
    try:
        text = storage.read_bytes(storage.join(run_url, "metrics.jsonl")).decode()
    except storage.StorageError:
        return []
    points = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            if key in row:
                points[float(row["images"])] = float(row[key])  # a resumed run's rows replace the same images
    return sorted(points.items())


def write_pipeline_report(ctx: StepContext, step: Step) -> str:
    """The study report of every evaluation the pipeline holds (eval/report.md, report.html, plots, grids)."""
    pipe, s = ctx.pipe, step.spec
    local = ctx.work / "report" / step.name
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    rows, tokenizers, grids = [], [], {}
    curves: dict[str, dict[str, list]] = {"generator fm_loss": {}, "tokenizer l1": {}}
    settings: dict[str, Any] = {"store": pipe.store, "overrides": " ".join(pipe.global_overrides) or "-"}
    probes, points, validation = [], [], []
    for ev in pipe.steps:
        metrics = read_json(storage.join(pipe.url(ev.name), "metrics.json")) \
            if ev.kind in ("eval", "eval_tokenizer", "probe") else None
        if metrics is None:
            continue
        if ev.kind == "probe":
            probes.append({"teacher": metrics["teacher"], **metrics["probe"]})
            continue
        tags = metrics.get("tags", {})
        if ev.kind == "eval_tokenizer":
            tok = ev.spec["tokenizer"]
            tokenizers.append({"name": tok, **tags, "rfid": metrics.get("rfid"), "psnr": metrics.get("psnr"),
                               "ssim": metrics.get("ssim"), "images": metrics.get("num_images")})
            curves["tokenizer l1"][tok] = metrics_curve(pipe.url(tok), "l1")
            continue
        sample_step = pipe.step(ev.spec["samples"])
        gen = sample_step.spec["generator"]
        cfg = pipe.train_config(pipe.step(gen))
        if sample_step.spec.get("images") is not None:  # an earlier checkpoint: a point on the gFID-vs-images curve
            points.append({"name": gen, **tags, "images": int(sample_step.spec["images"]),
                           "total_images": cfg.total_images, "fid": metrics.get("fid"),
                           "classifier_accuracy": metrics.get("classifier_accuracy")})
            continue
        split = str(ev.spec.get("split", "test"))
        if split != "test":  # a choice's score (a study's validation split): not comparable with the test rows
            validation.append(f"{ev.name} ({gen}, {', '.join(f'{k} {v}' for k, v in tags.items())}): gFID "
                              f"{metrics.get('fid', float('nan')):.2f} against the {split} split")
            continue
        points.append({"name": gen, **tags, "images": cfg.total_images, "total_images": cfg.total_images,
                       "fid": metrics.get("fid"), "classifier_accuracy": metrics.get("classifier_accuracy")})
        curve = metrics_curve(pipe.url(gen), "fm_loss")
        curves["generator fm_loss"][gen] = curve
        rows.append({"name": gen, **tags, "samples": metrics.get("num_samples"), "fid": metrics.get("fid"),
                     "kid": metrics.get("kid"), "kid_se": metrics.get("kid_se"),
                     "classifier_accuracy": metrics.get("classifier_accuracy"),
                     "fd_classifier": metrics.get("fd_classifier"),
                     "final_loss": curve[-1][1] if curve else None})
        settings[f"{gen}"] = (f"DiT depth {cfg.score.depth} width {cfg.score.hidden_size} patch {cfg.score.patch_size},"
                              f" {cfg.total_images} images, batch {cfg.batch_size}, lr {cfg.optim.lr}, seed {cfg.seed},"
                              f" latents {cfg.data.latents}")
        settings[f"{ev.name} sampler"] = json.dumps({k: v for k, v in (read_json(storage.join(
            pipe.url(sample_step.name), "sampling.json")) or {}).items() if k in ("method", "steps", "cfg_scale",
                                                                                  "guidance_interval", "time_shift",
                                                                                  "num_samples", "precision")})
        grid = local / f"grid-{gen}.png"
        try:
            grid.write_bytes(storage.read_bytes(storage.join(pipe.url(sample_step.name), "grid.png")))
            grids[gen] = grid
        except storage.StorageError:
            pass
    report = write_study_report(local, title=str(s.get("title", "dmvae-scale study")), rows=rows,
                                tokenizers=tokenizers, curves=curves, grids=grids, settings=settings,
                                group_by=str(s.get("group_by", "latent_space")), ours=str(s.get("ours", "dmvae")),
                                baseline=str(s.get("baseline", "kl_vae")), probes=probes, points=points,
                                notes=[f"validation (choices, not in the tables): {v}" for v in validation])
    put_files(local, pipe.url(step.name), sorted(p.name for p in local.iterdir() if p.is_file()))
    met = ", ".join(f"{t['target']}: {'met' if t['met'] else 'MISSED'} ({t['measured']})" for t in report["targets"])
    return f"report {pipe.url(step.name)}/report.html" + (f"; {met}" if met else "")
