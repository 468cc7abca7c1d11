"""The embedded object store (SeaweedFS): loopback only, its data survives a restart on the same directory, and stop
leaves no process or socket behind."""
import os
from pathlib import Path

import pytest

from dmvae_scale.data.object_store import ObjectStore

pytestmark = pytest.mark.integration


def _listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets in LISTEN state that process `pid` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addr, port = local.split(":")
                found.add((addr if width == 32 else ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)),
                           int(port, 16)))
    return found


def test_store_binds_loopback_only_keeps_data_across_restarts_and_stops_clean(tmp_path):
    store = ObjectStore(tmp_path / "store")
    with store:
        pid = store.proc.pid
        ports = _listening_ports(pid)
        assert {p for _, p in ports} == set(store.ports.values())  # our free ports, nothing at a fixed default
        assert {a for a, _ in ports} == {"127.0.0.1"}
        url = store.create_bucket("keep")
        store.client().put_object(Bucket="keep", Key="a/b.txt", Body=b"still here")
    assert url == "s3://keep"
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not [p for p in Path("/tmp").glob("seaweedfs-*.sock")
                if any(str(port) in p.name for port in store.ports.values())]

    again = ObjectStore(tmp_path / "store")  # new ports, same directory
    with again:
        body = again.client().get_object(Bucket="keep", Key="a/b.txt")["Body"].read()
    assert body == b"still here"


def test_store_refuses_a_client_without_its_fresh_keys_and_serves_one_with_them(tmp_path):
    import stat
    import urllib.error
    import urllib.request

    import botocore.exceptions
    store, other = ObjectStore(tmp_path / "store"), ObjectStore(tmp_path / "other")
    assert store.secret_key != other.secret_key and store.access_key != other.access_key  # never a constant
    with store:
        assert stat.S_IMODE(store.identity_path.stat().st_mode) == 0o600
        store.create_bucket("keys")
        store.client().put_object(Bucket="keys", Key="k.txt", Body=b"mine")
        assert store.client().get_object(Bucket="keys", Key="k.txt")["Body"].read() == b"mine"
        for access, secret in ((other.access_key, other.secret_key), (store.access_key, other.secret_key),
                               ("dmvae", "dmvae-secret")):  # another store's keys, a wrong secret, the old constants
            with pytest.raises(botocore.exceptions.ClientError) as err:
                store.client(access, secret).get_object(Bucket="keys", Key="k.txt")
            assert err.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                           "AccessDenied")
        with pytest.raises(urllib.error.HTTPError) as anonymous:  # unsigned
            urllib.request.urlopen(f"{store.url}/keys/k.txt", timeout=10)
        assert anonymous.value.code == 403
        assert store.secret_key not in store.log_path.read_text(errors="replace")
        assert store.env()["AWS_SECRET_ACCESS_KEY"] == store.secret_key
    assert not store.identity_path.exists()  # the keys file goes with the server


def test_the_tests_s3_client_signs_with_the_keys_set_now_not_the_first_ones(s3_server, monkeypatch):
    """boto3's default session keeps the keys it saw at its first client; tests/s3_server.s3_client must not (an earlier
    test's fake keys made the Streaming restart tests' CreateBucket fail with InvalidAccessKeyId in CI)."""
    import boto3

    from s3_server import s3_client
    right = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a process whose first boto3 client saw other keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "FAKEKEYFROMANOTHERTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    stale = boto3.client("s3", endpoint_url=s3_server)
    for k, v in right.items():
        monkeypatch.setenv(k, v)
    assert boto3.client("s3", endpoint_url=s3_server)._request_signer._credentials.access_key == \
        "FAKEKEYFROMANOTHERTEST"  # the trap: still the first keys
    assert stale is not None
    s3_client(s3_server).create_bucket(Bucket="signed-with-the-keys-set-now")
    names = [b["Name"] for b in s3_client(s3_server).list_buckets()["Buckets"]]
    assert "signed-with-the-keys-set-now" in names


def test_each_new_bucket_takes_one_volume_slot_and_deleting_it_gives_the_slot_back(tmp_path):
    """SeaweedFS grows 7 volumes for a bucket's first write by default: with ~300 slots (free disk / volume size) the
    43rd bucket's first write failed with InternalError (CI, the suite's per-test buckets). The store grows one."""
    import json
    import time
    import urllib.request

    store = ObjectStore(tmp_path / "store")
    with store:
        def topology() -> dict:
            url = f"http://127.0.0.1:{store.ports['master']}/dir/status"
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)["Topology"]

        def free_slots_once(ok) -> int:
            """The master's free volume count once `ok(free)` holds (heartbeats bring it in a few seconds)."""
            deadline = time.monotonic() + 30
            while True:
                top = topology()
                if (top["Max"] > 0 and ok(top["Free"])) or time.monotonic() > deadline:
                    return top["Free"]
                time.sleep(0.2)

        client = store.client()
        before = free_slots_once(lambda free: True)
        assert before >= 10, f"too little free disk for this test: {before} volume slots"
        for name in ("one", "two", "three"):
            store.create_bucket(name)
            client.put_object(Bucket=name, Key="k", Body=b"x")
        assert before - free_slots_once(lambda free: before - free >= 3) == 3
        client.delete_object(Bucket="two", Key="k")
        client.delete_bucket(Bucket="two")
        assert before - free_slots_once(lambda free: before - free <= 2) == 2
