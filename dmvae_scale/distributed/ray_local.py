"""A Ray head on loopback for the demo, the CLI and tests: started with `ray start --head --block`, stopped by its pid.

Everything binds 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from widening that), every port is a free
one picked here (two clusters on one machine do not collide), and token authentication is on with a fresh random
token, so neither the Job API nor the GCS accepts an unauthenticated caller. Stopping sends SIGTERM to our own
`ray start --block` process, whose shutdown hook stops the processes it started; `ray stop` is never used, because it
stops every Ray process of the user on the machine, other people's clusters included.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..localhost import environ, free_ports

_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
               "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--runtime-env-agent-port", "--metrics-export-port")


@dataclass
class LocalRayCluster:
    """A running loopback head. `gcs_address` for ray.init, `dashboard_url` for the Job API."""

    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    token: Optional[str]
    process: subprocess.Popen
    log_path: Path
    _owns_temp_dir: bool = field(default=True, repr=False)

    def client_env(self) -> dict[str, str]:
        """Environment a client process needs to talk to this cluster (auth mode and token)."""
        if self.token is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM our `ray start --block`; it stops the head's processes. SIGKILL our process group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)  # the group we created (start_new_session)
                self.process.wait(10)
        if self._owns_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _dashboard_ready(url: str, token: Optional[str]) -> bool:
    req = urllib.request.Request(url + "/api/version")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_local_cluster(num_cpus: int = 2, num_gpus: int = 0, token_auth: bool = True,
                        object_store_bytes: int = 512 * 1024 ** 2, timeout_s: float = 90.0,
                        env: Optional[dict[str, str]] = None) -> LocalRayCluster:
    """Start a loopback head and wait until its Job API answers. The caller must `stop()` it (or use
    `local_cluster`)."""
    # Short root: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="dmvray-", dir="/tmp"))
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
    token = secrets.token_hex(32) if token_auth else None
    child_env = {**os.environ, **(env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    # `jobs stop` SIGTERMs a job's driver and Ray kills it 3 s later by default: too soon for the stop checkpoint.
    child_env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", "300")
    child_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"})
    child_env.pop("RAY_ADDRESS", None)
    # This interpreter's Ray (`python -m`, not a `ray` found on PATH): the head's workers then import the same
    # packages as this process, also in a virtual environment that sees another interpreter's site-packages.
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--object-store-memory={object_store_bytes}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0"]
    cmd += [f"{flag}={port}" for flag, port in ports.items()]
    log_path = temp_dir / "ray_start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    cluster = LocalRayCluster(gcs_address=f"127.0.0.1:{ports['--port']}",
                              dashboard_url=f"http://127.0.0.1:{ports['--dashboard-port']}",
                              temp_dir=temp_dir, token=token, process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            cluster.stop()
            raise RuntimeError(f"`ray start --head` exited with code {proc.returncode}:\n{tail}")
        if _dashboard_ready(cluster.dashboard_url, token):
            return cluster
        time.sleep(0.5)
    cluster.stop()
    raise RuntimeError(f"the local Ray head did not answer on {cluster.dashboard_url} within {timeout_s:.0f} s")


@contextlib.contextmanager
def local_cluster(**kwargs) -> Iterator[LocalRayCluster]:
    cluster = start_local_cluster(**kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


def _refresh_ray_process_state(loopback: bool) -> None:
    # Ray reads these once per process: the auth mode (RayConfig), the token (C++ loader) and whether "127.0.0.1"
    # means loopback (ray_constants.ENABLE_RAY_CLUSTER, read at import; on Linux it would resolve 127.0.0.1 to the
    # machine's outward address, where nothing of ours listens). Re-read / set them for this process.
    try:
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # another Ray version: new processes still read the environment
        return
    ray_constants.ENABLE_RAY_CLUSTER = not loopback
    with contextlib.suppress(AttributeError):
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


_CLIENT_ENV_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@contextlib.contextmanager
def client_of(cluster: LocalRayCluster) -> Iterator[None]:
    """Make this process a client of `cluster` (auth and loopback settings); restore the process's state after."""
    was_cluster_mode = _ray_cluster_mode()
    try:
        with environ({**cluster.client_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                     remove=["RAY_AUTH_TOKEN_PATH"]):
            _refresh_ray_process_state(loopback=True)
            yield
    finally:
        _refresh_ray_process_state(loopback=not was_cluster_mode)


def _ray_cluster_mode() -> bool:
    try:
        from ray._private import ray_constants
        return bool(ray_constants.ENABLE_RAY_CLUSTER)
    except ImportError:
        return True


@contextlib.contextmanager
def connected(cluster: LocalRayCluster, **init_kwargs) -> Iterator[None]:
    """`ray.init` this process as a driver of `cluster` for the duration of the block."""
    from .ray_session import ray_session
    with client_of(cluster), ray_session(cluster.gcs_address, **init_kwargs):
        yield
