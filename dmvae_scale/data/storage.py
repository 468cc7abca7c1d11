"""Dataset locations: a local directory or an object-store URL (s3://bucket/prefix) through fsspec / s3fs.

Credentials come from the usual AWS variables; the endpoint of an S3-compatible store (SeaweedFS, MinIO, ...) from
S3_ENDPOINT_URL, the variable Streaming's own downloader reads too. Before any bulk transfer we check once that the
endpoint accepts connections, so an unreachable store fails in seconds with its address in the message instead of
after minutes of retries.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

from dmvae_scale.errors import UserError

CONNECT_TIMEOUT_S = 3.0
# A small object (a JSON file, a marker) that has not moved in this long is a stuck connection, not a slow one.
SMALL_OP_TIMEOUT_S = 180.0


class StorageError(UserError):
    """A dataset location that cannot be read or written: names the URL or endpoint."""


def is_remote(url: str) -> bool:
    scheme = urllib.parse.urlparse(str(url)).scheme
    return bool(scheme) and scheme != "file" and len(scheme) > 1  # len > 1: not a Windows drive letter


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(url, *parts)


def s3_endpoint() -> str | None:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL")


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connect to the store behind `url`; raise StorageError naming the endpoint when it refuses."""
    if not is_remote(url):
        return
    scheme = urllib.parse.urlparse(url).scheme
    if scheme != "s3":
        return  # other stores: fsspec reports its own errors
    endpoint = s3_endpoint() or "https://s3.amazonaws.com"
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or endpoint
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise StorageError(f"cannot reach the S3 endpoint {endpoint} for {url} ({exc.strerror or exc}); "
                           f"check S3_ENDPOINT_URL and that the store is running") from None


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a local directory or a remote URL."""
    import fsspec
    if not is_remote(url):
        return fsspec.filesystem("file"), os.path.abspath(url)
    options = {}
    if urllib.parse.urlparse(url).scheme == "s3":
        endpoint = s3_endpoint()
        options = {
            "client_kwargs": {"endpoint_url": endpoint} if endpoint else {},
            # Bounded: a dead store must not hide behind minutes of botocore retries.
            "config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": 60,
                              "retries": {"max_attempts": 3, "mode": "standard"}},
        }
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def _bounded(fs, method: str, url: str, *args):
    """fs.method(*args); on an async store (S3) bounded by SMALL_OP_TIMEOUT_S, a StorageError naming `url` after."""
    if not getattr(fs, "async_impl", False):
        return getattr(fs, method)(*args)
    from fsspec.exceptions import FSTimeoutError
    try:
        return getattr(fs, method)(*args, timeout=SMALL_OP_TIMEOUT_S)
    except FSTimeoutError:
        raise StorageError(f"{url}: the store did not answer {method} within {SMALL_OP_TIMEOUT_S:.0f} s "
                           f"(endpoint {s3_endpoint() or 'default'}); rerun to resume") from None


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return _bounded(fs, "cat_file", url, path)
    except FileNotFoundError:
        raise StorageError(f"{url}: not found") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write a small file whole (object stores make the write atomic; locally we rename a temp file)."""
    if is_remote(url):
        fs, path = filesystem(url)
        _bounded(fs, "pipe_file", url, path, data)
        return
    p = Path(url)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)


def remove(url: str) -> None:
    """Delete a file or a whole tree (local or object store); nothing there is not an error."""
    fs, path = filesystem(url)
    if _bounded(fs, "exists", url, path):
        fs.rm(path, recursive=True)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return _bounded(fs, "exists", url, path)


def upload_dir(local_dir: str, url: str) -> None:
    """Copy every file of `local_dir` to `url/` (flat: shard files and the part index)."""
    fs, path = filesystem(url)
    for name in sorted(os.listdir(local_dir)):
        fs.put_file(os.path.join(local_dir, name), f"{path.rstrip('/')}/{name}")
