"""The pipeline's heavy steps on a cluster's worker nodes: on a simulated multi-node cluster (a head with 0 CPUs, the
driver's node, and two one-CPU worker nodes; SeaweedFS, every path s3://), a small pipeline with launcher ray runs its
shards, cache_latents, sample, classifier and eval steps as Ray work on the workers (placement.json names nodes other than the
driver's), and the same steps with launcher local write the same outputs."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from repo import DEMO
from dmvae_scale.data import storage
from dmvae_scale.pipeline import PipelineError, load_pipeline
from node_cluster import node_cluster  # noqa: F401 (a fixture)
from s3_server import s3_bucket, s3_server  # noqa: F401 (fixtures)

PIPELINE = """launcher: ray
steps:
  - {name: shards, kind: shards, source: fashion-mnist, split: train, limit: 256, part_size: 96, workers: 2}
  - {name: tok, kind: train, config: kl_tokenizer.yaml, data: shards, launcher: local}
  - {name: dec, kind: train, config: kl_decoder.yaml, data: shards, tokenizer: tok, launcher: local}
  - {name: latents, kind: cache_latents, data: shards, tokenizer: dec, batch_size: 64, weights: raw}
  - {name: gen, kind: train, config: generator.yaml, tokenizer: dec, latents: latents, launcher: local}
  - {name: samples, kind: sample, generator: gen, per_class: 2, batch_size: 10, workers: 2}
  - {name: classifier, kind: classifier, source: fashion-mnist, split: train, limit: 256, test_limit: 60, epochs: 1}
  - {name: fid, kind: eval, samples: samples, classifier: classifier, source: fashion-mnist, split: test, limit: 60,
     image_size: 32}
"""
TINY = ["total_images=64", "batch_size=32", "log_every_images=32", "ckpt_every_images=32", "sampler.steps=4"]
HEAVY = {"shards": "data/shards", "latents": "latents/latents", "samples": "samples/samples",
         "classifier": "eval/classifier", "fid": "eval/fid"}


def _hashes(url: str) -> dict[str, str]:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return {p[len(root) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


@pytest.mark.integration
def test_heavy_steps_run_on_worker_nodes_and_write_what_the_local_path_writes(node_cluster, s3_bucket, tmp_path,
                                                                              monkeypatch):
    import ray
    import torch

    from dmvae_scale.pipeline import resources
    from dmvae_scale.pipeline.run import plan, run_pipeline
    config = tmp_path / "pipe"
    config.mkdir()
    for name in ("kl_tokenizer.yaml", "kl_decoder.yaml", "generator.yaml"):
        shutil.copy(DEMO / name, config / name)
    (config / "pipeline.yaml").write_text(PIPELINE)
    store = f"{s3_bucket}/p"
    gen_overrides = [f"gen:{o}" for o in TINY]
    overrides = [f"{step}:{o}" for step in ("tok", "dec") for o in TINY[:-1]] + gen_overrides
    pipe = load_pipeline(config, store, overrides)
    where = {ln.split()[1]: ln.split("; ", 1)[1] for ln in plan(pipe)}
    assert where == {"shards": "ray workers: 2 tasks x 1 CPU, 0 GPU", "tok": "driver (local): 1 worker in-process",
                     "dec": "driver (local): 1 worker in-process",
                     "latents": "ray workers: 1 task x 1 CPU, 0 GPU", "gen": "driver (local): 1 worker in-process",
                     "samples": "ray workers: 2 actors x 1 CPU, 1 GPU if the cluster has GPUs",
                     "classifier": "ray workers: 1 task x 1 CPU, 0 GPU", "fid": "ray workers: 1 task x 1 CPU, 0 GPU"}

    # 1. launcher ray: the heavy steps' work on the worker nodes
    run_pipeline(pipe, work_dir=str(tmp_path / "work-ray"))
    driver = ray.get_runtime_context().get_node_id()
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1}
    assert driver not in workers and len(workers) == 2
    on_ray = {}
    for name, sub in HEAVY.items():
        placed = json.loads(storage.read_bytes(f"{store}/{sub}/placement.json"))
        assert placed["driver_node"] == driver and placed["nodes"] and set(placed["nodes"]) <= workers, (name, placed)
        on_ray[name] = _hashes(f"{store}/{sub}")
    assert len({n for n in json.loads(storage.read_bytes(f"{store}/data/shards/placement.json"))["nodes"]}) >= 1
    ray_metrics = json.loads(storage.read_bytes(f"{store}/eval/fid/metrics.json"))

    # 2. launcher local: the same steps in this process, from the same trained artifacts (their steps are complete
    # and skipped). One torch thread, as each one-CPU Ray worker has: sums in the same order give the same bits.
    for sub in HEAVY.values():
        storage.remove(f"{store}/{sub}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = load_pipeline(config, store, overrides + ["*:launcher=local"])
        reports = run_pipeline(local, work_dir=str(tmp_path / "work-local"))
    finally:
        torch.set_num_threads(threads)
    assert [r.name for r in reports if r.status == "done"] == list(HEAVY)
    for name, sub in HEAVY.items():
        here = _hashes(f"{store}/{sub}")
        assert "placement.json" not in here
        theirs = {k: v for k, v in on_ray[name].items() if k != "placement.json"}
        if name == "fid":  # the report names local scratch paths; the numbers are compared below
            assert set(here) == set(theirs)
            continue
        if name == "classifier":  # its json holds the seconds it took; the weights are the same bytes
            assert set(here) == set(theirs) == {"classifier.safetensors", "classifier.json"}
            assert here["classifier.safetensors"] == theirs["classifier.safetensors"]
            continue
        assert here == theirs, name  # shard and latent indexes, every shard, samples.npz: the same bytes
    local_metrics = json.loads(storage.read_bytes(f"{store}/eval/fid/metrics.json"))
    assert local_metrics["fid"] == pytest.approx(ray_metrics["fid"], rel=1e-6)
    assert local_metrics["num_samples"] == ray_metrics["num_samples"] == 20
    assert local_metrics["classifier_accuracy"] == ray_metrics["classifier_accuracy"]

    # 3. a request no node can hold stops the step with one line instead of waiting forever
    monkeypatch.setattr(resources, "FIT_WAIT_S", 2.0)
    step = pipe.step("fid")
    with pytest.raises(PipelineError, match=r"^step fid: asks for 2 CPU and 0 GPU per task, but no node of the Ray "
                                            r"cluster holds that \(nodes: 0 CPU/0 GPU, 1 CPU/0 GPU\) after 2 s; "
                                            r"lower fid:cpus / fid:gpus or add larger worker nodes$"):
        resources.ray_call(step, resources.Resources("ray", 2.0, 0.0, 1), len, "x")


@pytest.mark.unit
def test_resource_fields_are_checked_with_one_line_each(tmp_path):
    (tmp_path / "pipeline.yaml").write_text("steps:\n  - {name: shards, kind: shards, cpus: 0}\n")
    with pytest.raises(PipelineError, match=r"^step shards: cpus=0 must be a number > 0; set e.g. shards:cpus=1$"):
        load_pipeline(tmp_path, str(tmp_path / "store"))
    (tmp_path / "pipeline.yaml").write_text("steps:\n  - {name: shards, kind: shards, workers: 1.5}\n")
    with pytest.raises(PipelineError, match=r"^step shards: workers=1.5 must be a whole number >= 1; set e.g. "
                                            r"shards:workers=1$"):
        load_pipeline(tmp_path, str(tmp_path / "store"))
    (tmp_path / "pipeline.yaml").write_text("steps:\n  - {name: shards, kind: shards, gpus: -1}\n")
    with pytest.raises(PipelineError, match=r"^step shards: gpus=-1 must be a number >= 0"):
        load_pipeline(tmp_path, str(tmp_path / "store"))
