"""The streaming reader every stage uses: MosaicML StreamingDataset over our shards, decoded and transformed.

Each item is {"image": float (3, S, S) in [-1, 1], "label": long} (plus "key" with `with_keys=True`).

Distribution: the process layout is read from RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, which must be set
before the dataset is built (torchrun and Ray Train's torch workers set them). Streaming partitions one global,
seeded sample order over ranks and DataLoader workers, so ranks read disjoint samples that cover the epoch.

Resumption: wrap the dataset in `make_loader` (a StreamingDataLoader) and save `loader.state_dict()` with a
checkpoint; `loader.load_state_dict(state)` before the next iteration continues the same global order from the next
unread sample, also with a different number of ranks (the order depends on num_canonical_nodes and the shuffle seed,
both carried in the state, not on the world size).

Augmentation: crop offsets and flips are drawn from a generator seeded by (seed, epoch, global sample id), so a
resumed or re-partitioned run augments every sample exactly as the uninterrupted run would.

Damaged data: shards downloaded from an object store are checked against the hash their writer recorded in the
index (Streaming's validate_hash); a sample that cannot be read from a local shard has its shard hashed then. Either
way a shard whose bytes do not match its index is a ShardDataError (a user error) naming the shard and the sample,
and a damaged downloaded copy is removed from the cache so the next run fetches it again.

A killed reader's shared memory: Streaming keeps its per-node state in /dev/shm (NNNNNN_locals, _barrier, ...,
NNNNNN a prefix per live dataset). A SIGKILLed process never removes its files, and the next dataset of the same
remote and local directory then refuses to start ("Reused local directory"). Every dataset built here first removes
the prefixes no live process has mapped (`clean_dead_shared_memory`), so a restarted worker starts.

Threads: Streaming's SharedMemory swaps `multiprocessing.resource_tracker.register` (and `unregister`) for a no-op
while it attaches to a block, then puts back what it found. Two threads doing that at once (two in-process steps
building datasets) leave the no-op installed for good: every later block goes untracked and its unlink makes the
resource tracker print a KeyError traceback at exit (hundreds, hiding a job's real error). Its open and clean-up are
therefore serialized here (`_serialize_streaming_shared_memory`, applied on import).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from typing import Any, Callable

import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState  # Streaming 0.13 internals; pinned in pyproject

from dmvae_scale.errors import UserError
from dmvae_scale.private_cache import named_private_dir, private_dir, user_cache

from . import storage
from .shards import SHARD_HASH, load_index
from .transforms import ImageTransform, decode_image, sample_rng

_LOCAL = _ShardState.LOCAL
_SHM_DIR = "/dev/shm"


def _serialize_streaming_shared_memory() -> None:
    """One thread at a time in Streaming's SharedMemory open and clean-up, each of which patches the process-wide
    resource tracker and restores it (see the module's note); idempotent."""
    from streaming.base.shared import memory
    cls = memory.SharedMemory
    if getattr(cls, "_dmvae_serialized", False):
        return
    lock = threading.RLock()
    opened, cleanup = cls.__init__, cls.cleanup

    def locked_init(self, *args: Any, **kwargs: Any) -> None:
        with lock:
            opened(self, *args, **kwargs)

    def locked_cleanup(self) -> None:
        with lock:
            cleanup(self)

    cls.__init__, cls.cleanup, cls._dmvae_serialized = locked_init, locked_cleanup, True


_serialize_streaming_shared_memory()


def _mapped_shm_names() -> set[str] | None:
    """Names of /dev/shm files some process on this node has mapped (read from /proc/PID/maps); None when /proc
    cannot tell (no /proc: not Linux)."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    names: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    i = line.find(b" /dev/shm/")
                    if i >= 0:
                        names.add(line[i + 10:].split(b" (deleted)")[0].strip().decode(errors="replace"))
        except OSError:  # gone meanwhile, or another user's (whose files we could not remove anyway)
            continue
    return names


def clean_dead_shared_memory() -> list[str]:
    """Remove Streaming's shared memory left by dead processes on this node; returns the names removed.

    Not Streaming's `clean_stale_shared_memory`: that one unlinks every prefix's files from 000000 upwards until a
    prefix has none, the live ones included, so a worker starting beside live workers of another run (or a second
    dataset of the same process) would pull their state away from under them. Here a prefix goes only when none
    of its files is mapped by any process (Python's SharedMemory maps its file for the object's life, so a live
    dataset always shows in /proc/PID/maps), and only files of this user (others' cannot be unlinked by us).
    Streaming's file locks in the temp directory are left: Streaming skips a prefix that has them."""
    from streaming.base.constant import SHM_TO_CLEAN
    try:
        present = [n for n in os.listdir(_SHM_DIR) if n[:6].isdigit() and n[6:7] == "_" and n[7:] in SHM_TO_CLEAN]
    except OSError:
        return []
    if not present:
        return []
    mapped = _mapped_shm_names()
    if mapped is None:
        return []
    prefixes: dict[str, list[str]] = {}
    for name in present:
        prefixes.setdefault(name[:6], []).append(name)
    removed = []
    uid = os.getuid()
    for names in prefixes.values():
        if any(n in mapped for n in names):
            continue  # a live dataset's
        for name in names:
            path = os.path.join(_SHM_DIR, name)
            try:
                if os.stat(path).st_uid != uid:
                    continue
                os.unlink(path)
                removed.append(name)
            except OSError:
                continue
    if removed:
        from dmvae_scale.log import say
        say("data", f"removed {len(removed)} shared-memory files of Streaming readers that died without cleaning "
                    f"up ({', '.join(sorted(removed)[:3])}{', ...' if len(removed) > 3 else ''})", all_ranks=True)
    return removed


def index_digest(index: dict) -> str:
    """A short hash of a dataset's index (every shard's name, size and hash): changes when the data does."""
    return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(url: str, index: dict) -> str:
    """Per-dataset local cache for a remote URL (one per node; ranks of a node share it).

    Keyed by the URL *and* the index: Streaming trusts a shard or index.json it finds in its local directory, so a
    dataset rewritten at the same URL (a rerun of `data shards`, a latent cache remade by a new tokenizer) would
    otherwise be read from the stale copy of the old one."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = user_cache("stream", "shard cache", UserError)
    local = private_dir(os.path.join(root, f"{digest}-{index_digest(index)}"), "shard cache", UserError)
    hold_cache_dir(local)
    remove_stale_caches(root, f"{digest}-", keep=local)
    return local


_IN_USE = ".in-use"  # flock'ed shared by every process reading a cache directory, for as long as it lives
_HELD: dict[str, int] = {}  # cache directory -> the open lock file this process holds (inherited by forked workers)


def hold_cache_dir(local: str) -> None:
    """Mark `local` in use by this process (a shared flock, released when the process exits)."""
    if local in _HELD:
        return
    fd = os.open(os.path.join(local, _IN_USE), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD[local] = fd


def remove_stale_caches(root: str, prefix: str, keep: str) -> list[str]:
    """Delete the cache directories of earlier versions of a dataset (names `prefix`*, other than `keep`) that no
    process holds (hold_cache_dir); returns the ones removed. A directory another process still reads stays: its
    shared lock makes the exclusive try fail."""
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith(prefix) or path == keep or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(os.path.join(path, _IN_USE), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # in use
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _check_cache_dir(cache_dir: str, url: str, index: dict) -> str:
    """A cache directory the user named must be private (private_cache) and hold nothing, or a copy of this very
    dataset."""
    cache_dir = named_private_dir(cache_dir, "shard cache_dir", UserError)
    cached = os.path.join(cache_dir, "index.json")
    if os.path.isfile(cached):
        try:
            with open(cached) as f:
                same = index_digest(json.load(f)) == index_digest(index)
        except (OSError, ValueError):
            same = False
        if not same:
            raise UserError(f"cache_dir {cache_dir} holds a copy of another dataset (or of an older version of "
                            f"{url}): Streaming would read its stale shards; empty it or name another directory")
    return cache_dir


def streaming_locations(url: str, cache_dir: str | None, cache_limit: str | int | None = None) -> dict[str, Any]:
    """StreamingDataset's remote/local arguments for a dataset URL, after a fast pre-flight check. cache_limit
    (data.cache_limit) bounds the local copy of a remote dataset; a local dataset is read in place, never evicted."""
    index = load_index(url, check_files=True)  # unreachable store or missing shard: one clear error, now
    if storage.is_remote(url):
        local = _check_cache_dir(cache_dir, url, index) if cache_dir else default_cache_dir(url, index)
        _place_index(local, index)
        out = {"remote": url, "local": local,
               "validate_hash": SHARD_HASH}  # each download checked: load_index requires every shard's hash
        if cache_limit is not None:
            out["cache_limit"] = _checked_cache_limit(cache_limit, url, index)
        return out
    return {"remote": None, "local": os.path.abspath(url)}


def _checked_cache_limit(cache_limit: str | int, url: str, index: dict) -> int:
    """cache_limit in bytes, refused (one line) below what Streaming needs: four of the dataset's largest shards."""
    from ..config import cache_limit_bytes
    limit = cache_limit_bytes(cache_limit)
    largest = max((int(s.get("raw_data", {}).get("bytes", 0)) for s in index.get("shards", [])), default=0)
    if limit < 4 * largest:
        raise UserError(f"data.cache_limit={cache_limit} is below four shards of {url} (4 x {largest} bytes): "
                        f"raise it to at least {(4 * largest) >> 20 or 1}mb, or write smaller shards")
    return limit


def _place_index(local: str, index: dict) -> None:
    """Put the index checked here (load_index) into the cache, where Streaming reads it instead of downloading
    index.json once more: the names and hashes it uses are the ones that were checked."""
    path = os.path.join(local, "index.json")
    try:
        with open(path) as f:
            if index_digest(json.load(f)) == index_digest(index):
                return
    except (OSError, ValueError):
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f)
    os.replace(tmp, path)


class ShardDataError(UserError):
    """A shard whose bytes do not match the hash in its index: names the dataset, the shard and the sample."""

    def __init__(self, message: str):
        # Raised in a DataLoader worker, torch re-raises it here as ShardDataError("Caught ... Original Traceback
        # ... ShardDataError: <message>"): keep the message a user reads, not the worker's traceback.
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


_BUILDING = threading.Lock()


class _EpochAware(StreamingDataset):
    """StreamingDataset plus two things every reader here needs.

    * It remembers the epoch Streaming resolves at the start of each iteration (needed to seed augmentation).
    * A lock-free fast path for shards already in the local cache (see `prepare_shard`).
    """

    current_epoch = 0

    def __init__(self, *args: Any, **kwargs: Any):
        # One at a time in this process: Streaming picks its shared-memory prefix by looking for a free one, and two
        # threads doing so at once (a pipeline's train steps running side by side) take the same prefix, the second
        # failing with FileExistsError on /dev/shm/NNNNNN_locals.
        with _BUILDING:
            clean_dead_shared_memory()  # a SIGKILLed reader's /dev/shm files would refuse this dataset
            super().__init__(*args, **kwargs)

    def _resume_incr_epoch(self) -> tuple[int, int]:  # Streaming 0.13 private hook; pinned in pyproject
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.current_epoch = epoch
        return epoch, sample_in_epoch

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's download-or-touch of a shard, skipped once the shard is known to be local for good.

        Streaming's background thread calls this for every sample; each call takes the node-wide cache file lock,
        checks the raw shard file on disk and records an access time. The access time only feeds cache eviction,
        which runs only with `cache_limit` set; without a limit nothing ever moves a LOCAL shard back, so after
        this process has once seen the shard LOCAL (its raw file then exists: Streaming sets LOCAL only after the
        download or decompression finished) the call has nothing left to do. Measured: the per-sample lock alone
        cost 0.13 ms of CPU with filelock 4, about a sixth of the decode + augment time of an ImageNet photo.
        """
        if self.cache_limit:
            super().prepare_shard(shard_id, blocking)
            return
        local = self.__dict__.setdefault("_local_shards", set())  # per process: set after fork/unpickle
        if shard_id in local:
            return
        super().prepare_shard(shard_id, blocking)
        if self._shard_states[shard_id] == _LOCAL:
            local.add(shard_id)

    def __iter__(self):
        # Streaming ends the epoch early and silently when its download thread fails (a hash mismatch included);
        # the next epoch would then fail with "Background thread failed". Fail now, naming what went wrong.
        if self._thread_failed():
            self._raise_thread_failure()
        yield from super().__iter__()
        if self._thread_failed():
            self._raise_thread_failure()

    def read_sample(self, sample_id: int, decode: Callable[[dict], Any]) -> Any:
        """decode(get_item(sample_id)); a failure is turned into a ShardDataError when the sample's shard does not
        match its index (or a download thread failed)."""
        try:
            return decode(self.get_item(sample_id))
        except Exception:
            shard_id, in_shard = self.spanner[sample_id]
            damage = self._damage(shard_id)
            if damage is not None:
                raise ShardDataError(f"{self._name()}: shard {damage}, found reading sample {sample_id} (its sample "
                                     f"{in_shard}); {_REMEDY}") from None
            if self._thread_failed():
                self._raise_thread_failure()
            raise

    def _name(self) -> str:
        return getattr(self, "url", None) or self.streams[0].remote or self.streams[0].local

    def _thread_failed(self) -> bool:
        return hasattr(self, "_event") and self._event.is_set()

    def _raise_thread_failure(self):
        for shard_id in range(self.num_shards):
            damage = self._damage(shard_id)
            if damage is not None:
                first = int(self.sample_offset_per_shard[shard_id])
                last = first + int(self.samples_per_shard[shard_id]) - 1
                raise ShardDataError(f"{self._name()}: shard {damage}, found downloading it for samples "
                                     f"{first}-{last}; {_REMEDY}")
        raise RuntimeError(f"{self._name()}: Streaming's download thread failed (its traceback is above); the epoch "
                           f"cannot be completed")

    def _damage(self, shard_id: int) -> str | None:
        """'NAME does not match its index (...)' for a shard whose local copy does not hash as its index says, else
        None. A damaged downloaded copy is deleted (the next run downloads it again); a local dataset's file stays."""
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw = self.shards[shard_id].file_pairs[0][0]
        want = (raw.hashes or {}).get(SHARD_HASH)
        path = os.path.join(stream.local, stream.split or "", raw.basename)
        if want is None or not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            got = hashlib.new(SHARD_HASH, f.read()).hexdigest()
        if got == want:
            return None
        if stream.remote:
            os.remove(path)
        return f"{raw.basename} does not match its index ({SHARD_HASH} {got[:12]}..., index.json says {want[:12]}...)"


_REMEDY = "rewrite the dataset or restore the shard (`dmvae-scale data verify URL` checks every shard)"


class ImageStreamDataset(_EpochAware):
    """Image shards written by `dmvae-scale data shards`, as model-ready tensors.

    batch_size is the per-rank batch (Streaming needs it for deterministic partitioning and resumption).
    """

    def __init__(self, url: str, *, batch_size: int, image_size: int, crop: str = "random", hflip: bool = True,
                 seed: int = 0, shuffle: bool = True, cache_dir: str | None = None,
                 num_canonical_nodes: int | None = None, with_keys: bool = False, **streaming_kwargs: Any):
        self.transform = ImageTransform(image_size, crop, hflip)
        self.seed = int(seed)
        self.with_keys = with_keys
        self.url = url
        super().__init__(**streaming_locations(url, cache_dir, streaming_kwargs.pop("cache_limit", None)),
                         batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=self.seed, num_canonical_nodes=num_canonical_nodes, **streaming_kwargs)

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        raw, image = self.read_sample(sample_id, lambda raw: (raw, decode_image(raw["image"])))
        rng = sample_rng(self.seed, self.current_epoch, sample_id)
        out = {"image": self.transform(image, rng), "label": torch.tensor(int(raw["label"]), dtype=torch.long)}
        if self.with_keys:
            out["key"] = raw["key"]
        return out


def make_loader(dataset: StreamingDataset, num_workers: int = 0, **kwargs: Any) -> StreamingDataLoader:
    """A DataLoader that counts samples for `state_dict()`; batch size is the dataset's per-rank batch."""
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", True)
    return StreamingDataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers, drop_last=True,
                               **kwargs)


def close_iteration(dataset: StreamingDataset) -> None:
    """Stop the download threads of an iteration abandoned mid-epoch in this process (before deleting its files).

    Streaming itself only stops them when the next epoch starts or the process exits."""
    iterator = getattr(dataset, "_iterator", None)  # Streaming 0.13 internals; pinned in pyproject
    if iterator is not None:
        iterator.exit()
