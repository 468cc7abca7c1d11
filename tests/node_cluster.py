"""A simulated multi-node cluster for the tests that lose, add or place work on nodes: `ray.cluster_utils.Cluster`
(separate raylets in one process tree, all on 127.0.0.1): a head with 0 CPUs, the driver's node, and two one-CPU worker
nodes. This process is its driver; S3 credentials and the test endpoint reach the workers through the runtime env.
"""
from __future__ import annotations

import os
import time

import pytest

import test_engine_toys as toys
from dmvae_scale.distributed.ray_session import keep_loopback
from dmvae_scale.localhost import environ, free_ports


@pytest.fixture
def node_cluster(s3_server):
    """A head with 0 CPUs (the driver's node: Ray Train's controller and our control actor live here) and two
    one-CPU worker nodes, all on 127.0.0.1; this process is its driver. Yields (cluster, [worker nodes])."""
    import ray
    from ray.cluster_utils import Cluster
    ray.cloudpickle.register_pickle_by_value(toys)  # workers do not import the tests directory
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    with environ(env):
        keep_loopback()  # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import; 127.0.0.1 must stay loopback
        port, = free_ports(1)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "gcs_server_port": port, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                               "health_check_initial_delay_ms": 1000}})
        nodes = []
        try:
            nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=True,
                     runtime_env={"env_vars": {k: os.environ[k] for k in (
                         "OMP_NUM_THREADS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "S3_ENDPOINT_URL",
                         "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}})
            yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


