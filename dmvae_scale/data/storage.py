"""Dataset locations: a local directory or an object-store URL (s3://bucket/prefix) through fsspec / s3fs.

Credentials come from the usual AWS variables; the endpoint of an S3-compatible store (SeaweedFS, MinIO, ...) from
S3_ENDPOINT_URL, the variable Streaming's own downloader reads too. Before any bulk transfer we check once that the
endpoint accepts connections, so an unreachable store fails in seconds with its address in the message instead of
after minutes of retries.

Transient errors of an object store (connection refused or reset, an endpoint that does not answer, HTTP 5xx,
SlowDown / throttling) are ridden out: every operation through this module, and every call of the filesystem that
`filesystem()` returns (so checkpoint uploads and manifest reads too), is retried with exponential backoff for up to
DMVAE_STORE_RETRY_S seconds (default 300). Past that, one line names the store and says that the same command resumes
(StoreUnavailableError, exit 2). Each retry is logged as `[storage] ... retrying in N s`.
"""
from __future__ import annotations

import functools
import os
import random
import re
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from dmvae_scale.errors import UserError
from dmvae_scale.private_cache import local_files

CONNECT_TIMEOUT_S = 3.0
# A small object (a JSON file, a marker) that has not moved in this long is a stuck connection, not a slow one.
SMALL_OP_TIMEOUT_S = 180.0


class StorageError(UserError):
    """A dataset location that cannot be read or written: names the URL or endpoint."""


class StoreUnavailableError(StorageError):
    """The object store kept failing with transient errors for longer than the retry budget."""


# ----------------------------------------------------------------------------------------------------------------------
# Locations a user gives: checked before anything is read
# ----------------------------------------------------------------------------------------------------------------------

SUPPORTED_SCHEMES = ("s3",)  # besides a directory path (or file://)
_S3_TYPO = re.compile(r"^s3:(?!//)/*(.*)$", re.IGNORECASE)


def check_location(url: str, key: str = "location") -> None:
    """Refuse a store URL this project cannot use, naming `key` (the flag or config key) and the fix: an unsupported
    scheme (ftp://, gs://, ...) and the s3:/bucket or s3:bucket typo of s3://bucket."""
    url = str(url)
    typo = _S3_TYPO.match(url)
    if typo:
        raise StorageError(f"{key} {url}: not an S3 URL (an S3 URL starts with s3://); did you mean "
                           f"s3://{typo.group(1)}?")
    scheme = urllib.parse.urlparse(url).scheme
    if is_remote(url) and scheme.lower() not in SUPPORTED_SCHEMES:
        raise StorageError(f"{key} {url}: unsupported store scheme {scheme}://; use s3://bucket/prefix (S3, MinIO, "
                           f"SeaweedFS through S3_ENDPOINT_URL) or a directory")


# ----------------------------------------------------------------------------------------------------------------------
# Riding out transient store errors
# ----------------------------------------------------------------------------------------------------------------------

RETRY_ENV = "DMVAE_STORE_RETRY_S"
DEFAULT_RETRY_S = 300.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 15.0
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable", "InternalError",
                    "RequestTimeout", "RequestTimeTooSkewed", "500", "502", "503", "504"}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ProxyConnectionError", "ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
                    "ServerTimeoutError", "ClientPayloadError", "IncompleteRead", "ResponseStreamingError",
                    "ConnectionError"}
_CREDENTIAL_NAMES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def retry_budget_s() -> float:
    """Seconds a store operation keeps retrying transient errors (DMVAE_STORE_RETRY_S; 0: no retries)."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StorageError(f"{RETRY_ENV}={raw}: give the seconds to retry a failing store, a number >= 0 "
                           f"(default {DEFAULT_RETRY_S:.0f})")
    return value


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """An error that a wait can cure: the store unreachable or overloaded, not a missing key or a refusal."""
    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)):
            return False
        if type(e).__name__ in _CREDENTIAL_NAMES or type(e).__name__ == "FSTimeoutError":
            return False  # FSTimeoutError: a small op silent for SMALL_OP_TIMEOUT_S is stuck, not a blip (_bounded)
        code, status = _http_status(e)
        if code or status:
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if any(m in str(e) for m in ("SlowDown", "reduce your request rate", "Service Unavailable")):
            return True
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _store_name(url: str) -> str:
    if urllib.parse.urlparse(url).scheme == "s3":
        return f"the object store {s3_endpoint() or 'https://s3.amazonaws.com'}"
    return "the store"


def _credentials_error(url: str, exc: BaseException) -> StorageError | None:
    for e in _chain(exc):
        if type(e).__name__ in _CREDENTIAL_NAMES:
            return StorageError(f"{url}: no S3 credentials found ({type(e).__name__}); set AWS_ACCESS_KEY_ID and "
                                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run on a node with an instance role), and "
                                f"S3_ENDPOINT_URL for a store other than AWS")
    return None


def with_retries(fn: Callable[..., Any], *args, url: str, what: str = "", budget_s: float | None = None,
                 **kwargs) -> Any:
    """fn(*args, **kwargs), retried with exponential backoff (0.5 s doubling to 15 s, jittered) while it fails with
    a transient store error, for up to `budget_s` (default retry_budget_s()). Past it: StoreUnavailableError, one
    line naming the store and saying that the same command resumes. Missing credentials: a StorageError naming the
    variables to set."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    wait, attempt = FIRST_BACKOFF_S, 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below; anything not transient is re-raised as it was
            cred = _credentials_error(url, exc)
            if cred is not None:
                raise cred from None
            if not is_transient(exc):
                raise
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailableError(
                    f"{_store_name(url)} kept failing for {budget:.0f} s ({what or 'access'} {url}: {_reason(exc)}); "
                    f"nothing written is lost: run the same command again to resume once the store answers (retry "
                    f"longer with {RETRY_ENV}=SECONDS)") from None
            pause = min(wait * random.uniform(0.8, 1.2), left)
            from dmvae_scale.log import say
            say("storage", f"{what or 'access'} {url}: {_reason(exc)}; retrying in {pause:.1f} s (attempt {attempt}, "
                           f"{left:.0f} s of {budget:.0f} s left)", err=True, all_ranks=True)
            time.sleep(pause)
            wait = min(wait * 2, MAX_BACKOFF_S)


# Calls of a store filesystem that are safe to repeat (a whole object read, written or listed; a delete whose
# "already gone" callers tolerate). Streams from fs.open are not retried: a reader reopens at its own level.
RETRIED_CALLS = frozenset({"cat_file", "cat", "pipe_file", "pipe", "put_file", "put", "get_file", "get", "ls", "find",
                           "exists", "info", "isdir", "isfile", "size", "du", "glob", "rm", "rm_file", "makedirs",
                           "mkdir", "touch", "checksum", "modified", "head", "tail", "copy", "cp_file"})


class RetryingFileSystem:
    """An fsspec filesystem whose repeatable calls (RETRIED_CALLS) ride out transient errors (with_retries); every
    other attribute is the filesystem's own."""

    def __init__(self, fs, url: str):
        self._fs, self._url = fs, url

    @property
    def wrapped(self):
        return self._fs

    def __getattr__(self, name: str):
        if name in ("_fs", "_url"):  # not yet set (unpickling, copy): never recurse into ourselves
            raise AttributeError(name)
        attr = getattr(self._fs, name)
        if name in RETRIED_CALLS and callable(attr):
            return functools.partial(with_retries, attr, url=self._url, what=name)
        return attr

    def __reduce__(self):
        return (RetryingFileSystem, (self._fs, self._url))  # Ray ships it to actors and workers

    def __repr__(self) -> str:
        return f"RetryingFileSystem({self._fs!r})"


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
    check_location(url)
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
    return RetryingFileSystem(fs, url), path


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
    """Copy every regular file of `local_dir` to `url/` (flat: shard files and the part index); a symlink is skipped
    with a warning, never followed."""
    fs, path = filesystem(url)  # remote: put_file retries transient errors
    for src, rel in local_files(local_dir, f"upload {url}"):
        if "/" not in rel:
            fs.put_file(src, f"{path.rstrip('/')}/{rel}")
