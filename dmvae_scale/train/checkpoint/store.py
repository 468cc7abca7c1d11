"""The checkpoint store of a run (the files): layout, manifest written last, "latest complete", keep-last-k,
staging and upload to an object store, the local view of a remote checkpoint. What a checkpoint means is meaning.py;
what goes into one, and when, is the manager's (manager.py).

    <run_dir>/checkpoints/img-000000012800/
        engines/<model>/zero/...      each engine's DeepSpeed ZeRO shards (every worker writes its own)
        ranks/rank-00000.pt           per worker: the state of every part (loop counters, EMA partition, data
                                      reader, RNG, the stage's own state)
        config.yaml                   the resolved config of the run
        manifest.json                 written LAST, by rank 0, once every worker's files are in place: lists
                                      every file with its size and sha256, the counters and what the checkpoint
                                      means; HMAC-signed when DMVAE_CHECKPOINT_KEY is set

A directory without a manifest, or whose files do not match the manifest's sizes (an upload cut short, a deleted
shard), is never a candidate: "latest" is the complete checkpoint with the most images seen, never chosen by file
time or size. Before anything of a checkpoint is read (restore, export), every file it lists is checked against its
sha256 (`local_view`); what may be read and how is integrity.py's. The run directory can be local (a shared
filesystem when workers span nodes) or an object store URL (s3://...): then workers write to a local staging
directory and upload, and a resume downloads to a local cache under a directory of this user's
(`$TMPDIR/dmvae-<uid>/checkpoints`, 0700, refused if anyone else could write to it), whose files are checked against the
manifest at every use and fetched again when they do not match.

Format 2 (this version) lists sha256 hashes. A manifest of another format - format 1 listed sizes only - is refused
with a CheckpointError, not skipped: a run directory holding one does not start (a fresh start would prune it) and
export refuses it; nothing vouches for its files. Keep it with the version that wrote it, or move it away.

Signing: with DMVAE_CHECKPOINT_KEY set (the same secret in the environment of the driver and every worker), the
manifest carries an HMAC-SHA256 of its content, and a manifest that is unsigned or whose signature does not match is
refused. Without the key, signatures are not checked.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ...data import storage
from ...private_cache import local_files, user_cache
from .durable import fsync_path, parallel
from .integrity import (CheckpointError, CheckpointView, check_name, check_relpath, hash_files, join_inside, mismatch,
                        private_dir, sha256_file, sha256_stream)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
MANIFEST = "manifest.json"
KEY_ENV = "DMVAE_CHECKPOINT_KEY"
_NAME = re.compile(r"^img-(\d{12})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")



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
    sha256: dict[str, str] = field(default_factory=dict)  # every file of `files`
    upstream: dict[str, str] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    format: int = CHECKPOINT_FORMAT


def checkpoint_name(images_seen: int) -> str:
    return f"img-{images_seen:012d}"


def cache_root() -> str:
    """This user's root of checkpoint caches: $TMPDIR/dmvae-<uid>/checkpoints (private_cache: created 0700 and
    checked, as the root above it)."""
    return user_cache("checkpoints", "checkpoint cache", CheckpointError)


def _signing_key() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def _signature(key: bytes, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "hmac-sha256:" + hmac.new(key, canonical, hashlib.sha256).hexdigest()


def _check_manifest(info: CheckpointInfo, name: str) -> None:
    """The names a manifest hands to paths, and its hashes: refused unless safe and complete."""
    where = f"{info.url}/{MANIFEST}"
    if info.name != name:
        raise CheckpointError(f"{where}: names checkpoint {info.name!r} but lies in {name!r}; refusing it")
    if not isinstance(info.engines, list) or not isinstance(info.files, dict) or not isinstance(info.sha256, dict):
        raise CheckpointError(f"{where}: engines, files and sha256 must be a list and mappings; refusing it")
    for engine in info.engines:
        check_name(engine, f"{where}: engine name")
    for rel, size in info.files.items():
        check_relpath(rel, f"{where}: file")
        if not isinstance(size, int) or size < 0:
            raise CheckpointError(f"{where}: file {rel} has size {size!r}; refusing it")
        digest = info.sha256.get(rel)
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise CheckpointError(f"{where}: file {rel} has no sha256 (got {digest!r}); refusing it")
    extra = sorted(set(info.sha256) - set(info.files))
    if extra:
        raise CheckpointError(f"{where}: sha256 of {extra[0]}, which the manifest does not list; refusing it")


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
        self._cache_dir = cache_dir
        self._cache_checked: str | None = None
        self._pruning: threading.Thread | None = None
        self._prune_error: BaseException | None = None

    @property
    def cache_dir(self) -> str:
        """This node's local directory for the run (staging of a save, copies of a remote checkpoint, logs): under
        this user's cache root, or the cache_dir given; created 0700 and refused when it is a symlink, someone
        else's, or writable by group or others (integrity.private_dir), so nobody else can plant files in it."""
        if self._cache_checked is None:
            if self._cache_dir is not None:
                parent = os.path.dirname(os.path.abspath(self._cache_dir))
                os.makedirs(parent, exist_ok=True)
                path = private_dir(os.path.abspath(self._cache_dir))
            else:
                digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
                path = private_dir(os.path.join(cache_root(), digest))
            self._cache_checked = path
        return self._cache_checked

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
        """The manifest of `name`; None when absent or unreadable (a checkpoint still being written). Raises a
        CheckpointError for a manifest of another format, with unsafe names or incomplete hashes, or, with
        DMVAE_CHECKPOINT_KEY set, unsigned or with a signature that does not match."""
        check_name(name, f"{self.root}: checkpoint name")
        fs, root = self._fs()
        path = f"{root.rstrip('/')}/{name}/{MANIFEST}"
        where = f"{self.url(name)}/{MANIFEST}"
        try:
            raw = json.loads(fs.cat_file(path))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(raw, dict):
            return None
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{self.url(name)}: checkpoint format {raw.get('format')!r}, this version reads only format "
                f"{CHECKPOINT_FORMAT} (a manifest listing every file's sha256, checked before anything is read; "
                f"format 1 listed sizes only, so nothing vouches for its files). Refusing it rather than skipping "
                f"it: resume or export it with the version that wrote it, or move it out of {self.root}")
        signature = raw.pop("signature", None)
        key = _signing_key()
        if key is not None:
            if not signature:
                raise CheckpointError(f"{where}: unsigned, but {KEY_ENV} is set; refusing a checkpoint nobody "
                                      f"holding the key vouched for")
            if not hmac.compare_digest(str(signature), _signature(key, raw)):
                raise CheckpointError(f"{where}: its signature does not match ({KEY_ENV} differs from the key it "
                                      f"was signed with, or the manifest was changed); refusing it")
        try:
            info = CheckpointInfo(**{**raw, "url": self.url(name)})
        except TypeError:
            return None
        _check_manifest(info, name)
        return info

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

    def _scan(self) -> tuple[list[CheckpointInfo], dict[str, str]]:
        """(complete checkpoints oldest first, {name: why refused} for manifests that read_manifest refuses)."""
        out, refused = [], {}
        for name in self._names():
            try:
                info = self.read_manifest(name)
            except CheckpointError as exc:
                refused[name] = str(exc)
                continue
            if info is not None and self.verify(info) is None:
                out.append(info)
        return sorted(out, key=lambda i: i.images_seen), refused

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (by images seen); waits for a background prune first. A manifest
        that is refused (another format, unsafe names, a bad signature) raises its CheckpointError: a run directory
        holding one neither resumes nor starts over."""
        self.wait()
        done, refused = self._scan()
        if refused:
            raise CheckpointError(next(iter(refused.values())))
        return done

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
        pairs = [(src, f"{base}/{rel}") for src, rel in local_files(local, f"checkpoint upload {self.url(name)}")]
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

    def _hash_stored(self, name: str, rels: list[str]) -> dict[str, str]:
        """sha256 of files of a written checkpoint that no writer reported (read back from the store)."""
        if not self.remote:
            paths = {join_inside(self.url(name), rel, self.url(name)): rel for rel in rels}
            return {paths[p]: h for p, h in hash_files(paths).items()}
        fs, root = self._fs()
        out: dict[str, str] = {}

        def one(rel: str) -> None:
            with fs.open(f"{root.rstrip('/')}/{name}/{rel}", "rb") as f:
                out[rel] = sha256_stream(f)
        parallel(one, rels)
        return out

    def write_manifest(self, name: str, *, images_seen: int, step: int, world_size: int, zero_stage: int,
                       engines: list[str], meaning: dict[str, Any], config_hash: str,
                       upstream: dict[str, str] | None = None, counters: dict[str, Any] | None = None,
                       sha256: dict[str, str] | None = None) -> CheckpointInfo:
        """Rank 0, after every worker's files are in place: list them with sizes and sha256, write the manifest
        last (signed when DMVAE_CHECKPOINT_KEY is set). `sha256`: {relative path: hash} the writers computed while
        writing; any listed file without one is hashed here, from the store."""
        for engine in engines:
            check_name(engine, f"{self.url(name)}: engine name")
        files = {rel: size for rel, size in self._files(name).items() if rel != MANIFEST}
        if not files:
            raise CheckpointError(f"{self.url(name)}: no files were written; refusing to mark it complete")
        for rel in files:
            check_relpath(rel, f"{self.url(name)}: file")
        hashes = {rel: h for rel, h in (sha256 or {}).items() if rel in files}
        hashes.update(self._hash_stored(name, sorted(set(files) - set(hashes))))
        info = CheckpointInfo(url=self.url(name), name=name, images_seen=images_seen, step=step,
                              world_size=world_size, zero_stage=zero_stage, engines=sorted(engines), files=files,
                              meaning=meaning, config_hash=config_hash, sha256=dict(sorted(hashes.items())),
                              upstream=dict(upstream or {}), counters=dict(counters or {}), created=time.time())
        body = asdict(info)
        body.pop("url")
        body = json.loads(json.dumps(body))  # as a reader will see it (tuples as lists), for the signature
        key = _signing_key()
        if key is not None:
            body["signature"] = _signature(key, body)
        storage.write_bytes(storage.join(self.url(name), MANIFEST), json.dumps(body, indent=1).encode())
        return info

    def prune(self, background: bool = False) -> list[str]:
        """Keep the newest `keep` complete checkpoints; delete older ones and every incomplete leftover.

        What to delete is decided now; with background=True the deleting runs on a thread, so training goes on
        while a large old checkpoint is removed (on local disk that was a quarter of a save's time; on an object
        store it is one request per file). `wait()` joins it; the next save waits for it before it starts, so a
        deletion never overlaps the writing of a new checkpoint. Deleting removes the manifest first: a deletion
        cut short leaves an incomplete directory that is never resumed from, and the next prune removes it. A
        failed deletion is reported by wait() as a warning, not raised. A checkpoint whose manifest is refused
        (read_manifest) is kept, with a warning."""
        self.wait()  # joins an earlier background prune first
        done, refused = self._scan()
        keep = {i.name for i in done[-self.keep:]} | set(refused)
        for message in refused.values():  # never deleted as if incomplete: left for the user to look at
            log.warning(f"{message}; keeping it")
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
    def local_view(self, info: CheckpointInfo, verify: bool = True) -> str:
        """A local directory holding the checkpoint's files, every one checked against the manifest's sha256 before
        it is returned (a mismatch raises a CheckpointError naming the file, the expected and the actual hash).

        Local store: the checkpoint directory itself. Remote: this node's private cache (callers let one process
        per node do it, the others wait and call with verify=False for the path); a cached file is re-checked at
        every use, and one missing or not matching is downloaded again (refused when the download does not match
        either)."""
        where = f"the manifest of {info.url}"
        if not self.remote:
            local = self.url(info.name)
            if verify:
                self.verify_files(info, local)
            return local
        restore = os.path.join(self.cache_dir, "restore")
        os.makedirs(restore, mode=0o700, exist_ok=True)
        local = join_inside(restore, info.name, f"{self.root}: checkpoint name")
        if not verify:
            return local
        fs, root = self._fs()
        base = f"{root.rstrip('/')}/{info.name}"

        def fetch(rel: str) -> None:
            dst = join_inside(local, rel, where)
            expected = info.sha256[rel]
            if os.path.isfile(dst) and not os.path.islink(dst) and sha256_file(dst) == expected:
                return  # the cached copy is the checkpoint's file
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            part = f"{dst}.part"
            size = int(fs.info(f"{base}/{rel}").get("size") or 0)
            if size != info.files[rel]:  # refused before a byte is read: a download is capped at the manifest's size
                raise CheckpointError(f"{self.url(info.name)}/{rel}: {size} bytes, but {where} lists "
                                      f"{info.files[rel]}; refusing to download it")
            fs.get_file(f"{base}/{rel}", part)
            actual = sha256_file(part)
            if actual != expected:
                os.remove(part)
                raise mismatch(f"{self.url(info.name)}/{rel}", expected, actual, where)
            os.replace(part, dst)

        os.makedirs(local, mode=0o700, exist_ok=True)
        parallel(fetch, sorted(info.files))
        return local

    def verify_files(self, info: CheckpointInfo, local: str) -> None:
        """Every file the manifest lists, under `local`, has its sha256 (hashed a few at a time); else a
        CheckpointError naming the first file that does not, with the expected and the actual hash."""
        paths = {join_inside(local, rel, f"the manifest of {info.url}"): rel for rel in sorted(info.files)}
        try:
            actual = hash_files(paths)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{exc.filename}: missing; the manifest of {info.url} lists it") from None
        for path, rel in paths.items():
            if actual[path] != info.sha256[rel]:
                raise mismatch(path, info.sha256[rel], actual[path], f"the manifest of {info.url}")

    def view(self, info: CheckpointInfo, local: str, derived: tuple[str, ...] = ()) -> CheckpointView:
        """What integrity.checked_loads may read of the checkpoint under `local`: the listed files, plus `derived`
        path prefixes (an engine's universal conversion, made here from the listed files)."""
        return CheckpointView(local, set(info.files), info.url, derived)


def rank_state_file(directory: str, rank: int) -> str:
    return os.path.join(directory, "ranks", f"rank-{rank:05d}.pt")
