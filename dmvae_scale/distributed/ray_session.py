"""The one door to Ray, as data/storage.py is the one door to storage: every part of the package that needs a Ray
connection (the CLI, the training launcher, the sampler, the sweep, the teacher service, the tests' drivers) enters
`ray_session`, and nothing else calls `ray.init`.

    with ray_session(address, num_cpus=4) as session:   # session.started: True when we started an embedded Ray
        ...

What `address` means:
    already connected    this process's existing connection is used as it is, and left open after the block
    None                 inside a Ray job (RAY_ADDRESS set): the job's cluster; otherwise an embedded Ray of our own
                         (`address="local"`, never another instance running on the machine), bound to 127.0.0.1,
                         with token authentication on and a fresh random token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN
                         set in this process for the block, so its workers inherit it; the previous values come
                         back after), so another user of the machine cannot join it or run code in it
    "auto"               the cluster this machine belongs to
    "HOST:PORT", "ray://HOST:10001"   that cluster; a loopback HOST stays on loopback (Ray would otherwise resolve
                         127.0.0.1 to the machine's outward address, where nothing of ours listens)
Only what the block started is shut down at its end.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from ..errors import UserError
from ..localhost import environ

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


# Where a secret (the Ray token, object-storage keys) may travel unencrypted: loopback, and the private address ranges
# a cluster's own network uses (RFC 1918, IPv6 unique-local). Not Python's `is_private`, which also counts the
# documentation and benchmark ranges (203.0.113.0/24, 198.18.0.0/15, ...) and link-local (the instance metadata
# service's 169.254.169.254) as private.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
# Names that resolve inside a cluster or a private DNS zone only: a Kubernetes service (`raycluster-head-svc`,
# `*.svc`, `*.cluster.local`), a cloud's private zone (`*.internal`), the machine itself.
PRIVATE_NAME_SUFFIXES = (".svc", ".cluster.local", ".internal")


def is_private_host(host: str) -> bool:
    """True for a loopback or private-network address or a cluster-internal name (see PRIVATE_NETWORKS)."""
    host = host.strip("[]").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(PRIVATE_NAME_SUFFIXES)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in PRIVATE_NETWORKS)


def ray_token_in_use(env: Optional[dict] = None) -> bool:
    """Whether a Ray connection made from this environment carries a token: RAY_AUTH_MODE=token, or the mode left
    unset with a token given (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; newer Ray enables auth when it finds one)."""
    env = os.environ if env is None else env
    mode = (env.get("RAY_AUTH_MODE") or "").strip().lower()
    if mode == "disabled":
        return False
    return mode == "token" or bool(env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"))


def plaintext_to_public_host(address: str) -> Optional[str]:
    """The host of `address` when a connection to it would be unencrypted and leave the private network, else None.
    http:// and ray:// / HOST:PORT (gRPC without RAY_USE_TLS=1) are unencrypted; https:// is not."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if parsed.scheme == "https" or (parsed.scheme != "http" and os.environ.get("RAY_USE_TLS", "0") in ("1", "true")):
        return None
    host = parsed.hostname or ""
    return None if not host or is_private_host(host) else host


def check_token_transport(address: str, flag: str = "address") -> None:
    """Refuse to send the Ray token unencrypted to a public host (anyone on the path could then run code on the
    cluster). Raises UserError naming `flag` and the ways that keep the token safe; call it before connecting."""
    if address in ("auto", "local") or not ray_token_in_use():
        return
    host = plaintext_to_public_host(address)
    if host is not None:
        raise UserError(f"--{flag} {address}: refusing to send the Ray token (RAY_AUTH_MODE=token / RAY_AUTH_TOKEN) "
                        f"unencrypted to the public host {host}; forward the head's port over SSH (`ray dashboard "
                        f"cluster/aws-gpu.yaml`, or `ssh -L 8265:127.0.0.1:8265 HEAD`) or `kubectl port-forward` and "
                        f"use http://127.0.0.1:8265, or serve the dashboard over https (cluster/README.md)")


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


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def reload_auth_settings() -> None:
    """Make this process re-read RAY_AUTH_MODE (RayConfig) and the token (Ray's C++ loader caches both)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # another Ray version: new processes still read the environment
        return
    with contextlib.suppress(AttributeError):
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def embedded_token() -> Iterator[str]:
    """A fresh random Ray token in this process's environment for the block (RAY_AUTH_MODE=token), then the
    environment as it was. Ray 2.x starts a ray.init() cluster with token auth when RAY_AUTH_MODE=token, and without
    RAY_AUTH_TOKEN it would write and reuse one token for every cluster of the user in ~/.ray/auth_token."""
    token = secrets.token_hex(32)
    try:
        with environ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, remove=["RAY_AUTH_TOKEN_PATH"]):
            reload_auth_settings()
            yield token
    finally:
        reload_auth_settings()  # the variables (AUTH_ENV) are as they were again


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
    with contextlib.ExitStack() as stack:
        if address is None:
            keep_loopback()
            os.environ.setdefault("RAY_JOB_STOP_WAIT_TIME_S", JOB_STOP_WAIT_S)
            stack.enter_context(embedded_token())
            ray.init(**embedded_init_kwargs(num_cpus, num_gpus), configure_logging=False, **common)
        else:
            check_token_transport(address)
            if is_loopback(address):
                keep_loopback()
            ray.init(address=address, **common)
        try:
            yield RaySession(started=address is None, address=address)
        finally:
            ray.shutdown()
