"""A real S3-compatible server for tests: moto's server process on 127.0.0.1, started once per session.

Fixtures
    s3_server   the endpoint URL; sets AWS test credentials and S3_ENDPOINT_URL for this process and its children
    s3_bucket   a fresh bucket per test, as "s3://<name>"
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        exe = shutil.which("moto_server")
        if exe is None:
            pytest.skip("moto_server not installed (pip install 'moto[server]')")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode} before serving {self.url}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def s3_server():
    server = MotoServer()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        mp.setenv("S3_ENDPOINT_URL", server.url)
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    import boto3
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"
