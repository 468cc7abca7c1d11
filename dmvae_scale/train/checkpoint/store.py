"""The checkpoint store of a run (the files): layout, manifest written last, "latest complete", keep-last-k,
staging and upload to an object store, the local view of a remote checkpoint. What a checkpoint means is meaning.py;
what goes into one, and when, is the manager's (manager.py).

    <run_dir>/checkpoints/img-000000012800/
        engines/<model>/zero/...      each engine's DeepSpeed ZeRO shards (every worker writes its own)
        ranks/rank-00000.pt           per worker: the state of every part (loop counters, EMA partition, data
                                      reader, RNG, the stage's own state)
        config.yaml                   the resolved config of the run
        manifest.json                 written LAST, by rank 0, once every worker's files are in place: lists
                                      every file with its size, the counters and what the checkpoint means

A directory without a manifest, or whose files do not match the manifest's sizes (an upload cut short, a deleted
shard), is never a candidate: "latest" is the complete checkpoint with the most images seen, never chosen by file
time or size. The run directory can be local (a shared filesystem when workers span nodes) or an object store URL
(s3://...): then workers write to a local staging directory and upload, and a resume downloads to a local cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ...data import storage
from ...errors import UserError
from .durable import fsync_path, parallel

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"^img-(\d{12})$")



class CheckpointError(UserError):
    """A checkpoint that cannot be written or read; names the checkpoint and the file."""


@dataclass
class CheckpointInfo:
    url: str
    name: str
    images_seen: int
    step: int
    world_size: int
    zero_stage: int
    engines: list[str]
    files: dict[str, int]
    meaning: dict[str, Any]
    config_hash: str
    upstream: dict[str, str] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    format: int = CHECKPOINT_FORMAT


def checkpoint_name(images_seen: int) -> str:
    return f"img-{images_seen:012d}"


# ----------------------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------------------

class CheckpointStore:
    """The checkpoints of one run directory (local path or s3:// URL)."""

    def __init__(self, run_dir: str, keep: int = 3, cache_dir: str | None = None):
        if keep < 1:
            raise CheckpointError(f"keep_checkpoints: must be at least 1, got {keep}")
        self.run_dir = run_dir
        self.root = storage.join(run_dir, "checkpoints")
        self.keep = keep
        self.remote = storage.is_remote(run_dir)
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "dmvae-ckpt", digest)
        self._pruning: threading.Thread | None = None
        self._prune_error: BaseException | None = None

    # -- reading -----------------------------------------------------------------------------------------------------
    def url(self, name: str) -> str:
        return storage.join(self.root, name)

    def _fs(self):
        return storage.filesystem(self.root)

    def _names(self) -> list[str]:
        fs, root = self._fs()
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (os.path.basename(e.rstrip("/")) for e in entries) if _NAME.match(n))

    def read_manifest(self, name: str) -> CheckpointInfo | None:
        """The manifest of `name` if present and readable, else None."""
        fs, root = self._fs()
        path = f"{root.rstrip('/')}/{name}/{MANIFEST}"
        try:
            raw = json.loads(fs.cat_file(path))
            raw["url"] = self.url(name)
            info = CheckpointInfo(**raw)
        except (FileNotFoundError, json.JSONDecodeError, TypeError, UnicodeDecodeError):
            return None
        return info if info.format == CHECKPOINT_FORMAT else None

    def _files(self, name: str) -> dict[str, int]:
        fs, root = self._fs()
        base = f"{root.rstrip('/')}/{name}"
        try:
            found = fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, meta in found.items():
            if meta.get("type", "file") != "file":
                continue
            rel = path[len(base.rstrip("/")) + 1:] if path.startswith(base) else path.split(f"/{name}/", 1)[-1]
            out[rel] = int(meta.get("size") or 0)
        return out

    def verify(self, info: CheckpointInfo) -> str | None:
        """None when every file the manifest lists is present with its size; else what is wrong."""
        present = self._files(info.name)
        for rel, size in info.files.items():
            if rel not in present:
                return f"{rel} is missing"
            if present[rel] != size:
                return f"{rel} has {present[rel]} bytes, the manifest says {size}"
        return None

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (by images seen); waits for a background prune first."""
        self.wait()
        out = []
        for name in self._names():
            info = self.read_manifest(name)
            if info is not None and self.verify(info) is None:
                out.append(info)
        return sorted(out, key=lambda i: i.images_seen)

    def latest(self) -> CheckpointInfo | None:
        done = self.complete()
        return done[-1] if done else None

    # -- writing ----------------------------------------------------------------------------------------------------
    def staging_dir(self, name: str, rank: int) -> str:
        """Where a worker writes its files: the checkpoint directory itself locally, a per-rank temp dir remotely."""
        if not self.remote:
            return self.url(name)
        return os.path.join(self.cache_dir, "staging", name, f"rank-{rank:05d}")

    def remove(self, name: str) -> None:
        """Delete a checkpoint: manifest first, so a half-deleted one is never taken for complete."""
        fs, root = self._fs()
        base = f"{root.rstrip('/')}/{name}"
        try:
            fs.rm_file(f"{base}/{MANIFEST}")
        except FileNotFoundError:
            pass
        try:
            fs.rm(base, recursive=True)
        except FileNotFoundError:
            pass

    def prepare(self, name: str) -> None:
        """Rank 0, before a save: finish a background prune, clear a leftover directory of the same name (an
        earlier, interrupted save)."""
        self.wait()
        self.remove(name)
        if self.remote:
            shutil.rmtree(os.path.join(self.cache_dir, "staging", name), ignore_errors=True)
        else:
            os.makedirs(self.url(name), exist_ok=True)

    def upload(self, name: str, rank: int) -> None:
        """Remote store: copy this worker's staged files into the checkpoint (in parallel), then drop the copy."""
        if not self.remote:
            return
        local = self.staging_dir(name, rank)
        fs, root = self._fs()
        base = f"{root.rstrip('/')}/{name}"
        pairs = []
        for dirpath, _, files in os.walk(local):
            for f in files:
                src = os.path.join(dirpath, f)
                pairs.append((src, f"{base}/{os.path.relpath(src, local).replace(os.sep, '/')}"))
        parallel(lambda pair: fs.put_file(*pair), pairs)
        shutil.rmtree(local, ignore_errors=True)

    def sync(self, name: str) -> None:
        """Local store: flush every file of the checkpoint to disk before the manifest vouches for it (a crash after
        the manifest must not leave it pointing at data still in the page cache). Object stores: uploads are durable
        once they return."""
        if self.remote:
            return
        base = self.url(name)
        for dirpath, _, files in os.walk(base):
            for f in files:  # mostly flushed already while they were written (writing_checkpoint): cheap then
                fsync_path(os.path.join(dirpath, f))

    def write_manifest(self, name: str, *, images_seen: int, step: int, world_size: int, zero_stage: int,
                       engines: list[str], meaning: dict[str, Any], config_hash: str,
                       upstream: dict[str, str] | None = None, counters: dict[str, Any] | None = None
                       ) -> CheckpointInfo:
        """Rank 0, after every worker's files are in place: list them with sizes, write the manifest last."""
        files = {rel: size for rel, size in self._files(name).items() if rel != MANIFEST}
        if not files:
            raise CheckpointError(f"{self.url(name)}: no files were written; refusing to mark it complete")
        info = CheckpointInfo(url=self.url(name), name=name, images_seen=images_seen, step=step,
                              world_size=world_size, zero_stage=zero_stage, engines=sorted(engines), files=files,
                              meaning=meaning, config_hash=config_hash, upstream=dict(upstream or {}),
                              counters=dict(counters or {}), created=time.time())
        body = asdict(info)
        body.pop("url")
        storage.write_bytes(storage.join(self.url(name), MANIFEST), json.dumps(body, indent=1).encode())
        return info

    def prune(self, background: bool = False) -> list[str]:
        """Keep the newest `keep` complete checkpoints; delete older ones and every incomplete leftover.

        What to delete is decided now; with background=True the deleting runs on a thread, so training goes on
        while a large old checkpoint is removed (on local disk that was a quarter of a save's time; on an object
        store it is one request per file). `wait()` joins it; the next save waits for it before it starts, so a
        deletion never overlaps the writing of a new checkpoint. Deleting removes the manifest first: a deletion
        cut short leaves an incomplete directory that is never resumed from, and the next prune removes it. A
        failed deletion is reported by wait() as a warning, not raised."""
        done = self.complete()  # joins an earlier background prune first
        keep = {i.name for i in done[-self.keep:]}
        removed = [name for name in self._names() if name not in keep]
        if not background:
            for name in removed:
                self.remove(name)
            return removed

        def run():
            try:
                for name in removed:
                    self.remove(name)
            except BaseException as exc:  # reported by wait(), on the training thread
                self._prune_error = exc

        self._pruning = threading.Thread(target=run, name="checkpoint-prune", daemon=True)
        self._pruning.start()
        return removed

    def wait(self) -> str | None:
        """Join a background prune. If its deleting failed, log a warning and return the message: old checkpoints
        are housekeeping, so a run goes on (the next prune retries them) rather than stopping on one worker."""
        thread, self._pruning = self._pruning, None
        if thread is not None:
            thread.join()
        error, self._prune_error = self._prune_error, None
        if error is None:
            return None
        message = f"deleting old checkpoints under {self.root} failed: {error}; the next save retries"
        log.warning(message)
        return message

    # -- restoring --------------------------------------------------------------------------------------------------
    def local_view(self, info: CheckpointInfo) -> str:
        """A local directory holding the checkpoint's files (the checkpoint itself when the store is local).

        Remote: downloaded to this node's cache once (callers let one process per node do it, the others wait)."""
        if not self.remote:
            return self.url(info.name)
        local = os.path.join(self.cache_dir, "restore", info.name)
        marker = os.path.join(local, ".downloaded")
        if os.path.isfile(marker):
            return local
        fs, root = self._fs()
        base = f"{root.rstrip('/')}/{info.name}"
        pairs = [(f"{base}/{rel}", os.path.join(local, *rel.split("/"))) for rel in info.files]
        for _, dst in pairs:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        parallel(lambda pair: fs.get_file(*pair), pairs)
        with open(marker, "w") as f:
            f.write(info.name)
        return local


def rank_state_file(directory: str, rank: int) -> str:
    return os.path.join(directory, "ranks", f"rank-{rank:05d}.pt")
