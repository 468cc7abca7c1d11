"""The embedded Ray of `ray_session()` (no address, not inside a job): token auth with a fresh random token, every
port on 127.0.0.1, and this process's auth environment as it was after the block."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` says it runs (Ray's default temp dir)


def _tree(pid: int) -> set[int]:
    import psutil
    root = psutil.Process(pid)
    return {root.pid} | {p.pid for p in root.children(recursive=True)}


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of the listening TCP sockets of `pids`; an IPv6 socket bound to ::ffff:127.0.0.1 (IPv4-mapped
    loopback, reachable from loopback only) is written as 127.0.0.1."""
    import ipaddress

    import psutil
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            ip = ipaddress.ip_address(c.laddr.ip)
            found.add((str(getattr(ip, "ipv4_mapped", None) or ip), c.laddr.port))
    return found


def test_embedded_ray_has_token_auth_with_a_fresh_token_and_listens_on_loopback_only(monkeypatch):
    import ray

    from dmvae_scale.distributed.ray_session import ray_session
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # what the user had: comes back after the block
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    tokens = []
    # This process may already listen from earlier tests (a gloo TCPStore binds ::); only what Ray opens counts.
    before = _listening({os.getpid()})
    for _ in range(2):
        with ray_session(num_cpus=1, log_to_driver=False) as session:
            assert session.started
            token = os.environ["RAY_AUTH_TOKEN"]
            tokens.append(token)
            assert os.environ["RAY_AUTH_MODE"] == "token" and len(token) == 64
            gcs = ray.get_runtime_context().gcs_address
            if len(tokens) == 1:
                import psutil
                ray_pids = set()
                for proc in psutil.process_iter(["environ"]):  # the embedded Ray's processes carry its token
                    try:
                        if (proc.info["environ"] or {}).get("RAY_AUTH_TOKEN") == token and proc.pid != os.getpid():
                            ray_pids |= _tree(proc.pid)
                    except psutil.Error:
                        continue
                ports = _listening(ray_pids | {os.getpid()}) - before
                assert ports, "no listening socket found for the embedded Ray"
                assert {ip for ip, _ in ports} == {"127.0.0.1"}, ports
                join = f"import ray; ray.init(address={gcs!r}); print('joined')"
                for given, joins in (("0" * 64, False), (token, True)):
                    env = {**os.environ, "RAY_AUTH_TOKEN": given, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
                    env.pop("RAY_ADDRESS", None)
                    run = subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, text=True,
                                         timeout=120)
                    assert ("joined" in run.stdout) is joins, run.stderr[-2000:]
        assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ
    assert tokens[0] != tokens[1]  # fresh per instance, not ~/.ray/auth_token


def test_another_ray_instance_on_the_machine_does_not_change_the_embedded_one(monkeypatch, tmp_path):
    """Issue #21: with a Ray head already running here (started the usual way, so a plain `ray.init()` would join it
    through /tmp/ray/ray_current_cluster), `ray_session()` still starts its own instance with the resources asked
    for, and the other head keeps running, untouched."""
    import ray

    from dmvae_scale.distributed.ray_session import ray_session
    from dmvae_scale.localhost import free_port
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "other-head.log", "w")
    other = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                              f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                              "--num-cpus=3", "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        # Wait until the head has registered itself where a plain ray.init() looks (a file an earlier head may have
        # left naming a dead address: probing before would hang on it), then check that ray.init() joins it.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and other.poll() is None:
            if CURRENT_CLUSTER.is_file() and CURRENT_CLUSTER.read_text().strip() == f"127.0.0.1:{port}":
                break
            time.sleep(0.5)
        probe = "import ray; ray.init(); print('joined', ray.get_runtime_context().gcs_address)"
        run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert f"joined 127.0.0.1:{port}" in run.stdout, (tmp_path / "other-head.log").read_text()[-2000:]
        with ray_session(num_cpus=1, log_to_driver=False) as session:
            assert session.started
            assert ray.get_runtime_context().gcs_address != f"127.0.0.1:{port}"
            assert ray.cluster_resources().get("CPU") == 1.0  # ours, not the other head's 3
        assert other.poll() is None  # the other instance is left running
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        try:
            other.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait(30)
        log.close()
        if CURRENT_CLUSTER.is_file() and CURRENT_CLUSTER.read_text().strip() == f"127.0.0.1:{port}":
            CURRENT_CLUSTER.unlink()  # the stopped head's address: leave no stale pointer behind


def test_ray_workers_take_as_many_torch_threads_as_cpus_reserved_not_what_the_raylet_inherited(monkeypatch):
    """A raylet started from a process with OMP_NUM_THREADS=2 passes it to every worker: two one-CPU generators on 2
    cores then ran at 84 img/s each against 324 with one thread each. Each worker sets its own count."""
    import ray

    from dmvae_scale.distributed.placement import threads_as_reserved
    from dmvae_scale.distributed.ray_session import ray_session
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads_as_reserved() == 0 or ray.is_initialized()  # outside Ray: left alone

    def _threads_in_worker():  # defined here: shipped by value (the workers cannot import this test module)
        import os

        import torch

        from dmvae_scale.distributed.placement import threads_as_reserved
        return threads_as_reserved(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    with ray_session(num_cpus=2, log_to_driver=False):
        task = ray.remote(_threads_in_worker)
        inherited = ray.get(ray.remote(num_cpus=1)(lambda: os.environ.get("OMP_NUM_THREADS")).remote())
        assert inherited == "2"  # what a worker would run with: the raylet's environment
        assert ray.get(task.options(num_cpus=1).remote()) == (1, 1, "1")
        assert ray.get(task.options(num_cpus=0.5).remote()) == (1, 1, "1")
        assert ray.get(task.options(num_cpus=2).remote()) == (2, 2, "2")
        assert ray.get(task.options(num_cpus=0).remote())[0] == 0  # nothing reserved: left as it was
