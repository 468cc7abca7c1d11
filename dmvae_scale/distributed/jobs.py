"""Runs as Ray jobs: `dmvae-scale submit` and `dmvae-scale jobs status|logs|stop|list`, through the Ray Job API.

A submission is checked here before anything reaches the cluster: the config is loaded and validated (a bad key fails
in a second, not after minutes in a queue), and the resolved config travels as the job's working directory, so the
job's driver runs exactly `dmvae-scale train config.yaml`, the command a laptop runs. The code comes either from this
checkout (shipped as a py_module) or from the package installed in the cluster image (`--code installed`).

Credentials: by default no object-storage keys leave this machine: the nodes use their instance role (AWS) or
workload identity (Kubernetes). Keys travel only
  - with `--ship-credentials` (`ship_credentials=True`): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    AWS_SESSION_TOKEN of this environment, meant to be short-lived session credentials, with a warning that says
    where they can be read (the job's working directory: its zip in the cluster's GCS, unpacked on every node that
    runs a process of the job, until the cluster goes);
  - by default (`ship_credentials=None`) only when the S3 endpoint of this environment is on loopback, which is the
    embedded store of `dmvae-scale demo` and the tests: its throwaway keys work for that one process on this machine
    only, and a job that is sent to a cluster that is not on loopback is refused (it could not reach the store).
`--no-credentials` (`ship_credentials=False`) sends neither keys nor the endpoint and region variables.
Shipped keys are a credentials file in the job's working directory, named by AWS_SHARED_CREDENTIALS_FILE (relative:
every process of the job runs in its own copy of that directory), not env_vars of the runtime env, which Ray's
runtime-env agent writes into its log. Nothing shown to the user carries them (everything goes through `redact`),
and they are not part of the config, so they never reach saved configs or checkpoints.

The Job API is reached on loopback through a tunnel or port-forward (cluster/README.md). Nothing secret goes over
plain http to a public host: a call is refused before it connects when it would carry the Ray token
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) or object-storage keys to an http:// address outside
loopback and the private ranges (ray_session.PRIVATE_NETWORKS; https:// is always allowed).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

from ..config import RunConfig, dump_yaml, load_config, require_inputs
from ..errors import UserError
from .ray_session import is_loopback, is_private_host, ray_token_in_use

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# What of this environment reaches the job when set: object-storage keys (as a credentials file) and the endpoint and
# region (as variables). Nothing else leaves this machine.
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
                  "AWS_SESSION_TOKEN": "aws_session_token"}
PLAIN_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL")
ENDPOINT_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIALS_FILE = ".dmvae/aws-credentials"  # inside the job's working directory
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobApiError(UserError):
    """The Job API could not be reached, refused us, or does not know the job."""


# ----------------------------------------------------------------------------------------------------------------------
# Redaction
# ----------------------------------------------------------------------------------------------------------------------

def secret_values(env: Optional[dict[str, str]] = None) -> list[str]:
    """Values of this environment's secret-looking variables (long enough to be worth hiding)."""
    env = os.environ if env is None else env
    return [v for k, v in env.items() if _SECRET_NAME.search(k) and v and len(v) >= 8]


def redact(obj: Any, secrets: Optional[Iterable[str]] = None) -> Any:
    """A copy of `obj` (str / dict / list) with secret-named env values masked and known secret strings removed."""
    secrets = sorted(set(secret_values() if secrets is None else secrets), key=len, reverse=True)
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {k: "***" if isinstance(k, str) and _SECRET_NAME.search(k) and isinstance(v, str)
                else redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------------------------

def check_address(address: str, sends_credentials: bool) -> str:
    """The Job API URL, checked before anything connects: refused when what the request carries (the Ray token,
    object-storage keys) would go over plain http to a host outside loopback and the private ranges."""
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobApiError(f"--address: expected the Job API URL, like {DEFAULT_ADDRESS} (the dashboard port), "
                          f"got {address!r}")
    carried = (["the Ray token (RAY_AUTH_MODE=token / RAY_AUTH_TOKEN)"] if ray_token_in_use() else []) + \
        (["object-storage credentials"] if sends_credentials else [])
    if carried and parsed.scheme == "http" and not is_private_host(parsed.hostname):
        raise JobApiError(f"--address {address}: refusing to send {' and '.join(carried)} over plain http to the "
                          f"public host {parsed.hostname}; forward the dashboard port and use {DEFAULT_ADDRESS}: "
                          f"`ray dashboard cluster/aws-gpu.yaml`, `ssh -L 8265:127.0.0.1:8265 HEAD` or `kubectl "
                          f"port-forward` (cluster/README.md), or give an https:// address")
    return address.rstrip("/")


def job_client(address: str):
    """A JobSubmissionClient; auth headers come from RAY_AUTH_MODE=token and RAY_AUTH_TOKEN(_PATH) when set."""
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection, auth and version errors all become one line
        raise _api_error(address, exc) from None


def _api_error(address: str, exc: Exception) -> JobApiError:
    text = redact(str(exc)).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if "uthentication" in str(exc) or "Unauthorized" in str(exc):
        return JobApiError(f"the Ray cluster at {address} requires its token: set RAY_AUTH_MODE=token and "
                           f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as in cluster/README.md ({first})")
    return JobApiError(f"cannot use the Ray Job API at {address}: {first} (is the dashboard port forwarded? see "
                       f"cluster/README.md)")


def _call(address: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # the SDK raises RuntimeError for HTTP errors (unknown job id, ...)
        raise _api_error(address, exc) from None
    except (ConnectionError, OSError) as exc:
        raise _api_error(address, exc) from None


# ----------------------------------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Submission:
    """What is sent: the command, the runtime env (with credentials: never print it unredacted), the resources."""

    entrypoint: str
    runtime_env: dict
    config: RunConfig
    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0
    metadata: dict = field(default_factory=dict)
    staging_dir: Optional[Path] = None
    # "none", "shipped" (--ship-credentials) or "loopback-store" (the default for a loopback S3 endpoint)
    credentials: str = "none"

    def describe(self) -> dict:
        return redact({"entrypoint": self.entrypoint, "runtime_env": self.runtime_env,
                       "entrypoint_num_cpus": self.entrypoint_num_cpus,
                       "entrypoint_num_gpus": self.entrypoint_num_gpus})


def _write_credentials(path: Path, keys: dict[str, str]) -> str:
    """An AWS shared-credentials file (botocore, s3fs and Streaming read it); returns its job-relative path."""
    path.parent.mkdir(mode=0o700)
    lines = ["[default]"] + [f"{CREDENTIAL_ENV[k]} = {v}" for k, v in keys.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return CREDENTIALS_FILE


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# The job package: checked before upload
# ----------------------------------------------------------------------------------------------------------------------

# Never uploaded (Ray's runtime_env `excludes`; a name matches at any depth): version control, run outputs, caches.
PACKAGE_EXCLUDES = (".git", "runs", ".cache", ".venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


def package_excludes(checkout: Optional[Path] = None) -> list[str]:
    """PACKAGE_EXCLUDES and the checkout's .gitignore entries that match at any depth (no '/' but a trailing one):
    Ray reads only ignore files inside an uploaded directory, and the checkout's is one level above the package."""
    out = list(PACKAGE_EXCLUDES)
    ignore = (checkout or package_dir().parent) / ".gitignore"
    if ignore.is_file():
        for line in ignore.read_text().splitlines():
            entry = line.strip().rstrip("/")
            if entry and not entry.startswith(("#", "!")) and "/" not in entry and entry not in out:
                out.append(entry)
    return out


def package_limit_bytes() -> int:
    """What Ray accepts for one package of a job: the dashboard's request limit (the Job API uploads through it)
    and the GCS's message limit, from the installed Ray."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging
    return min(ray_constants.DASHBOARD_CLIENT_MAX_SIZE, packaging.GCS_STORAGE_MAX_SIZE)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_package(root: Path, what: str, excludes: Iterable[str] = PACKAGE_EXCLUDES,
                  limit: Optional[int] = None) -> int:
    """The bytes of `root` Ray would upload (names matching `excludes` left out, at any depth); refused with the
    largest files named when that reaches the limit. Counted uncompressed: an upper bound of Ray's zip."""
    patterns = list(excludes)
    skip = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
    files: list[tuple[int, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip(d))
        for name in filenames:
            if not skip(name):
                path = os.path.join(dirpath, name)
                files.append((os.lstat(path).st_size, os.path.relpath(path, root)))
    total = sum(size for size, _ in files)
    limit = package_limit_bytes() if limit is None else limit
    if total >= limit:
        largest = ", ".join(f"{rel} ({_mib(size)})" for size, rel in sorted(files, reverse=True)[:5])
        raise UserError(f"{what} {root}: {_mib(total)} to upload, over Ray's limit of {_mib(limit)} per package; "
                        f"largest files: {largest}; move them out (run outputs and data belong in the store) or "
                        f"list them in a .rayignore there")
    return total


def build_submission(config: str, overrides: list[str] = (), code: str = "checkout",
                     ship_credentials: Optional[bool] = None,
                     entrypoint_num_cpus: float = 0.0, entrypoint_num_gpus: float = 0.0,
                     extra_env: Optional[dict[str, str]] = None, train_args: list[str] = ()) -> Submission:
    """Validate the run locally and stage what the job needs. Raises ConfigError before anything is sent."""
    cfg = load_config(config, list(overrides))
    require_inputs(cfg)  # an input the stage needs, missing: refused here, not after the cluster grants workers
    if cfg.teacher.remote:  # the service will be started from this config: refuse a teacher it cannot build
        from .teachers import spec_from_config
        spec_from_config(cfg)
    if code not in ("checkout", "installed"):
        raise UserError(f"--code: expected checkout or installed, got {code!r}")
    staging = Path(tempfile.mkdtemp(prefix="dmvae-job-"))
    (staging / "config.yaml").write_text(dump_yaml(cfg))
    runtime_env, credentials = _runtime_env(staging, code, ship_credentials, extra_env)
    command = ["python", "-m", "dmvae_scale.cli", "train", "config.yaml"] if code == "checkout" else \
        ["dmvae-scale", "train", "config.yaml"]
    entrypoint = shlex.join(command + list(train_args))
    return Submission(entrypoint, runtime_env, cfg, entrypoint_num_cpus, entrypoint_num_gpus,
                      metadata={"run": cfg.name, "stage": cfg.stage}, staging_dir=staging,
                      credentials=credentials)


def loopback_store_endpoint(env: Optional[dict[str, str]] = None) -> Optional[str]:
    """The S3 endpoint of `env` when every endpoint variable that is set names a loopback host, else None."""
    env = os.environ if env is None else env
    urls = [env[k] for k in ENDPOINT_ENV if env.get(k)]
    return urls[0] if urls and all(is_loopback(u) for u in urls) else None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


SHIPPED_WARNING = ("--ship-credentials: the object-storage keys travel in the job's working directory, which Ray "
                   "keeps as a zip in the cluster's GCS (readable by anyone holding the cluster's token) and unpacks "
                   "on every node that runs a process of the job (under its session directory, until the cluster "
                   "goes); ship short-lived session credentials (`aws sts get-session-token` or an assumed role: "
                   "AWS_SESSION_TOKEN set), or leave the flag out and give the nodes an instance role")


def _runtime_env(staging: Path, code: str, ship_credentials: Optional[bool],
                 extra_env: Optional[dict[str, str]] = None) -> tuple[dict[str, Any], str]:
    """The runtime env and what of the keys it carries: "none", "shipped" or "loopback-store" (module docstring)."""
    keys = {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}
    if ship_credentials is True:
        if not ("AWS_ACCESS_KEY_ID" in keys and "AWS_SECRET_ACCESS_KEY" in keys):
            raise UserError("--ship-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not both set in "
                            "this environment; set them (short-lived, with AWS_SESSION_TOKEN) or leave the flag out "
                            "to use the nodes' instance role")
        warn(SHIPPED_WARNING)
        if "AWS_SESSION_TOKEN" not in keys:
            warn("--ship-credentials: AWS_SESSION_TOKEN is not set, so these are long-lived keys; they stay "
                 "readable on the cluster after the job ends")
        credentials = "shipped"
    elif ship_credentials is None and keys and loopback_store_endpoint() is not None:
        credentials = "loopback-store"  # the embedded store's throwaway keys, for a cluster on this machine
    else:
        credentials = "none"
    env = {k: os.environ[k] for k in PLAIN_ENV if ship_credentials is not False and os.environ.get(k)}
    if credentials != "none":
        env["AWS_SHARED_CREDENTIALS_FILE"] = _write_credentials(staging / CREDENTIALS_FILE, keys)
    env.update(extra_env or {})
    excludes = package_excludes()
    runtime_env: dict[str, Any] = {"working_dir": str(staging), "env_vars": env, "excludes": excludes}
    check_package(staging, "the job's working directory", excludes)
    if code == "checkout":
        runtime_env["py_modules"] = [str(package_dir())]
        check_package(package_dir(), "the code (--code checkout)", excludes)
    return runtime_env, credentials


def build_pipeline_submission(pipe, overrides: list[str] = (), code: str = "checkout",
                              ship_credentials: Optional[bool] = None,
                              entrypoint_num_cpus: float = 0.0, entrypoint_num_gpus: float = 0.0,
                              extra_env: Optional[dict[str, str]] = None,
                              max_concurrent: Optional[int] = None) -> Submission:
    """A checked pipeline (pipeline.load_pipeline) as one job: its directory travels as the working directory
    and the job's driver runs `dmvae-scale pipeline pipeline --store URL --threads auto [overrides]` on the job's
    cluster (--max-concurrent N passed on when given). --threads auto: Ray starts a job's driver with
    OMP_NUM_THREADS=1 (measured: torch then uses one thread), and the driver is where in-process train steps and
    the evaluation run."""
    if code not in ("checkout", "installed"):
        raise UserError(f"--code: expected checkout or installed, got {code!r}")
    if not _storage_is_shared(pipe.store):
        raise UserError(f"--store {pipe.store}: a job's steps run on the cluster's nodes; give a store they all "
                        f"reach (s3://bucket/prefix) or an absolute path on a shared filesystem")
    staging = Path(tempfile.mkdtemp(prefix="dmvae-job-"))
    (staging / "pipeline").mkdir(parents=True)
    for path in pipe.config_files():  # pipeline.yaml and the stage configs beside it
        shutil.copy2(path, staging / "pipeline" / path.name)
    runtime_env, credentials = _runtime_env(staging, code, ship_credentials, extra_env)
    head = ["python", "-m", "dmvae_scale.cli"] if code == "checkout" else ["dmvae-scale"]
    entrypoint = shlex.join(head + ["pipeline", "pipeline"] + list(overrides) + ["--store", pipe.store,
                                                                                  "--threads", "auto"]
                            + (["--max-concurrent", str(max_concurrent)] if max_concurrent is not None else []))
    first = RunConfig()
    return Submission(entrypoint, runtime_env, first, entrypoint_num_cpus, entrypoint_num_gpus,
                      metadata={"run": f"pipeline {pipe.config_dir.name}", "store": pipe.store},
                      staging_dir=staging, credentials=credentials)


def _storage_is_shared(store: str) -> bool:
    return "://" in store or os.path.isabs(store)


def submit(submission: Submission, address: str, job_id: Optional[str] = None) -> str:
    """Send a checked submission; returns the job id. The staging directory is removed once uploaded."""
    try:
        sends = submission.credentials != "none"
        address = check_address(address, sends_credentials=sends)
        if submission.credentials == "loopback-store" and not is_loopback(address):
            raise JobApiError(f"--address {address}: the S3 endpoint of this environment is on this machine's "
                              f"loopback ({loopback_store_endpoint()}), which a cluster elsewhere cannot reach, so "
                              f"its keys are not sent there; set S3_ENDPOINT_URL to the store the cluster uses "
                              f"(its nodes' instance role then gives the keys), or pass --ship-credentials")
        client = job_client(address)
        return _call(address, client.submit_job, entrypoint=submission.entrypoint,
                     runtime_env=submission.runtime_env, submission_id=job_id, metadata=submission.metadata,
                     entrypoint_num_cpus=submission.entrypoint_num_cpus,
                     entrypoint_num_gpus=submission.entrypoint_num_gpus)
    finally:
        if submission.staging_dir is not None:
            shutil.rmtree(submission.staging_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# status | logs | stop | list
# ----------------------------------------------------------------------------------------------------------------------

def job_status(address: str, job_id: str) -> tuple[str, str]:
    """(status, message) of a job."""
    address = check_address(address, sends_credentials=False)
    client = job_client(address)
    info = _call(address, client.get_job_info, job_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status), redact(info.message or "")


def job_logs(address: str, job_id: str) -> str:
    address = check_address(address, sends_credentials=False)
    client = job_client(address)
    return redact(_call(address, client.get_job_logs, job_id))


def follow_logs(address: str, job_id: str, out) -> None:
    """Stream a job's logs to `out` until it ends."""
    import asyncio
    address = check_address(address, sends_credentials=False)
    client = job_client(address)
    secrets = secret_values()

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(redact(chunk, secrets))
            out.flush()
    _call(address, asyncio.run, tail())


def stop_job(address: str, job_id: str, wait_s: float = 0.0) -> str:
    """Ask the job to stop; with wait_s > 0, wait for a terminal status. Returns the status last seen."""
    address = check_address(address, sends_credentials=False)
    client = job_client(address)
    _call(address, client.stop_job, job_id)
    deadline = time.monotonic() + wait_s
    status = job_status(address, job_id)[0]
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = job_status(address, job_id)[0]
    return status


def wait_for_job(address: str, job_id: str, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(address, job_id)[0]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def list_jobs(address: str) -> list[dict]:
    """Submitted jobs, oldest first, as plain dicts (runtime env redacted)."""
    address = check_address(address, sends_credentials=False)
    client = job_client(address)
    rows = []
    for job in _call(address, client.list_jobs):
        if job.submission_id is None:  # drivers that connected directly, not jobs submitted through the API
            continue
        rows.append(redact({"job_id": job.submission_id, "status": str(getattr(job.status, "value", job.status)),
                            "entrypoint": job.entrypoint, "start_time": job.start_time or 0,
                            "metadata": job.metadata or {}, "runtime_env": job.runtime_env or {}}))
    return sorted(rows, key=lambda r: r["start_time"])


def format_jobs(rows: list[dict]) -> str:
    lines = [f"{'job id':<32} {'status':<10} {'started':<19} run"]
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"] / 1000)) if r["start_time"] else "-"
        run = r["metadata"].get("run") or r["entrypoint"]
        lines.append(f"{r['job_id']:<32} {r['status']:<10} {started:<19} {run}")
    lines.append(f"{len(rows)} jobs")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Paths that exist on the cluster; the environment a user passes
# ----------------------------------------------------------------------------------------------------------------------

# Keys of a stage config that name a location the job reads or writes (data.source only when it looks like a path:
# otherwise it is a built-in set's name).
PATH_KEYS = ("run_dir", "inputs.tokenizer", "inputs.real_score", "inputs.generator", "reference.path",
             "tokenizer.encoder.weights", "teacher.artifact", "data.source", "data.latents", "loss.perceptual_weights")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_loopback_address(address: str) -> bool:
    """A Job API on this machine's loopback: the cluster's nodes share this machine's filesystem (a tunnelled remote
    dashboard looks the same; there, declare --shared-fs or use s3://)."""
    return is_loopback(address)


def _config_value(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_cluster_location(key: str, value: str, address: str, shared_fs: Iterable[str] = ()) -> None:
    """Refuse a location that would not exist on the cluster's nodes, naming `key` and the fix: a relative path (it
    resolves inside the job's own working directory, thrown away with the job), or an absolute path on this machine
    unless it lies under a declared shared filesystem or the cluster is this machine (a loopback Job API)."""
    from ..data import storage
    value = str(value)
    if storage.is_remote(value) or value.lower().startswith("s3:"):
        storage.check_location(value, key)
        return
    fix = "use s3://bucket/prefix, or an absolute path under the shared filesystem you declare with --shared-fs DIR"
    if not os.path.isabs(os.path.expanduser(value)):
        raise UserError(f"{key} {value}: a relative path resolves inside the job's own working directory on the "
                        f"cluster and is lost with it; {fix}")
    path = os.path.normpath(os.path.expanduser(value))
    for root in shared_fs:
        root = os.path.normpath(root)
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return
    if is_loopback_address(address):
        return  # the cluster runs on this machine: its filesystem is the nodes' filesystem
    declared = f" (not under --shared-fs {' '.join(shared_fs)})" if shared_fs else ""
    raise UserError(f"{key} {value}: a path on this machine{declared}, which the nodes of the cluster at {address} do "
                    f"not see; {fix}")


def check_cluster_paths(cfg: RunConfig, address: str, shared_fs: Iterable[str] = ()) -> None:
    """Every location a submitted stage config names (PATH_KEYS) exists on the cluster (check_cluster_location)."""
    shared = check_shared_fs(shared_fs)
    for key in PATH_KEYS:
        value = _config_value(cfg, key)
        if value is None or value == "":
            continue
        if key == "data.source" and "/" not in str(value) and not str(value).startswith((".", "~")):
            continue  # a built-in set's name (fashion-mnist)
        check_cluster_location(key, value, address, shared)


def check_shared_fs(shared_fs: Iterable[str]) -> list[str]:
    out = []
    for root in shared_fs:
        if not os.path.isabs(root):
            raise UserError(f"--shared-fs {root}: give the absolute mount point of the filesystem every node and this "
                            f"machine share, e.g. --shared-fs /mnt/fsx")
        out.append(root)
    return out


def parse_env(specs: Iterable[str], environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """`--env KEY` (the value of KEY here) and `--env KEY=VALUE` as env_vars of the job. Messages name keys only."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not _ENV_NAME.match(key):
            raise UserError(f"--env {key if _ENV_NAME.match(key.strip()) else '...'}: expected KEY or KEY=VALUE with "
                            f"KEY made of letters, digits and '_' (not starting with a digit)")
        if not sep:
            if key not in environ:
                raise UserError(f"--env {key}: {key} is not set in this environment; export it or give "
                                f"--env {key}=VALUE")
            value = environ[key]
        out[key] = value
    return out


def mask_env(submission: Submission, keys: Iterable[str]) -> dict:
    """submission.describe() with the values of the passed-through variables `keys` masked too."""
    shown = submission.describe()
    env = shown.get("runtime_env", {}).get("env_vars", {})
    for k in keys:
        if k in env:
            env[k] = "***"
    return shown


def hide_values(message: str, values: Iterable[str]) -> str:
    """`message` with every passed-through value (3 characters or longer: shorter ones would mask random text)
    replaced by ***."""
    for v in sorted(set(values), key=len, reverse=True):
        if len(v) >= 3:
            message = message.replace(v, "***")
    return message
