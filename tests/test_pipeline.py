"""The recipe as one command on a real S3 server (SeaweedFS): `dmvae-scale demo --quick` submits the demo pipeline
through the Job API of a loopback Ray head; the same pipeline run directly, SIGKILLed mid-stage and rerun, ends with
the same artifacts (equal content hashes); a rerun skips what is complete; bad pipelines fail on the user's machine."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from repo import DEMO, REPO
from dmvae_scale.data import storage
from dmvae_scale.pipeline import PipelineError, artifact_id, load_pipeline

# The killed stage runs longer than the others, so the kill lands between two of its checkpoints.
LONGER_DMD = ["dmd:total_images=192"]
# The DMVAE chain of the demo pipeline: what the killed run repeats (the baseline's steps are the same machinery).
CHAIN = ["shards", "teacher", "tokenizer", "reference", "dmd", "decoder", "latents", "generator", "samples",
         "test_stats", "classifier", "fid"]
TRAINED = {"teacher", "tokenizer", "reference", "dmd", "decoder", "generator"}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


_TRACKER_NOISE = re.compile(r"Traceback \(most recent call last\):\n\s*File \S*multiprocessing/resource_tracker\.py"
                            r"[^\n]*\n[^\n]*\n\s*KeyError: '[^']*'\n?")


def _said(proc) -> str:
    """What a failed run printed, less Python's resource-tracker tracebacks (Streaming's shared memory unregistered
    twice at exit: hundreds of lines that pushed the step's error out of the shown tail in CI)."""
    out = _TRACKER_NOISE.sub("", proc.stdout)
    err = _TRACKER_NOISE.sub("", proc.stderr)
    return out[-6000:] + "\n--- stderr ---\n" + err[-4000:]


def _manifest(url: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(url, "artifact.json")))
    except storage.StorageError:
        return None


@pytest.mark.unit
def test_a_bad_pipeline_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(
        "steps:\n  - {name: shards, kind: shards}\n  - {name: tok, kind: train, config: tokenizer.yaml, data: nope}\n")
    with pytest.raises(PipelineError, match=r"step 2 \(tok\): data='nope' must name an earlier shards step"):
        load_pipeline(tmp_path, str(tmp_path / "store"))
    with pytest.raises(PipelineError, match=r"no step named 'tokenzer'"):
        load_pipeline(DEMO, str(tmp_path / "store"), ["tokenzer:total_images=64"])
    with pytest.raises(PipelineError, match=r"step tokenizer \(tokenizer.yaml\): .*optim.lrr"):
        load_pipeline(DEMO, str(tmp_path / "store"), ["tokenizer:optim.lrr=1"])
    pipe = load_pipeline(DEMO, "s3://bucket/demo", ["tokenizer:total_images=64", "samples:per_class=3"])
    cfg = pipe.train_config(pipe.step("generator"))
    assert cfg.run_dir == "s3://bucket/demo/runs/generator"
    assert cfg.inputs.tokenizer == "s3://bucket/demo/runs/decoder/artifact"
    assert cfg.data.latents == "s3://bucket/demo/latents/latents"
    assert pipe.train_config(pipe.step("tokenizer")).total_images == 64
    assert pipe.step("samples").spec["per_class"] == 3
    # The shipped ImageNet recipe loads as a pipeline too: only the store and the weight files are the user's,
    # and the DINOv2 file's hash is demanded before anything runs.
    with pytest.raises(PipelineError, match=r"step tokenizer \(tokenizer.yaml\): tokenizer.encoder.sha256: required"):
        load_pipeline(REPO / "configs" / "imagenet256", "s3://bucket/in256")
    imagenet = load_pipeline(REPO / "configs" / "imagenet256", "s3://bucket/in256",
                             ["tokenizer:tokenizer.encoder.sha256=" + "ab" * 32])
    dmd = imagenet.train_config(imagenet.step("dmd"))
    assert dmd.run_dir == "s3://bucket/in256/runs/dmd" and dmd.inputs.tokenizer == "s3://bucket/in256/runs/tokenizer/artifact"


@pytest.mark.unit
def test_the_launcher_of_a_train_step_follows_the_pipeline_the_step_and_the_worker_count(tmp_path):
    store = str(tmp_path / "store")
    pipe = load_pipeline(DEMO, store)  # the demo says `launcher: ray`: every step a one-CPU Ray worker
    assert all(pipe.launcher_of(s, pipe.train_config(s)) == "ray" for s in pipe.steps if s.kind == "train")
    from dmvae_scale.demo import QUICK
    quick = load_pipeline(DEMO, store, QUICK)  # the quick demo trains in the job's own process
    assert all(quick.launcher_of(s, quick.train_config(s)) == "local" for s in quick.steps if s.kind == "train")
    two = load_pipeline(DEMO, store, ["distributed.num_workers=2"])
    assert two.launcher_of(two.step("generator"), two.train_config(two.step("generator"))) == "ray"
    auto = load_pipeline(DEMO, store, ["*:launcher=auto"])  # one worker, no address: in the pipeline's process
    assert all(auto.launcher_of(s, auto.train_config(s)) == "local" for s in auto.steps if s.kind == "train")
    # refused where the pipeline is loaded (on the submitting machine), not when the step comes to run
    with pytest.raises(PipelineError, match=r"step teacher: launcher local runs one worker .* "
                                            r"distributed.num_workers=2; use launcher ray or auto"):
        load_pipeline(DEMO, store, ["*:launcher=local", "distributed.num_workers=2"])
    with pytest.raises(PipelineError, match=r"step teacher: launcher 'slurm' must be one of ray, local, auto"):
        load_pipeline(DEMO, store, ["teacher:launcher=slurm"])
    (tmp_path / "pipeline.yaml").write_text("launcher: k8s\nsteps:\n  - {name: shards, kind: shards}\n")
    with pytest.raises(PipelineError, match=r"launcher 'k8s' must be one of ray, local, auto"):
        load_pipeline(tmp_path, store)
    (tmp_path / "pipeline.yaml").write_text("steps:\n  - {name: shards, kind: shards}\n")
    assert load_pipeline(tmp_path, store).launcher == "ray"  # without the key: Ray Train, as before
    with pytest.raises(PipelineError, match=r"step samples: images=1000 must be a checkpoint of generator before "
                                            r"its end: a multiple of its ckpt_every_images=25600"):
        load_pipeline(DEMO, store, ["samples:images=1000"])
    # an eval step's precomputed statistics must be of the very images it compares against
    with pytest.raises(PipelineError) as err:
        load_pipeline(DEMO, store, ["fid:limit=500"])
    assert str(err.value) == (
        "step fid: real_stats='test_stats' holds the statistics of other real images (source fashion-mnist, split "
        "test, limit 2000, image_size 32) than this step compares against (source fashion-mnist, split test, limit "
        "500, image_size 32); give both the same source, split, limit and image_size, or drop real_stats")
    with pytest.raises(PipelineError) as err:  # and a tokenizer's originals the very images it reconstructs
        load_pipeline(DEMO, store, ["rec:limit=400"])
    assert str(err.value) == (
        "step rec: real_stats='rec_stats' holds the statistics of source fashion-mnist, split test, limit 500 at "
        "image_size 32; this step reconstructs source fashion-mnist, split test, limit 400: give both the same "
        "source, split and limit, and rec_stats the tokenizer's image_size, or drop real_stats")
    assert all(s.spec["limit"] == 100 for s in load_pipeline(DEMO, store, ["*:limit=100"]).steps
               if s.kind in ("eval", "real_stats", "eval_tokenizer"))  # the quick demo's override keeps them together


@pytest.mark.unit
def test_the_plan_names_each_steps_state_and_where_its_training_runs(tmp_path, capsys):
    from dmvae_scale.cli import main
    assert main(["pipeline", str(DEMO), "--store", str(tmp_path / "store"), "--check"]) == 0
    demo = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines() if ln[:1].isdigit()}
    # the demo says launcher: ray: every heavy step a one-CPU Ray worker
    assert demo["shards"].endswith("data/shards; ray workers: 1 tasks x 1 CPU, 0 GPU")
    assert demo["teacher"].endswith("runs/teacher (ray launcher); ray train: 1 workers x 0 GPU")
    assert demo["fid"].endswith("eval/fid; ray workers: 1 task x 1 CPU, 0 GPU")
    assert main(["pipeline", str(DEMO), "*:launcher=auto", "generator:launcher=ray", "--store",
                 str(tmp_path / "store"), "--check"]) == 0
    plan, *rest = capsys.readouterr().out.rsplit("\nsteps at once: ", 1)
    plan = plan.splitlines()
    assert len(plan) == len(load_pipeline(DEMO, str(tmp_path / "store")).steps) and all(" to run " in ln for ln in plan)
    assert rest and rest[0].startswith("up to 2 (max_concurrent")  # the demo's two steps at once
    assert plan[0].startswith("1. shards") and "launcher)" not in plan[0]
    by_name = {ln.split()[1]: ln for ln in plan}
    assert by_name["shards"].endswith("data/shards; driver (local): 1 process(es)")  # launcher: auto
    assert by_name["teacher"].endswith("runs/teacher (local launcher); driver (local): 1 worker in-process")
    assert by_name["generator"].endswith("runs/generator (ray launcher); ray train: 1 workers x 0 GPU")
    assert by_name["samples"].endswith("ray workers: 1 actors x 1 CPU, 1 GPU if the cluster has GPUs")


@pytest.mark.unit
def test_demo_on_an_s3_store_without_credentials_says_so_before_starting_anything(tmp_path, monkeypatch, capsys):
    from dmvae_scale.cli import main
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--store", "s3://bucket/demo"]) == 2
    err = capsys.readouterr().err
    assert "--store s3://bucket/demo: no S3 credentials found (set AWS_ACCESS_KEY_ID" in err
    assert not (tmp_path / "out" / "object-store").exists()


@pytest.mark.integration
def test_demo_quick_submits_the_pipeline_through_the_job_api_and_a_killed_rerun_ends_the_same(s3_bucket, tmp_path):
    from dmvae_scale.demo import QUICK
    # 1. The demo, as a user runs it: the pipeline as one Ray job, every path on the S3 server.
    out = tmp_path / "demo"
    demo = subprocess.run([sys.executable, "-m", "dmvae_scale.cli", "demo", "--quick", "--out", str(out),
                           "--store", f"{s3_bucket}/demo", *LONGER_DMD], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=1500)
    assert demo.returncode == 0, _said(demo)
    assert "[demo] submitted job raysubmit_" in demo.stdout and "[demo] done in" in demo.stdout
    # The job's driver trains and evaluates on every core (Ray starts a job's driver with OMP_NUM_THREADS=1).
    assert f"torch CPU threads: {os.cpu_count()}" in demo.stdout
    summary = json.loads((out / "summary.json").read_text())
    straight = {k: v for k, v in summary["artifacts"].items() if k in CHAIN}
    assert sorted(straight) == sorted(k for k in CHAIN if k in TRAINED)
    # The report: every number finite, every file there (issue: CI checks the quick demo's report).
    report = json.loads((out / "report" / "report" / "report.json").read_text())
    assert len(report["rows"]) == 4 and {r["latent_space"] for r in report["rows"]} == {"dmvae", "kl_vae"}
    for row in report["rows"]:
        for key in ("fid", "classifier_accuracy", "final_loss"):
            assert math.isfinite(row[key]), (row, key)
    assert len(report["tokenizers"]) == 2
    for tok in report["tokenizers"]:
        assert all(math.isfinite(tok[k]) for k in ("rfid", "psnr", "ssim")), tok
    # Four targets, each measured: classifier accuracy, gFID against the baseline (means, then the paired interval
    # over the two seeds), the teacher's linear probe (the half-budget curve is the study's: no sample step of the
    # demo takes an earlier checkpoint).
    assert [t["met"] in (True, False) for t in report["targets"]] == [True, True, True, True]
    assert report["targets"][2]["measured"].split(": ")[-1] in (
        "holds", "reversed", "not shown (interval spans 0)"), report["targets"][2]
    assert not any("half the generator's images" in t["target"] for t in report["targets"])
    assert sorted((p["name"], p["images"]) for p in report["points"]) == [
        ("generator", 64), ("generator_s1", 64), ("kl_generator", 64), ("kl_generator_s1", 64)]
    assert all(math.isfinite(p["fid"]) for p in report["points"])
    assert len(report["probes"]) == 1 and report["probes"][0]["teacher"] == "teacher"
    # fit on the quick demo's 100 training images, scored on the demo's first 2,000 test images (test_limit)
    assert (report["probes"][0]["train_images"], report["probes"][0]["test_images"]) == (100, 2000)
    assert all(0 < r["accuracy"] <= 1 for r in report["probes"][0]["results"].values())
    # The probe step's table: pooled and patch features x linear and kNN, SSL teacher against random init and pixels.
    table = report["probes"][0]["table"]
    assert sorted(table) == ["patch", "pooled"] and all(sorted(t) == ["knn", "linear"] for t in table.values())
    for cell in (c for t in table.values() for c in t.values()):
        assert all(0 <= cell[k] <= 1 for k in ("ssl", "random", "pixels"))
        assert cell["ssl_minus_random_points"] == pytest.approx(100 * (cell["ssl"] - cell["random"]))
    md = (out / "report" / "report" / "report.md").read_text()
    assert "| teacher | features | probe | SSL teacher | random init | pixels | SSL - random (points) |" in md
    assert sum(line.startswith("| teacher | p") for line in md.splitlines()) == 4  # pooled/patch x 2 probes
    for name in ("report.md", "report.html", "curves_generator_fm_loss.png", "curves_tokenizer_l1.png"):
        assert (out / "report" / "report" / name).is_file(), name
    html = (out / "report" / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6  # two plots and four grids, inlined: the page stands alone
    assert math.isfinite(summary["metrics"]["fid"]["fid"])
    # An eval step writes FD on the evaluator classifier's features, here below the rank rule: no number, the reason.
    fid0 = summary["metrics"]["fid"]
    assert fid0["fd_classifier"] is None and fid0["fd_classifier_not_computed"].startswith(
        "FD-classifier not computed: 20 samples and 100 real images for 128-d classifier features")
    assert fid0["fd_classifier_protocol"]["real_images"] == "fashion-mnist-test-100-32"
    base = f"{s3_bucket}/demo"
    # The real test images' statistics: computed once, by their own step, before the four eval steps read them.
    stats = json.loads(storage.read_bytes(f"{base}/eval/test_stats/metrics.json"))
    assert stats["num_images"] == 100 and stats["real"] == "fashion-mnist-test-100-32"
    assert storage.exists(stats["stats"]) and stats["stats"] == f"{base}/eval/.real/fashion-mnist-test-100-32.npz"
    assert _manifest(f"{base}/runs/generator/artifact")["upstream"]["tokenizer"] == straight["decoder"]
    assert _manifest(f"{base}/runs/tokenizer/artifact")["upstream"]["teacher"] == straight["teacher"]

    # 2. The same pipeline run directly, SIGKILLed (with its embedded Ray) between two checkpoints of the dmd stage.
    # The demo's job trained its one-worker steps in its own process on every core (--threads auto); so does this run.
    # Bit-equal weights need equal thread counts: a Ray Train worker (one CPU, one thread) sums in another order.
    store = f"{s3_bucket}/killed"
    cmd = [sys.executable, "-m", "dmvae_scale.cli", "pipeline", str(DEMO), *QUICK, "distributed.num_workers=1",
           *LONGER_DMD, "--store", store, "--threads", "auto", "--only", *CHAIN]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    fs, _ = storage.filesystem(store)
    checkpoints = f"{store}/runs/dmd/checkpoints".split("://", 1)[1]
    killed_at = None
    deadline = time.monotonic() + 1200
    while proc.poll() is None and time.monotonic() < deadline:
        fs.invalidate_cache()  # s3fs caches listings: look at the store as it is now
        done = fs.glob(checkpoints + "/*/manifest.json")
        if done and _manifest(f"{store}/runs/dmd/artifact") is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = sorted(done)
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    log.close()
    assert killed_at, f"the dmd stage never had a checkpoint without an artifact: {(tmp_path / 'killed.log').read_text()[-3000:]}"
    assert _manifest(f"{store}/runs/dmd/artifact") is None and _manifest(f"{store}/runs/tokenizer/artifact")

    rerun = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert rerun.returncode == 0, _said(rerun)
    assert "tokenizer (train): complete, skipped" in rerun.stdout  # done before the kill
    assert "resumed from" in rerun.stdout + rerun.stderr  # dmd continued from its checkpoint
    resumed = {name: artifact_id(_manifest(f"{store}/runs/{name}/artifact")) for name in straight}
    assert resumed == straight  # bit-identical weights: same content hashes as the uninterrupted run
    latents = json.loads(storage.read_bytes(f"{store}/latents/latents/latents.json"))
    assert latents["tokenizer"] == straight["decoder"]

    # 3. Once more: everything is complete, nothing runs.
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, _said(again)
    assert f"pipeline: 0 steps run, {len(CHAIN)} complete and skipped" in again.stdout


@pytest.mark.integration
def test_a_terminated_pipeline_checkpoints_its_in_process_step_and_the_rerun_resumes_it(tmp_path):
    # What `dmvae-scale jobs stop` (or a preempted node's SIGTERM) does to a pipeline whose step trains in its process.
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "dmvae_scale.cli", "pipeline", str(DEMO), "--store", str(store), "--only", "shards",
           "teacher", "shards:limit=256", "teacher:total_images=1024", "teacher:batch_size=16",
           "teacher:ckpt_every_images=64", "teacher:log_every_images=64"]
    log = open(tmp_path / "stopped.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    checkpoints = store / "runs" / "teacher" / "checkpoints"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and not list(checkpoints.glob("*/manifest.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    log.close()
    out = (tmp_path / "stopped.log").read_text()
    assert rc == 2, out[-3000:]
    assert "stopped on request at " in out and "run the same command again to resume" in out, out[-3000:]
    stopped_at = max(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("*/manifest.json"))
    assert 0 < stopped_at < 1024 and not (store / "runs" / "teacher" / "artifact" / "artifact.json").exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, _said(rerun)
    assert "resumed from" in rerun.stdout + rerun.stderr and "shards (shards): complete, skipped" in rerun.stdout
    assert "teacher: train done: 1024 images" in rerun.stdout
