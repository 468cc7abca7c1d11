"""A real S3 server for tests: SeaweedFS (dmvae_scale.data.object_store, the demo's embedded store) on 127.0.0.1,
started once per session.

Fixtures
    s3_server   the endpoint URL; sets the store's credentials and S3_ENDPOINT_URL for this process and its children
    s3_bucket   a fresh bucket per test, as "s3://<name>"

Helpers
    s3_client(endpoint)   a boto3 client on a fresh session that reads this process's keys now

No test needs moto any more: everything the tests do (objects, listings, deletes, Streaming's downloads, s3fs) runs
against SeaweedFS.
"""
from __future__ import annotations

import uuid

import pytest

from dmvae_scale.data.object_store import ObjectStore, free_port  # noqa: F401  (free_port: used by other tests)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    store = ObjectStore(tmp_path_factory.mktemp("seaweedfs"))
    try:
        store.start()
    except Exception as exc:  # a missing `weed` is a set-up error, reported as one
        pytest.fail(f"cannot start the SeaweedFS test server: {exc}")
    _ENVS[store.url] = store.env()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in store.env().items():
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        try:
            yield store.url
        finally:
            store.stop()


_ENVS: dict[str, dict[str, str]] = {}  # server url -> its endpoint and keys


def s3_client(endpoint: str):
    """An S3 client that uses the keys in this process's environment now. `boto3.client` would not: boto3's default
    session resolves its credentials once, at its first client, and keeps them, so a test that had set other keys
    (tests/test_jobs.py's fake ones, another test's own store) before the first boto3.client call in the process made
    every later one sign with those (seen in CI as InvalidAccessKeyId at CreateBucket)."""
    import boto3
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    # The server's endpoint and keys again for this test: one an earlier test left changed in this process (seen in
    # CI as InvalidAccessKeyId) must not fail the tests after it.
    for k, v in _ENVS.get(s3_server, {}).items():
        monkeypatch.setenv(k, v)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    _delete_bucket(client, name)


def _delete_bucket(client, name: str) -> None:
    """Empty and delete a test's bucket: each bucket holds a SeaweedFS volume slot (~300 on 80 GB free) until it goes,
    and the suite makes more buckets than that over a run. A test that changed the keys or broke the bucket on
    purpose leaves it; the slot is then lost, the test is not failed for it."""
    import botocore.exceptions
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        pass
