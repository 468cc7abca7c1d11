"""Image shards: convert a source into MDS shards (local directory or s3://), resumable and parallel.

Layout of a converted dataset at DEST:
    plan.json              what is being converted (source, split, sample count, key-list hash, part size); first
    part-00000/            one MDS sub-dataset per part: shard.*.mds + index.json, then done.json LAST
    ...
    dataset.json           classes, counts, label histogram, bytes, corrupt images
    index.json             the merged MDS index over all parts; written LAST, so a DEST with it is complete

Samples are split into parts of consecutive keys of the sorted source. A part is the unit of work and of resumption:
a part with done.json is never rewritten, a part without it is cleared and redone. A re-run of an interrupted
conversion therefore finishes without duplicating or losing a sample, whatever the worker count.
Each sample stores {"key": str, "label": int, "image": the encoded bytes as read}: nothing is re-encoded.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional


from ..log import progress as show_progress
from dmvae_scale.errors import UserError

from . import storage
from .shard_sources import ImageSource, SourceSample, open_source, read_encoded

FORMAT = 1
COLUMNS = {"key": "str", "label": "int", "image": "bytes"}
SHARD_HASH = "sha256"  # recorded for every shard in index.json (required); `data verify` recomputes it
DEFAULT_PART_SIZE = 2048
DEFAULT_SHARD_BYTES = 1 << 26


class CorruptImageError(UserError):
    """An image in the source that cannot be decoded, under the `fail` policy."""


@dataclass
class ShardSummary:
    images: int = 0
    bytes: int = 0
    shards: int = 0
    parts: int = 0
    reused_parts: int = 0
    corrupt: list[dict] = field(default_factory=list)  # {"key", "path", "error"}
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        text = (f"wrote {self.images} images, {self.bytes / 2**20:.1f} MiB, {self.shards} shards in {self.parts} parts "
                f"({self.reused_parts} already done) in {self.seconds:.1f} s ({rate:.0f} img/s); "
                f"{len(self.corrupt)} corrupt skipped")
        for bad in self.corrupt[:20]:
            text += f"\n  corrupt: {bad['path']} ({bad['error']})"
        if len(self.corrupt) > 20:
            text += f"\n  ... and {len(self.corrupt) - 20} more (listed in dataset.json)"
        return text


def check_decodes(data: bytes) -> None:
    """Raise if the bytes are not a fully decodable image (truncated files fail at load()) or have more pixels than
    transforms.max_image_pixels() (a decompression bomb)."""
    from .transforms import open_image
    with open_image(data) as img:
        img.load()


# ----------------------------------------------------------------------------------------------------------------------
# One part (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class _PartTask:
    index: int
    dest: str
    source_name: str
    split: str
    samples: list[SourceSample]
    on_corrupt: str
    shard_bytes: int
    image_size: int | None = None


def at_training_size(data: bytes, size: int) -> bytes:
    """An image resized once at conversion, as the loader's center crop would: short side to `size` (bicubic), the
    central size x size window, JPEG quality 95. The loader's resize then has nothing to do."""
    import io
    from .transforms import decode_image, resize_short_side
    img = resize_short_side(decode_image(data), size)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    out = io.BytesIO()
    img.crop((left, top, left + size, top + size)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def _write_part(task: _PartTask) -> dict:
    from streaming import MDSWriter
    part_url = storage.join(task.dest, part_name(task.index))
    remote = storage.is_remote(task.dest)
    storage.remove(part_url)  # leftovers of an interrupted attempt
    staging = tempfile.mkdtemp(prefix=f"dmvae-{part_name(task.index)}-") if remote else None
    local_dir = os.path.join(staging, "part") if remote else part_url
    written, nbytes, corrupt, label_counts = 0, 0, [], {}
    try:
        with MDSWriter(out=local_dir, columns=COLUMNS, hashes=[SHARD_HASH], size_limit=task.shard_bytes) as writer:
            for s in task.samples:
                data = read_encoded(task.source_name, task.split, s.locator)
                try:
                    check_decodes(data)
                except Exception as exc:  # PIL raises many types for bad files
                    where = s.locator if isinstance(s.locator, str) else s.key
                    if task.on_corrupt == "fail":
                        raise CorruptImageError(f"corrupt image {where} ({exc}); use --on-corrupt skip to skip "
                                                f"and count such files") from None
                    corrupt.append({"key": s.key, "path": str(where), "error": str(exc)[:200]})
                    continue
                if task.image_size:
                    data = at_training_size(data, task.image_size)
                writer.write({"key": s.key, "label": s.label, "image": data})
                written += 1
                nbytes += len(data)
                label_counts[s.label] = label_counts.get(s.label, 0) + 1
        with open(os.path.join(local_dir, "index.json")) as f:
            index = json.load(f)
        if remote:
            storage.upload_dir(local_dir, part_url)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    done = {"part": task.index, "samples": written, "bytes": nbytes, "corrupt": corrupt,
            "label_counts": {str(k): v for k, v in sorted(label_counts.items())},
            "first_key": task.samples[0].key, "last_key": task.samples[-1].key, "index": index}
    storage.write_bytes(storage.join(part_url, "done.json"), json.dumps(done).encode())
    return done


# ----------------------------------------------------------------------------------------------------------------------
# The whole conversion
# ----------------------------------------------------------------------------------------------------------------------

def _plan(source: ImageSource, part_size: int) -> dict:
    keys = hashlib.sha256("\n".join(s.key for s in source.samples).encode()).hexdigest()
    return {"format": FORMAT, **source.describe(), "keys_sha256": keys, "part_size": part_size,
            "columns": COLUMNS}


def _read_json(url: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(url))
    except storage.StorageError:
        return None


def _check_plan(dest: str, plan: dict) -> None:
    old = _read_json(storage.join(dest, "plan.json"))
    if old is None:
        storage.write_bytes(storage.join(dest, "plan.json"), json.dumps(plan, indent=2).encode())
        return
    changed = [k for k in plan if old.get(k) != plan[k]]
    if changed:
        raise UserError(f"{dest} already holds a different conversion ({', '.join(changed)} differ: "
                        f"{ {k: old.get(k) for k in changed} }); choose an empty destination")


def _merged_index(done_parts: list[dict]) -> dict:
    """One MDS index over all parts: each shard's file names gain the part folder as prefix."""
    shards = []
    for done in done_parts:
        prefix = part_name(done["part"])
        for shard in done["index"]["shards"]:
            shard = json.loads(json.dumps(shard))
            for kind in ("raw_data", "zip_data"):
                if shard.get(kind):
                    shard[kind]["basename"] = f"{prefix}/{shard[kind]['basename']}"
            shards.append(shard)
    return {"version": 2, "shards": shards}


# Runs write_part over the pending parts elsewhere (the pipeline's Ray tasks), yielding each part's done record as it
# finishes, in any order: run_parts(write_part, [(task,), ...]).
PartRunner = Callable[[Callable[["_PartTask"], dict], list[tuple["_PartTask"]]], Iterable[dict]]


def write_shards(src: str, dest: str, *, split: str = "train", workers: int = 1, part_size: int = DEFAULT_PART_SIZE,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, on_corrupt: str = "skip", limit: int | None = None,
                 classes_file: str | None = None, progress: bool = True,
                 run_parts: Optional[PartRunner] = None, image_size: int | None = None) -> ShardSummary:
    """Convert `src` (folder tree or built-in set name) into MDS shards at `dest`; resumable, see module doc.

    run_parts: where the parts are written (default: here, or a spawned pool of `workers` processes). Each part is
    the same bytes wherever it is written, and the merged index is made here from the parts' done records, so the
    output does not depend on where its parts ran.
    image_size: store every image at that training resolution (at_training_size) instead of as read."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise UserError(f"image_size must be a positive number of pixels (or unset: images as read), got {image_size!r}")
    if on_corrupt not in ("skip", "fail"):
        raise UserError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    if part_size <= 0 or workers <= 0:
        raise UserError(f"part_size and workers must be positive, got {part_size} and {workers}")
    started = time.perf_counter()
    source = open_source(src, split, classes_file)
    if limit is not None:
        source.samples = source.samples[:limit]
    storage.check_reachable(dest)
    _check_plan(dest, {**_plan(source, part_size), "image_size": image_size})

    n_parts = (len(source.samples) + part_size - 1) // part_size
    done_parts, pending = {}, []
    for i in range(n_parts):
        done = _read_json(storage.join(dest, part_name(i), "done.json"))
        if done is not None:
            done_parts[i] = done
        else:
            chunk = source.samples[i * part_size:(i + 1) * part_size]
            pending.append(_PartTask(i, dest, source.name, source.split, chunk, on_corrupt, shard_bytes, image_size))
    summary = ShardSummary(parts=n_parts, reused_parts=len(done_parts))

    already = sum(min(part_size, len(source.samples) - i * part_size) for i in done_parts)
    bar = show_progress(total=len(source.samples), initial=already, unit="img", desc=f"shards {dest}", enabled=progress)
    try:
        if run_parts is not None:
            for done in run_parts(_write_part, [(task,) for task in pending]):
                done_parts[done["part"]] = done
                bar.update(done["samples"] + len(done["corrupt"]))
        elif workers == 1 or len(pending) <= 1:
            results = map(_write_part, pending)
            for done in results:
                done_parts[done["part"]] = done
                bar.update(done["samples"] + len(done["corrupt"]))
        else:
            # Spawned, never forked: a forked child inherits this process's fsspec event loop, its epoll set and
            # its pooled S3 sockets; its clean-up then unregisters those sockets from the shared epoll set and the
            # parent's next request to the store waits forever (seen as a hang writing dataset.json).
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(pending))) as pool:
                for done in pool.imap_unordered(_write_part, pending):
                    done_parts[done["part"]] = done
                    bar.update(done["samples"] + len(done["corrupt"]))
    finally:
        bar.close()

    ordered = [done_parts[i] for i in range(n_parts)]
    for done in ordered:
        summary.images += done["samples"]
        summary.bytes += done["bytes"]
        summary.shards += len(done["index"]["shards"])
        summary.corrupt += done["corrupt"]
    label_counts = [0] * len(source.classes)
    for done in ordered:
        for label, count in done["label_counts"].items():
            label_counts[int(label)] += count
    info = {"format": FORMAT, **source.describe(), "classes": source.classes, "images": summary.images,
            "bytes": summary.bytes, "shards": summary.shards, "label_counts": label_counts,
            "corrupt": summary.corrupt, "columns": COLUMNS, "shard_hash": SHARD_HASH, "image_size": image_size}
    storage.write_bytes(storage.join(dest, "dataset.json"), json.dumps(info, indent=2).encode())
    storage.write_bytes(storage.join(dest, "index.json"), json.dumps(_merged_index(ordered)).encode())
    summary.seconds = time.perf_counter() - started
    return summary


def read_dataset_info(dest: str) -> dict:
    """dataset.json of a complete conversion (checked through load_index first)."""
    load_index(dest, check_files=False)
    info = _read_json(storage.join(dest, "dataset.json"))
    if info is None:
        raise storage.StorageError(f"{dest}: dataset.json missing; not written by `dmvae-scale data shards`")
    return info


def load_index(dest: str, check_files: bool = True) -> dict:
    """The merged index of a complete dataset; with check_files, every shard it lists must exist at DEST.

    Run before streaming: a missing shard then fails at once with its name, not deep inside a download thread.
    """
    storage.check_reachable(dest)
    index = _read_json(storage.join(dest, "index.json"))
    if index is None:
        hint = " (an interrupted conversion: re-run `dmvae-scale data shards`)" \
            if _read_json(storage.join(dest, "plan.json")) else ""
        raise storage.StorageError(f"{dest}: no index.json, not a complete shard dataset{hint}")
    check_index(index, storage.join(dest, "index.json"), None if storage.is_remote(dest) else dest)
    if check_files:
        fs, root = storage.filesystem(dest)
        root = root.rstrip("/")
        fs.invalidate_cache(root)  # other processes (writer workers) may have changed the listing
        present = {p[len(root) + 1:] for p in fs.find(root)}
        missing = [s["raw_data"]["basename"] for s in index["shards"] if s["raw_data"]["basename"] not in present]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise storage.StorageError(f"{dest}: shard {', '.join(missing[:3])}{more} listed in index.json is "
                                       f"missing; re-run `dmvae-scale data shards` or restore the file")
    return index


class ShardIndexError(UserError):
    """An index.json whose shard names, hashes or compression this version does not read; names the file."""


_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_index(index: Any, where: str, local_dir: str | None = None) -> None:
    """Refuse an index unless every shard: has a basename of `[A-Za-z0-9_.-]` segments joined by '/' (no '.' or
    '..', not absolute) that, for a local dataset, resolves inside `local_dir`; is uncompressed (Streaming would
    decompress a whole shard in memory); records its SHARD_HASH (a shard without one would go unchecked)."""
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ShardIndexError(f"{where}: no list of shards; not an MDS index")
    root = os.path.realpath(local_dir) if local_dir else None
    for shard in shards:
        raw = shard.get("raw_data") if isinstance(shard, dict) else None
        name = raw.get("basename") if isinstance(raw, dict) else None
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or any(not _SEGMENT.match(p) or p in (".", "..") for p in parts):
            raise ShardIndexError(f"{where}: shard basename {name!r} is not a safe relative name (letters, digits, "
                                  f"'_', '.', '-' segments; no '..'); refusing the dataset")
        if root is not None:
            real = os.path.realpath(os.path.join(local_dir, *parts))
            if not real.startswith(root.rstrip(os.sep) + os.sep):
                raise ShardIndexError(f"{where}: shard {name} resolves to {real}, outside {root}; refusing the "
                                      f"dataset")
        if shard.get("compression") or shard.get("zip_data"):
            raise ShardIndexError(f"{where}: shard {name} is compressed ({shard.get('compression')}); this version "
                                  f"reads uncompressed shards only (Streaming would decompress each whole shard in "
                                  f"memory). Rewrite it with `dmvae-scale data shards`")
        digest = (raw.get("hashes") or {}).get(SHARD_HASH)
        if not isinstance(digest, str) or not re.match(r"^[0-9a-f]{64}$", digest):
            raise ShardIndexError(f"{where}: shard {name} records no {SHARD_HASH} (hashes: "
                                  f"{sorted(raw.get('hashes') or {})}); every shard must, or it would be read "
                                  f"unchecked. Rewrite it with `dmvae-scale data shards` (or `data cache-latents`)")
