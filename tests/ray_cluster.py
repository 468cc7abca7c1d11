"""One loopback Ray head (`ray start --head` on 127.0.0.1, token auth on) shared by the test modules that need it.

`ray_cluster` is session-scoped and reference-counted across the modules that import it, so the head starts once
and stops (by its pid, never `ray stop`) when the last user finishes. `ray_driver` connects the test process as a
driver for one module only: other modules may call ray.init() themselves.
"""
from __future__ import annotations

import pytest

from dmvae_scale.distributed.ray_local import connected, start_local_cluster

_shared = {"cluster": None, "users": 0}


@pytest.fixture(scope="session")
def ray_cluster():
    if _shared["cluster"] is None or not _shared["cluster"].alive():
        _shared["cluster"] = start_local_cluster(num_cpus=2, env={"OMP_NUM_THREADS": "1"})
    _shared["users"] += 1
    yield _shared["cluster"]
    _shared["users"] -= 1
    if _shared["users"] == 0:
        _shared["cluster"].stop()
        _shared["cluster"] = None


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    # Workers inherit the driver's env var for threads; one thread each keeps two workers on two cores.
    with connected(ray_cluster, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}):
        yield ray_cluster

