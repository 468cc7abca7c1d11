"""One loopback Ray head (`ray start --head` on 127.0.0.1, token auth on) shared by the test modules that need it.

`ray_cluster` is session-scoped and reference-counted across the modules that import it, so the head starts once
and stops (by its pid, never `ray stop`) when the last user finishes. `ray_driver` connects the test process as a
driver for one module only: other modules may call ray.init() themselves.
"""
from __future__ import annotations

import os

import pytest

from dmvae_scale.distributed.ray_local import connected, start_local_cluster

_shared = {"cluster": None, "users": 0}
CLUSTER_HIDDEN_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                       "AWS_REGION", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def ray_cluster():
    if _shared["cluster"] is None or not _shared["cluster"].alive():
        # The head must not inherit credentials another fixture put in this process (the S3 server's test keys):
        # jobs would see them instead of the ones their submission carries.
        saved = {k: os.environ.pop(k) for k in CLUSTER_HIDDEN_VARS if k in os.environ}
        try:
            _shared["cluster"] = start_local_cluster(num_cpus=2, env={"OMP_NUM_THREADS": "1"})
        finally:
            os.environ.update(saved)
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

