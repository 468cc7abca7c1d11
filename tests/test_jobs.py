"""Runs as Ray jobs on a real loopback cluster (token auth on): submit, status, logs, stop, list through the CLI; bad
configs refused before submission; object-storage credentials reach the job but no log, config or checkpoint."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from repo import DEMO, REPO
from dmvae_scale.distributed import jobs
from dmvae_scale.errors import UserError

TOKENIZER_YAML = str(DEMO / "tokenizer.yaml")
FAKE_KEY_ID = "AKIADMVAEFAKE0KEYID7"
FAKE_SECRET = "dmvae/FAKE+secret0123456789abcdefABCDEF"
TINY_RUN = ["total_images=64", "batch_size=16", "log_every_images=32", "ckpt_every_images=64"]


def cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmvae_scale.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def client_env(ray_cluster):
    """A user's shell: the cluster's token, and object-storage keys in the environment."""
    return {**os.environ, **ray_cluster.client_env(), "OMP_NUM_THREADS": "1",
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}


def api_env(ray_cluster):
    """The same for calls made from this process through the Python API."""
    from dmvae_scale.distributed.ray_local import client_of
    return client_of(ray_cluster)


@pytest.mark.integration
def test_demo_stage_runs_as_a_job_and_credentials_stay_out_of_logs(ray_cluster, client_env, tmp_path):
    url = ray_cluster.dashboard_url
    run_dir = tmp_path / "run"
    submitted = cli(["submit", TOKENIZER_YAML, *TINY_RUN, f"run_dir={run_dir}", "--train-args=--no-progress",
                     "--ship-credentials", "--address", url], client_env)
    assert submitted.returncode == 0, submitted.stderr
    assert "warning: --ship-credentials: the object-storage keys travel in the job's working directory" in \
        submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("raysubmit_")

    # A second job proves the keys arrive (botocore resolves them) without printing them: it prints a hash.
    probe = ("import botocore.session, hashlib; c = botocore.session.get_session().get_credentials(); "
             "print('sha', hashlib.sha256((c.access_key + c.secret_key).encode()).hexdigest())")
    with api_env(ray_cluster), pytest.MonkeyPatch.context() as mp:
        # Restored on the way out: the session's S3 server keys live in this same environment, and a later test
        # (the demo through the Job API) that found them deleted failed with NoCredentialsError.
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        sub = jobs.build_submission(TOKENIZER_YAML, ship_credentials=True)
        probe_id = jobs.submit(dataclasses.replace(sub, entrypoint="python -c " + shlex.quote(probe)), url)
        mp.undo()
        assert jobs.wait_for_job(url, job_id, timeout_s=240) == "SUCCEEDED", jobs.job_logs(url, job_id)[-3000:]
        assert jobs.wait_for_job(url, probe_id, timeout_s=120) == "SUCCEEDED"
        probe_logs = jobs.job_logs(url, probe_id)
    assert f"sha {hashlib.sha256((FAKE_KEY_ID + FAKE_SECRET).encode()).hexdigest()}" in probe_logs

    status = cli(["jobs", "status", job_id, "--address", url], client_env)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED")
    logs = cli(["jobs", "logs", job_id, "--address", url], client_env)
    assert "train done: 64 images, 4 steps" in logs.stdout and f"; artifact {run_dir}/artifact" in logs.stdout
    assert "python -m dmvae_scale.cli train config.yaml --no-progress" in logs.stdout
    followed = cli(["jobs", "logs", job_id, "--follow", "--address", url], client_env)  # returns: the job has ended
    assert followed.returncode == 0 and "train done: 64 images, 4 steps" in followed.stdout
    listing = cli(["jobs", "list", "--address", url], client_env)
    assert any(job_id in line and "SUCCEEDED" in line and "demo-tokenizer" in line
               for line in listing.stdout.splitlines())
    assert (run_dir / "config.yaml").is_file() and any((run_dir / "artifact").iterdir())

    # The secret is nowhere: CLI output, job logs, Ray's own logs, the run's config, checkpoints and artifact.
    needles = [FAKE_SECRET.encode(), FAKE_KEY_ID.encode()]
    for text in (submitted.stdout + submitted.stderr, status.stdout, logs.stdout, followed.stdout, listing.stdout):
        assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    scanned = [p for p in run_dir.rglob("*") if p.is_file()]
    scanned += [p for p in ray_cluster.temp_dir.glob("session_*/logs/**/*") if p.is_file()]
    assert len(scanned) > 10
    leaks = [str(p) for p in scanned if any(n in p.read_bytes() for n in needles)]
    assert leaks == []


@pytest.mark.integration
def test_a_running_job_stops_on_request(ray_cluster, client_env, tmp_path):
    url = ray_cluster.dashboard_url
    submitted = cli(["submit", TOKENIZER_YAML, "total_images=1000000", f"run_dir={tmp_path}", "--no-credentials",
                     "--address", url], client_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    with api_env(ray_cluster):
        import time
        deadline = time.monotonic() + 60
        while jobs.job_status(url, job_id)[0] != "RUNNING":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.5)
    stopped = cli(["jobs", "stop", job_id, "--wait", "60", "--address", url], client_env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id}: STOPPED"


@pytest.mark.integration
def test_a_bad_config_is_refused_before_submission(ray_cluster, client_env):
    url = ray_cluster.dashboard_url
    with api_env(ray_cluster):
        before = len(jobs.list_jobs(url))
    bad = cli(["submit", TOKENIZER_YAML, "total_imgs=64", "--address", url], client_env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown config key 'total_imgs'; did you mean total_images")
    assert len(bad.stderr.strip().splitlines()) == 1  # one line, no traceback
    # The DiT's shape arithmetic and the unused-input rules are checked here too, not on the cluster.
    generator = str(DEMO / "generator.yaml")
    for overrides, message in [
            (["score.hidden_size=100"], "error: score.hidden_size/score.num_heads: 2-D rotary embedding needs a head "
                                        "dimension divisible by 4, got 100/4=25"),
            (["inputs.real_score=s3://bucket/reference"], "error: inputs.real_score: stage 'generator' does not use "
                                                          "it; remove it")]:
        bad = cli(["submit", generator, *overrides, "--address", url], client_env)
        assert bad.returncode == 2 and bad.stderr.startswith(message), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    with api_env(ray_cluster):
        assert len(jobs.list_jobs(url)) == before


@pytest.mark.integration
def test_the_job_api_refuses_a_wrong_token(ray_cluster, client_env):
    env = {**client_env, "RAY_AUTH_TOKEN": "0" * 64}
    refused = cli(["jobs", "list", "--address", ray_cluster.dashboard_url], env)
    assert refused.returncode == 2
    assert "requires its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in refused.stderr
    assert ray_cluster.token not in refused.stderr + refused.stdout


@pytest.mark.unit
def test_submission_carries_keys_in_a_private_file_not_in_env_vars(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION"):  # set by other fixtures in the same session; passed on when set
        monkeypatch.delenv(var, raising=False)
    sub = jobs.build_submission(TOKENIZER_YAML, ["total_images=64"])
    try:
        env = sub.runtime_env["env_vars"]
        assert env == {"S3_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_SHARED_CREDENTIALS_FILE": jobs.CREDENTIALS_FILE}
        creds = sub.staging_dir / jobs.CREDENTIALS_FILE
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert f"aws_secret_access_key = {FAKE_SECRET}" in creds.read_text()
        config_text = (sub.staging_dir / "config.yaml").read_text()
        assert "total_images: 64" in config_text and FAKE_SECRET not in config_text
        assert sub.entrypoint == "python -m dmvae_scale.cli train config.yaml"
        described = json.dumps(sub.describe())
        assert FAKE_SECRET not in described and FAKE_KEY_ID not in described
    finally:
        shutil.rmtree(sub.staging_dir)
    installed = jobs.build_submission(TOKENIZER_YAML, [], code="installed", ship_credentials=False)
    shutil.rmtree(installed.staging_dir)
    assert installed.entrypoint == "dmvae-scale train config.yaml" and installed.runtime_env["env_vars"] == {}
    assert "py_modules" not in installed.runtime_env


@pytest.fixture()
def no_ray_token(monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.unit
def test_credentials_are_never_sent_over_plain_http_to_a_public_address(monkeypatch, no_ray_token):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    sub = jobs.build_submission(TOKENIZER_YAML, [], ship_credentials=True)
    with pytest.raises(jobs.JobApiError, match="refusing to send object-storage credentials over plain http"):
        jobs.submit(sub, "http://ray.example.com:8265")
    assert not sub.staging_dir.exists()  # the staged credentials file is gone even though nothing was sent
    for ok in ("http://127.0.0.1:8265", "http://10.0.3.4:8265", "http://raycluster-head-svc:8265",
               "https://ray.example.com"):
        assert jobs.check_address(ok, sends_credentials=True) == ok
    for public in ("http://203.0.113.5:8265", "http://169.254.169.254", "http://100.64.1.2:8265"):
        with pytest.raises(jobs.JobApiError, match="public host"):  # TEST-NET, link-local, CGNAT: not private
            jobs.check_address(public, sends_credentials=True)


TEST_NET = "http://203.0.113.5:8265"  # TEST-NET-3: documentation only, never a real host


@pytest.mark.unit
def test_the_ray_token_is_never_sent_over_plain_http_to_a_public_host(monkeypatch, no_ray_token):
    """Refused before connecting: the refusal is the same whether or not the host exists, and with the token unset
    the same call goes on to try the address and fails another way."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    calls = {"status": lambda: jobs.job_status(TEST_NET, "raysubmit_x"),
             "logs": lambda: jobs.job_logs(TEST_NET, "raysubmit_x"),
             "follow": lambda: jobs.follow_logs(TEST_NET, "raysubmit_x", None),
             "stop": lambda: jobs.stop_job(TEST_NET, "raysubmit_x"),
             "list": lambda: jobs.list_jobs(TEST_NET),
             "submit --no-credentials": lambda: jobs.submit(
                 jobs.build_submission(TOKENIZER_YAML, [], ship_credentials=False), TEST_NET)}
    for name, call in calls.items():
        with pytest.raises(jobs.JobApiError) as err:
            call()
        assert str(err.value).startswith(
            f"--address {TEST_NET}: refusing to send the Ray token (RAY_AUTH_MODE=token / RAY_AUTH_TOKEN) over "
            f"plain http to the public host 203.0.113.5; forward the dashboard port and use "
            f"http://127.0.0.1:8265"), name
        assert "f" * 64 not in str(err.value)
    # The same CLI refusal: one line, exit 2.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    listed = cli(["jobs", "list", "--address", TEST_NET], env)
    assert listed.returncode == 2 and "refusing to send the Ray token" in listed.stderr
    # https carries it encrypted: allowed; without a token the same http address is tried (and fails otherwise).
    assert jobs.check_address("https://203.0.113.5:8265", sends_credentials=False) == "https://203.0.113.5:8265"
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with pytest.raises(jobs.JobApiError) as err:
        jobs.list_jobs(TEST_NET)
    assert str(err.value).startswith(f"cannot use the Ray Job API at {TEST_NET}")


@pytest.mark.unit
def test_a_ray_connection_carrying_the_token_refuses_a_public_plaintext_address(monkeypatch, no_ray_token):
    from dmvae_scale.distributed.ray_session import check_token_transport, ray_session
    from dmvae_scale.errors import UserError
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    for address in ("ray://203.0.113.5:10001", "203.0.113.5:6379"):
        with pytest.raises(UserError, match=f"--address {address}: refusing to send the Ray token"):
            with ray_session(address):
                pass
    for fine in ("ray://10.0.0.7:10001", "127.0.0.1:6379", "raycluster-head-svc:6379", "auto"):
        check_token_transport(fine)
    monkeypatch.setenv("RAY_USE_TLS", "1")  # gRPC over TLS: the token is encrypted
    check_token_transport("ray://203.0.113.5:10001")
    monkeypatch.setenv("RAY_USE_TLS", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    check_token_transport("ray://203.0.113.5:10001")  # no token sent


@pytest.mark.unit
def test_keys_are_not_shipped_by_default_and_the_flag_warns_where_they_are_readable(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for var in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    default = jobs.build_submission(TOKENIZER_YAML, [])  # AWS itself, or any non-loopback endpoint: the instance role
    try:
        assert default.credentials == "none" and not (default.staging_dir / jobs.CREDENTIALS_FILE).exists()
        assert default.runtime_env["env_vars"] == {"AWS_REGION": "eu-west-1"}  # not secret: still passed on
    finally:
        shutil.rmtree(default.staging_dir)
    assert "warning" not in capsys.readouterr().err

    shipped = jobs.build_submission(TOKENIZER_YAML, [], ship_credentials=True)
    shutil.rmtree(shipped.staging_dir)
    err = capsys.readouterr().err
    assert shipped.credentials == "shipped"
    assert "Ray keeps as a zip in the cluster's GCS" in err and "unpacks on every node" in err
    assert "AWS_SESSION_TOKEN is not set, so these are long-lived keys" in err
    assert FAKE_SECRET not in err and FAKE_KEY_ID not in err

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match="--ship-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not "
                                        "both set"):
        jobs.build_submission(TOKENIZER_YAML, [], ship_credentials=True)


@pytest.mark.unit
def test_a_loopback_stores_keys_go_to_a_loopback_cluster_only(monkeypatch, no_ray_token):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9000")  # the demo's embedded store
    sub = jobs.build_submission(TOKENIZER_YAML, [])
    assert sub.credentials == "loopback-store"
    with pytest.raises(jobs.JobApiError, match=r"--address http://10\.0\.0\.5:8265: the S3 endpoint of this "
                                               r"environment is on this machine's loopback"):
        jobs.submit(sub, "http://10.0.0.5:8265")
    assert not sub.staging_dir.exists()


@pytest.mark.unit
def test_redact_masks_secret_names_and_values():
    text = jobs.redact({"env_vars": {"AWS_SECRET_ACCESS_KEY": "x" * 20, "S3_ENDPOINT_URL": "http://h"},
                        "log": f"key {FAKE_SECRET} used"}, secrets=[FAKE_SECRET])
    assert text == {"env_vars": {"AWS_SECRET_ACCESS_KEY": "***", "S3_ENDPOINT_URL": "http://h"}, "log": "key *** used"}


@pytest.mark.unit
def test_the_job_package_is_checked_before_upload_without_git_and_run_outputs(tmp_path):
    pkg = tmp_path / "pkg"
    for rel, mib in [(".git/objects/pack/big.pack", 400), ("runs/run/ckpt/zero.pt", 300), ("sub/__pycache__/m.pyc", 1),
                     ("code.py", 0), ("data/weights.bin", 0)]:
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(mib * 2**20)  # sparse: its size counts, no disk is used
    (pkg / "code.py").write_text("x = 1\n")
    limit = jobs.package_limit_bytes()
    assert limit == 100 * 2**20  # the Job API uploads through the dashboard, which takes 100 MiB per request
    assert jobs.check_package(pkg, "py_modules") == 6  # .git, runs/ and caches are not counted
    with open(pkg / "data" / "weights.bin", "wb") as f:
        f.truncate(101 * 2**20)
    with pytest.raises(UserError) as refused:
        jobs.check_package(pkg, "py_modules")
    assert str(refused.value) == (
        f"py_modules {pkg}: 101.0 MiB to upload, over Ray's limit of 100.0 MiB per package; largest files: "
        f"data/weights.bin (101.0 MiB), code.py (0.0 MiB); move them out (run outputs and data belong in the store) "
        f"or list them in a .rayignore there")
    # what is excluded from the count is excluded from the upload, and .gitignore's any-depth entries join it
    sub = jobs.build_submission(str(DEMO / "tokenizer.yaml"), ["run_dir=/tmp/r"])
    shutil.rmtree(sub.staging_dir)
    assert {".git", "runs", ".cache", "__pycache__", "*.egg-info", ".venv"} <= set(sub.runtime_env["excludes"])
    assert "/build" not in sub.runtime_env["excludes"] and "build" not in sub.runtime_env["excludes"]
