"""The one door to Ray, as data/storage.py is the one door to storage: every part of the package that needs a Ray
connection (the CLI, the training launcher, the sampler, the sweep, the teacher service, the tests' drivers) enters
`ray_session`, and nothing else calls `ray.init`.

    with ray_session(address, num_cpus=4) as session:   # session.started: True when we started an embedded Ray
        ...

What `address` means:
    already connected    this process's existing connection is used as it is, and left open after the block
    None                 inside a Ray job (RAY_ADDRESS set): the job's cluster; otherwise an embedded Ray of our own
                         (`address="local"`, never another instance running on the machine), bound to 127.0.0.1
    "auto"               the cluster this machine belongs to
    "HOST:PORT", "ray://HOST:10001"   that cluster; a loopback HOST stays on loopback (Ray would otherwise resolve
                         127.0.0.1 to the machine's outward address, where nothing of ours listens)
Only what the block started is shut down at its end.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

# Ray kills a job's driver this long after `ray job stop` sends it SIGTERM (default 3 s): long enough here for the
# workers to write their stop checkpoint. Read by the Ray head's job manager (cluster files and the embedded Ray).
JOB_STOP_WAIT_S = "300"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RaySession:
    started: bool  # this block started an embedded Ray (and shuts it down)
    address: Optional[str]  # what was connected to: None for the embedded instance, else the address used


def is_loopback(address: Optional[str]) -> bool:
    if not address or address in ("auto", "local"):
        return False
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def keep_loopback() -> None:
    """Make this process treat 127.0.0.1 as loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), also when Ray was
    imported before: Ray reads the variable once, at import, into ray_constants."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with contextlib.suppress(ImportError):
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False


def embedded_init_kwargs(num_cpus: Optional[int], num_gpus: Optional[int] = None) -> dict[str, Any]:
    """ray.init's arguments for an embedded instance of our own on loopback."""
    kwargs: dict[str, Any] = {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False}
    if num_cpus is not None:
        kwargs["num_cpus"] = int(num_cpus)
    if num_gpus is not None:
        kwargs["num_gpus"] = int(num_gpus)
    return kwargs


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, *, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
                log_to_driver: bool = True, namespace: Optional[str] = None,
                runtime_env: Optional[dict] = None) -> Iterator[RaySession]:
    """Connect this process to Ray for the duration of the block (see the module's docstring). `num_cpus` and
    `num_gpus` size an embedded instance only; `namespace` and `runtime_env` apply to a new connection."""
    import ray
    if ray.is_initialized():
        yield RaySession(started=False, address=address)
        return
    if address is None and os.environ.get("RAY_ADDRESS"):  # inside a Ray job: its cluster
        address = "auto"
    common: dict[str, Any] = {"log_to_driver": log_to_driver, "namespace": namespace}
    if runtime_env is not None:
        common["runtime_env"] = runtime_env
    if address is None:
        keep_loopback()
        os.environ.setdefault("RAY_JOB_STOP_WAIT_TIME_S", JOB_STOP_WAIT_S)
        ray.init(**embedded_init_kwargs(num_cpus, num_gpus), configure_logging=False, **common)
    else:
        if is_loopback(address):
            keep_loopback()
        ray.init(address=address, **common)
    try:
        yield RaySession(started=address is None, address=address)
    finally:
        ray.shutdown()
