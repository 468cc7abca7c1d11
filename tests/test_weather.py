"""Issue #21 (runs that survive a cluster's weather), items 2, 4 and 5: a store outage is ridden out by retries and,
past the retry budget, ends in one line; submitted paths must exist on the cluster; --env values are never shown;
each bad input gets one line naming the value and the fix, exit 2, no traceback."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dmvae_scale.cli import main
from dmvae_scale.data import storage
from dmvae_scale.localhost import free_port

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "configs/demo/tokenizer.yaml")
PIPELINE = str(REPO / "configs/demo")
REMOTE = "http://10.0.0.5:8265"  # a Job API that is not this machine (nothing is sent: --dry-run or refused first)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one `error: ...` line on stderr and no traceback. Returns the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]  # [room] log lines aside
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------------
# Item 5: each bad input, one line
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("override, line", [
    ("optim.lr=-1", "error: optim.lr: must be > 0 (AdamW's learning rate, e.g. 1e-4), got -1.0"),
    ("optim.betas=[0.9,1.0]", "error: optim.betas: two numbers in [0, 1), e.g. [0.9, 0.95], got [0.9, 1.0]"),
    ("optim.weight_decay=-0.1", "error: optim.weight_decay: must be >= 0 (0: none), got -0.1"),
    ("optim.grad_clip=-1", "error: optim.grad_clip: must be >= 0 (0: no clipping), got -1.0"),
])
def test_optimizer_ranges_are_refused_in_one_line(capsys, override, line):
    assert one_line_error(capsys, ["config", "show", TOKENIZER, override]) == line


@pytest.mark.unit
def test_yaml_syntax_error_keeps_file_line_and_column(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: tokenizer\noptim:\n  lr: 1e-4\n   betas: [0.9, 0.95]\n")
    line = one_line_error(capsys, ["config", "show", str(bad)])
    assert line.startswith(f"error: {bad}:4:") and "not valid YAML" in line, line


@pytest.mark.unit
@pytest.mark.parametrize("store, line", [
    ("ftp://x/y", "error: --store ftp://x/y: unsupported store scheme ftp://; use s3://bucket/prefix (S3, MinIO, "
                  "SeaweedFS through S3_ENDPOINT_URL) or a directory"),
    ("s3:/bucket", "error: --store s3:/bucket: not an S3 URL (an S3 URL starts with s3://); did you mean "
                   "s3://bucket?"),
    ("s3:bucket/prefix", "error: --store s3:bucket/prefix: not an S3 URL (an S3 URL starts with s3://); did you mean "
                         "s3://bucket/prefix?"),
])
def test_bad_store_urls_are_refused_in_one_line(capsys, store, line):
    assert one_line_error(capsys, ["pipeline", PIPELINE, "--store", store, "--check"]) == line


@pytest.mark.unit
def test_s3_check_without_credentials_names_the_variables(capsys, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here: do not wait for one
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    line = one_line_error(capsys, ["pipeline", PIPELINE, "--store", "s3://bucket/p", "--check"])
    assert line.startswith("error: s3://bucket/p/") and "no S3 credentials found" in line
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line, line


@pytest.mark.unit
def test_unknown_only_step_is_refused_by_check(capsys, tmp_path):
    line = one_line_error(capsys, ["pipeline", PIPELINE, "--store", str(tmp_path / "s"), "--check",
                                   "--only", "nosuchstep"])
    assert line.startswith("error: --only nosuchstep: no such step; steps: shards, "), line


# ----------------------------------------------------------------------------------------------------------------------
# Item 4: paths that exist on the cluster, and --env
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("argv, line", [
    (["submit", TOKENIZER, "run_dir=runs/x", "--address", REMOTE],
     "error: run_dir runs/x: a relative path resolves inside the job's own working directory on the cluster and is "
     "lost with it; use s3://bucket/prefix, or an absolute path under the shared filesystem you declare with "
     "--shared-fs DIR"),
    (["submit", TOKENIZER, "run_dir=runs/x", "--address", "http://127.0.0.1:8265"],  # relative: refused on loopback too
     "error: run_dir runs/x: a relative path resolves inside the job's own working directory on the cluster and is "
     "lost with it; use s3://bucket/prefix, or an absolute path under the shared filesystem you declare with "
     "--shared-fs DIR"),
    (["submit", TOKENIZER, "run_dir=/home/me/runs/x", "--address", REMOTE],
     f"error: run_dir /home/me/runs/x: a path on this machine, which the nodes of the cluster at {REMOTE} do not see; "
     f"use s3://bucket/prefix, or an absolute path under the shared filesystem you declare with --shared-fs DIR"),
    (["submit", TOKENIZER, "run_dir=/home/me/runs/x", "--shared-fs", "/mnt/fsx", "--address", REMOTE],
     f"error: run_dir /home/me/runs/x: a path on this machine (not under --shared-fs /mnt/fsx), which the nodes of "
     f"the cluster at {REMOTE} do not see; use s3://bucket/prefix, or an absolute path under the shared filesystem "
     f"you declare with --shared-fs DIR"),
    (["submit", TOKENIZER, "run_dir=s3:/bucket/run", "--address", REMOTE],
     "error: run_dir s3:/bucket/run: not an S3 URL (an S3 URL starts with s3://); did you mean s3://bucket/run?"),
    (["submit", "pipeline", PIPELINE, "--store", "relative/dir", "--address", REMOTE],
     "error: --store relative/dir: a relative path resolves inside the job's own working directory on the cluster "
     "and is lost with it; use s3://bucket/prefix, or an absolute path under the shared filesystem you declare with "
     "--shared-fs DIR"),
    (["submit", "pipeline", PIPELINE, "--store", "/home/me/store", "--address", REMOTE],
     f"error: --store /home/me/store: a path on this machine, which the nodes of the cluster at {REMOTE} do not see; "
     f"use s3://bucket/prefix, or an absolute path under the shared filesystem you declare with --shared-fs DIR"),
    (["submit", "pipeline", PIPELINE, "--store", "/mnt/fsx/s", "--shared-fs", "mnt/fsx", "--address", REMOTE],
     "error: --shared-fs mnt/fsx: give the absolute mount point of the filesystem every node and this machine share, "
     "e.g. --shared-fs /mnt/fsx"),
    (["submit", TOKENIZER, "run_dir=s3://b/r", "--env", "DMVAE_NOT_SET_21", "--address", REMOTE],
     "error: --env DMVAE_NOT_SET_21: DMVAE_NOT_SET_21 is not set in this environment; export it or give "
     "--env DMVAE_NOT_SET_21=VALUE"),
])
def test_submit_refuses_paths_the_cluster_does_not_have(capsys, monkeypatch, argv, line):
    monkeypatch.delenv("DMVAE_NOT_SET_21", raising=False)
    assert one_line_error(capsys, argv + ["--dry-run"]) == line


@pytest.mark.unit
def test_submit_accepts_shared_fs_s3_and_loopback_paths(capsys, tmp_path):
    import json
    for argv in (["submit", TOKENIZER, "run_dir=/mnt/fsx/runs/x", "--shared-fs", "/mnt/fsx", "--address", REMOTE],
                 ["submit", TOKENIZER, "run_dir=s3://bucket/runs/x", "--address", REMOTE],
                 ["submit", TOKENIZER, f"run_dir={tmp_path}/x", "--address", "http://127.0.0.1:8265"],
                 ["submit", "pipeline", PIPELINE, "--store", "/mnt/fsx/s", "--shared-fs", "/mnt/fsx", "--address",
                  REMOTE]):
        assert main(argv + ["--dry-run"]) == 0
        sent = json.loads(capsys.readouterr().out)
        assert sent["entrypoint"]


@pytest.mark.unit
def test_env_pass_through_reaches_the_job_and_is_never_shown(capsys, monkeypatch):
    import json

    from dmvae_scale.distributed import jobs
    monkeypatch.setenv("DMVAE_TEST_PLAIN_21", "value-from-the-shell-0421")
    argv = ["submit", TOKENIZER, "run_dir=s3://bucket/runs/x", "--env", "DMVAE_TEST_PLAIN_21",
            "--env", "DMVAE_STORE_RETRY_S=900", "--env", "WANDB_API_KEY=wandb-value-abc-0421", "--address", REMOTE]
    assert main(argv + ["--dry-run"]) == 0
    out, err = capsys.readouterr()
    env = json.loads(out)["runtime_env"]["env_vars"]
    assert env["DMVAE_TEST_PLAIN_21"] == env["DMVAE_STORE_RETRY_S"] == env["WANDB_API_KEY"] == "***"
    assert "value-from-the-shell-0421" not in out + err and "wandb-value-abc-0421" not in out + err
    # what is sent carries the values
    sub = jobs.build_submission(TOKENIZER, ["run_dir=s3://bucket/runs/x"], ship_credentials=False,
                                extra_env=jobs.parse_env(["DMVAE_TEST_PLAIN_21", "DMVAE_STORE_RETRY_S=900"]))
    assert sub.runtime_env["env_vars"]["DMVAE_TEST_PLAIN_21"] == "value-from-the-shell-0421"
    assert sub.runtime_env["env_vars"]["DMVAE_STORE_RETRY_S"] == "900"
    # an error on the way out (the Job API unreachable) does not echo them either
    line = one_line_error(capsys, argv[:-1] + [f"http://127.0.0.1:{free_port()}"])
    assert line.startswith("error: cannot use the Ray Job API at http://127.0.0.1:"), line
    assert "value-from-the-shell-0421" not in line and "wandb-value-abc-0421" not in line


# ----------------------------------------------------------------------------------------------------------------------
# Item 2: store outages ridden out
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_past_the_retry_budget_one_line_names_the_store_and_says_rerun(capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused, a transient error
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "anysecret")
    monkeypatch.setenv(storage.RETRY_ENV, "3")
    t0 = time.monotonic()
    line = one_line_error(capsys, ["pipeline", PIPELINE, "--store", "s3://bucket/p", "--check"])
    assert time.monotonic() - t0 < 60
    assert line.startswith(f"error: the object store {endpoint} kept failing for 3 s (")
    assert line.endswith("nothing written is lost: run the same command again to resume once the store answers "
                         "(retry longer with DMVAE_STORE_RETRY_S=SECONDS)"), line
    assert "EndpointConnectionError" in line


@pytest.mark.unit
def test_retry_budget_must_be_a_number(monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "soon")
    with pytest.raises(storage.StorageError, match=r"^DMVAE_STORE_RETRY_S=soon: give the seconds"):
        storage.retry_budget_s()


@pytest.mark.unit
def test_retrying_filesystem_pickles_as_ray_ships_it(tmp_path):
    import pickle
    fs = storage.RetryingFileSystem(storage.filesystem(str(tmp_path))[0], str(tmp_path))
    (tmp_path / "x").write_text("weather")
    back = pickle.loads(pickle.dumps(fs))  # Ray pickles it into train workers; unpickling once recursed for ever
    assert isinstance(back, storage.RetryingFileSystem) and back.cat_file(str(tmp_path / "x")) == b"weather"


@pytest.mark.unit
def test_what_counts_as_transient():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def translated(inner):  # s3fs raises an OSError whose cause is botocore's error
        try:
            try:
                raise inner
            except Exception as e:
                raise OSError(5, str(e)) from e
        except OSError as outer:
            return outer
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(ConnectionResetError()) and storage.is_transient(ConnectionRefusedError())
    for code, status in (("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503), ("Throttling", 400)):
        assert storage.is_transient(translated(client_error(code, status))), code
    assert not storage.is_transient(FileNotFoundError("s3://b/x"))
    assert not storage.is_transient(translated(client_error("AccessDenied", 403)))
    assert not storage.is_transient(NoCredentialsError())


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    """A SeaweedFS store of the test's own (the test stops and restarts it on the same ports and directory; the
    session's store must stay up for the others), its credentials set, and a store-retry budget of 120 s."""
    from dmvae_scale.data.object_store import ObjectStore
    store = ObjectStore(tmp_path / "weed")
    store.start()
    try:
        for k, v in store.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv(storage.RETRY_ENV, "120")
        yield store
    finally:
        store.stop()


@pytest.mark.integration
def test_store_outage_mid_loop_is_ridden_out(own_store, tmp_path, capfd):
    """A write/read loop (small objects, a checkpoint-like upload through the filesystem storage hands out) while the
    SeaweedFS server is stopped for ~10 s (plus its restart) and restarted on the same ports and directory: every operation finishes,
    the data are whole, and the retries were logged."""
    store = own_store
    bucket = store.create_bucket("outage21")
    payload = {i: os.urandom(1000 + i) for i in range(40)}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rank-00000.pt").write_bytes(os.urandom(300_000))
    outage = {}

    def weather():
        time.sleep(1.0)
        store.stop()
        outage["down"] = time.monotonic()
        time.sleep(8.0)
        store.start()
        outage["up"] = time.monotonic()
    t = threading.Thread(target=weather)
    t.start()
    done_during_outage = 0
    for i, data in payload.items():
        url = f"{bucket}/loop/obj-{i:03d}"
        storage.write_bytes(url, data)
        assert storage.read_bytes(url) == data
        if i == 20:  # the checkpoint upload path: put_file of the filesystem storage.filesystem returns
            fs, root = storage.filesystem(f"{bucket}/ckpt")
            fs.put_file(str(ckpt / "rank-00000.pt"), f"{root}/img-000000000064/rank-00000.pt")
        if "down" in outage and "up" not in outage:
            done_during_outage += 1
        time.sleep(0.25)
    t.join()
    assert "up" in outage and outage["up"] - outage["down"] >= 8.0
    for i, data in payload.items():
        assert storage.read_bytes(f"{bucket}/loop/obj-{i:03d}") == data
    assert storage.read_bytes(f"{bucket}/ckpt/img-000000000064/rank-00000.pt") == \
        (ckpt / "rank-00000.pt").read_bytes()
    err = capfd.readouterr().err
    retries = [ln for ln in err.splitlines() if ln.startswith("[storage") and "retrying in" in ln]
    assert retries, err
    print("\n".join(retries[:3] + ["..."] + retries[-2:]))


@pytest.mark.integration
def test_store_stopped_30_s_mid_run_the_run_finishes_whole(own_store, tmp_path, capfd):
    """A training run (the toy stage, run_dir on s3://) while its SeaweedFS store is stopped for 30 s once the
    first checkpoint and its metrics are stored (the run's next write: checkpoint 64's upload), then restarted on
    the same ports and directory: the run rides it out (no rerun), ends `done` at exactly total_images, every
    checkpoint the store lists loads (all files, sha256 as the manifest says), and metrics.jsonl holds every log
    interval once. The store is this test's own: the session's must stay up for the other tests."""
    import json

    import test_engine_toys as toys
    from dmvae_scale.train import checkpoint as ckpt
    from dmvae_scale.train.launch import run_local
    store = own_store
    run_dir = f"{store.create_bucket('outage30')}/run"
    total, every = 160, 32  # logs and checkpoints at the same images (the checkpoint is written first)
    cfg = toys.toy_config(run_dir, "distributed.num_workers=1", f"total_images={total}",
                          f"log_every_images={every}", "ckpt_every_images=32")
    outage: dict = {}
    client = store.client()

    def weather():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "down" not in outage:
            listed = client.list_objects_v2(Bucket="outage30", Prefix="run/metrics.jsonl").get("Contents", [])
            if listed:  # checkpoint and metrics of 32 images written: the next write is checkpoint 64's upload
                store.stop()
                outage["down"] = time.monotonic()
                time.sleep(30.0)
                store.start()
                outage["up"] = time.monotonic()
                return
            time.sleep(0.2)
    t = threading.Thread(target=weather, daemon=True)
    t0 = time.monotonic()
    t.start()
    result = run_local(cfg, device="cpu", progress=False, stage_factory=toys.toy_factory(sleep_s=0.2),
                       dataset_factory=toys.vector_data)
    t.join(timeout=60)
    wall = time.monotonic() - t0
    assert "up" in outage and outage["up"] - outage["down"] >= 30.0, outage
    assert result.status == "done" and result.images_seen == total, result

    # Every checkpoint the store lists is complete and loads: each file downloaded and checked against the
    # manifest's sha256 (local_view raises a CheckpointError naming a file that does not match).
    cstore = ckpt.CheckpointStore(run_dir, cache_dir=str(tmp_path / "verify-cache"))
    objects = client.list_objects_v2(Bucket="outage30", Prefix="run/checkpoints/").get("Contents", [])
    listed = sorted({o["Key"].split("/")[2] for o in objects})  # names holding any object (pruned ones: none)
    complete = cstore.complete()
    assert [c.name for c in complete] == listed and complete[-1].images_seen == total, (listed, complete)
    for info in complete:
        local = cstore.local_view(info, verify=True)
        assert sorted(os.listdir(local)) and set(info.sha256) == set(info.files)

    # The metrics history: every log interval up to total_images, once, in the run's result and in the store.
    expected = list(range(every, total + 1, every))
    assert [int(h["images"]) for h in result.history] == expected
    rows = [json.loads(ln) for ln in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [int(r["images"]) for r in rows] == expected

    out = capfd.readouterr()
    retries = [ln for ln in (out.out + out.err).splitlines() if "retrying in" in ln]
    assert retries, out.err[-3000:]
    print(f"\nstore down {outage['down'] - t0:.1f} s -> up {outage['up'] - t0:.1f} s after the run started; "
          f"run done at {result.images_seen} images in {wall:.1f} s; checkpoints {[c.name for c in complete]}")
    print("\n".join(retries))
