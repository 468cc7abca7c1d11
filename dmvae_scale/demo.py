"""`dmvae-scale demo`: the cluster path on an embedded default, end to end on real data.

What a cluster user does, on one machine with nothing but what the installer put there:
  1. an object store: an embedded SeaweedFS server on loopback (`--store DIR` uses a plain directory instead);
  2. a Ray head on loopback with its Job API (the dashboard port), as `ray start --head` gives on a cluster;
  3. the demo pipeline (configs/demo/pipeline.yaml: shards, the stages, the latent cache, samples, FID) submitted
     through the Job API as one job, its logs followed here;
  4. the report copied next to --out.
Ctrl-C stops the job (its training steps checkpoint first); the same command again resumes: the store's data
directory lives under --out, and the pipeline skips what is complete.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .log import say
from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"
BUCKET = "dmvae-demo"
# `--quick`: the same path, small (CI runs it): every stage a few steps, few samples, a small FID reference.
QUICK = ["total_images=64", "batch_size=32", "log_every_images=32", "ckpt_every_images=32", "*:per_class=2",
         "*:limit=100", "shards:limit=256", "classifier:limit=2000", "classifier:epochs=1",
         "*:launcher=auto"]  # a few steps a stage: training in the job's process (Ray Train start-up ~20 s a step)


@dataclass
class DemoOptions:
    out: str = "runs/demo"
    store: str | None = None  # a directory instead of the embedded S3 server
    quick: bool = False
    workers: int = 1  # DeepSpeed workers per stage
    overrides: list[str] = field(default_factory=list)  # pipeline overrides (STEP:key=value, key=value)
    config_dir: str = str(CONFIG_DIR)
    stop_wait_s: float = 180.0  # how long Ctrl-C waits for the job to checkpoint and stop


def _copy_tree(store_url: str, prefix: str, dest: Path) -> list[Path]:
    from .data import storage
    fs, root = storage.filesystem(storage.join(store_url, prefix))
    root = root.rstrip("/")
    copied = []
    if not fs.exists(root):
        return copied
    for path in fs.find(root):
        target = dest / path[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(path))
        copied.append(target)
    return copied


def _copy_report(store_url: str, dest: Path) -> dict:
    """The study report (report/) and every evaluation (eval/) from the store into `dest`; returns the metrics of
    each evaluation by step name."""
    dest.mkdir(parents=True, exist_ok=True)
    _copy_tree(store_url, "report", dest)
    metrics = {}
    for path in _copy_tree(store_url, "eval", dest / "eval"):
        if path.name == "metrics.json":
            metrics[path.parent.name] = json.loads(path.read_text())
    return metrics


def _artifact_ids(pipe) -> dict[str, str]:
    """step -> artifact id of every train step (what the next steps were made from)."""
    from .data import storage
    from .pipeline import artifact_id
    out = {}
    for step in pipe.steps:
        if step.kind == "train":
            out[step.name] = artifact_id(json.loads(storage.read_bytes(storage.join(pipe.artifact_url(step.name),
                                                                                   "artifact.json"))))
    return out


def _check_s3_credentials(store_url: str) -> None:
    """The demo's job runs on this machine's Ray head: keys botocore cannot find here, it cannot find there."""
    import botocore.session
    if botocore.session.get_session().get_credentials() is None:
        raise UserError(f"--store {store_url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                        f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE); leave --store out to use the embedded store")


def run_demo(o: DemoOptions) -> dict:
    from .distributed import jobs
    from .distributed.ray_local import start_local_cluster
    from .pipeline import load_pipeline

    config_dir = Path(o.config_dir)
    if not (config_dir / "pipeline.yaml").is_file():
        raise UserError(f"demo configs not found in {config_dir}: run the demo from a checkout of dmvae-scale "
                        f"(configs/demo/pipeline.yaml)")
    if o.workers < 1:
        raise UserError(f"--workers: at least 1, got {o.workers}")
    out = Path(o.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    overrides = (QUICK if o.quick else []) + [f"distributed.num_workers={o.workers}"] + list(o.overrides)
    store_proc = cluster = None
    saved_env = dict(os.environ)
    try:
        if o.store is None:
            from .data.object_store import ObjectStore
            say("demo", f"object store: SeaweedFS on loopback, data in {out / 'object-store'}")
            store_proc = ObjectStore(out / "object-store").start()
            os.environ.update(store_proc.env())
            store_url = f"{store_proc.create_bucket(BUCKET)}/pipeline"
        else:  # an existing store: a directory, or s3://bucket/prefix reached through S3_ENDPOINT_URL / AWS_*
            from .data import storage
            store_url = o.store.rstrip("/") if storage.is_remote(o.store) else str(Path(o.store).resolve())
            if store_url.startswith("s3://"):
                _check_s3_credentials(store_url)
        pipe = load_pipeline(config_dir, store_url, overrides)  # every config checked before a job is sent
        say("demo", f"Ray head on loopback with its Job API; {len(pipe.steps)} pipeline steps -> {store_url}")
        cluster = start_local_cluster(num_cpus=max(2, o.workers), env={"RAY_JOB_STOP_WAIT_TIME_S":
                                                                           str(int(o.stop_wait_s))})
        os.environ.update(cluster.client_env())
        submission = jobs.build_pipeline_submission(pipe, overrides)
        job_id = jobs.submit(submission, cluster.dashboard_url)
        say("demo", f"submitted job {job_id} (what `dmvae-scale submit pipeline {config_dir} --store {store_url}` "
                    f"does on a cluster); following its logs")
        try:
            jobs.follow_logs(cluster.dashboard_url, job_id, sys.stdout)
            status = jobs.wait_for_job(cluster.dashboard_url, job_id, timeout_s=60)
        except KeyboardInterrupt:
            print(f"\n[demo] interrupted: stopping job {job_id} (its running stage checkpoints first)", flush=True)
            status = jobs.stop_job(cluster.dashboard_url, job_id, wait_s=o.stop_wait_s)
            raise UserError(f"demo stopped ({status}) after {time.perf_counter() - began:.0f} s; run the same "
                            f"command again to resume from {out}") from None
        if status != "SUCCEEDED":
            _, message = jobs.job_status(cluster.dashboard_url, job_id)
            raise UserError(f"the demo pipeline job {job_id} ended {status}: {message}; the logs above say where; "
                            f"run the same command again to resume")
        metrics = _copy_report(store_url, out / "report")
        artifacts = _artifact_ids(pipe)
    finally:
        if cluster is not None:
            cluster.stop()
        if store_proc is not None:
            store_proc.stop()
        os.environ.clear()
        os.environ.update(saved_env)
    seconds = time.perf_counter() - began
    summary = {"seconds": round(seconds, 1), "store": store_url, "metrics": metrics, "report": str(out / "report"),
               "artifacts": artifacts}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = out / "report"
    for name in ("report", ):
        if (report / name / "report.md").is_file():
            say("", (report / name / "report.md").read_text())
    html_files = sorted(report.glob("*/report.html"))
    where = html_files[0] if html_files else report
    say("demo", f"done in {seconds:.0f} s; report: {where} (and report.md beside it); summary {out / 'summary.json'}")
    return summary

