"""Durable checkpoint writes: files flushed to disk before a manifest vouches for them and hashed for it, each one
early (on a background thread while the next is written), torch.save without the zip CRC32, and parallel
object-store transfers.

Writers report a finished file through `file_written(path)`; the engines' checkpoint writer gets it as a callback
(deepspeed_engine.build_engines(on_file_saved=...)), so this module imports nothing of the training code.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from .integrity import sha256_file


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(path: str, flush: bool) -> str:
    if flush:
        fsync_path(path)
    return sha256_file(path)  # read back from the page cache it was just written to


class _EarlyFlush:
    """While a worker writes its checkpoint files, each finished file is hashed (the sha256 the manifest lists)
    and, for a local store, fsynced, on a background thread, so that work overlaps writing the next file (a stage
    has several engines, each with two or more files; hashlib runs without the GIL). Leaving `writing_checkpoint`
    waits for them, so the store's sync() before the manifest finds the files already on disk."""

    def __init__(self):
        self.active = False
        self.flush = False
        self._pool = None
        self._pending: list = []

    def written(self, path: str) -> None:
        if not self.active:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="checkpoint-fsync")
        self._pending.append((os.path.abspath(path), self._pool.submit(_finish, path, self.flush)))

    def drain(self) -> dict[str, str]:
        """{absolute path: sha256} of the files reported since the last drain; the first error raises."""
        pending, self._pending = self._pending, []
        return {path: future.result() for path, future in pending}


_EARLY_FLUSH = _EarlyFlush()


@dataclass
class WrittenFiles:
    """What `writing_checkpoint` yields: filled when the block is left with {absolute path: sha256} of every file
    reported through file_written."""

    sha256: dict[str, str] = field(default_factory=dict)


def file_written(path: str) -> None:
    """A checkpoint file is complete (called by the writers: DeepSpeed's checkpoint engine, the worker state)."""
    _EARLY_FLUSH.written(path)


@contextlib.contextmanager
def writing_checkpoint(remote: bool):
    """Around a worker's writing of its checkpoint files: torch.save without the zip CRC32 (see without_zip_crc32),
    background hashing of every reported file and, for a local store, early background fsyncs (_EarlyFlush).
    Object-store saves stage to local disk and upload, so their staged files need no flush. Yields a WrittenFiles,
    whose hashes are there once the block is left."""
    written = WrittenFiles()
    with without_zip_crc32():
        _EARLY_FLUSH.active, _EARLY_FLUSH.flush = True, not remote
        try:
            yield written
        finally:
            _EARLY_FLUSH.active = False
            # a flush or hash error raises here, and fails the save on every worker
            written.sha256.update(_EARLY_FLUSH.drain())


@contextlib.contextmanager
def without_zip_crc32():
    """torch.save without the CRC32 its zip writer computes for every record.

    Measured here (2 CPU cores): the CRC32 runs at ~0.6 GB/s on one core and was 80% of a 0.5 GB checkpoint's save
    time, and torch.load never checks it. What a resume relies on is the manifest (written last, after every file
    is flushed, listing each file's size and sha256), not the zip's checksums. Scoped: other torch.save calls of the
    process keep the default."""
    from torch.utils.serialization import config
    with config.patch({"save.compute_crc32": False}):
        yield


TRANSFER_THREADS = 8  # concurrent object-store transfers (one file each)


def parallel(fn, items: list) -> None:
    """Run fn over items on a few threads (object-store round trips overlap); the first error is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()

