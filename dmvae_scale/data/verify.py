"""`dmvae-scale data verify`: is a shard dataset complete and intact?

Reads every shard listed in index.json once (local or remote), and checks
    shard integrity   present, size as recorded, sha256 as recorded
    samples           count vs dataset.json, duplicate keys, label histogram
    content           every image decodes (image shards); every latent is finite (latent shards)
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..log import progress as show_progress
from . import storage
from .shards import check_decodes, load_index


@dataclass
class VerifyReport:
    url: str
    samples: int = 0
    expected_samples: int | None = None
    shards: int = 0
    bytes: int = 0
    label_counts: dict[int, int] = field(default_factory=dict)
    bad_shards: list[str] = field(default_factory=list)  # "basename: reason"
    undecodable: list[str] = field(default_factory=list)  # "key: reason"
    duplicate_keys: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        count_ok = self.expected_samples is None or self.expected_samples == self.samples
        return count_ok and not (self.bad_shards or self.undecodable or self.duplicate_keys)

    def line(self) -> str:
        expected = "" if self.expected_samples is None else f" (dataset.json says {self.expected_samples})"
        text = (f"{'OK' if self.ok else 'PROBLEMS'}: {self.url}: {self.samples} samples{expected} in {self.shards} "
                f"shards, {self.bytes / 2**20:.1f} MiB, {len(self.label_counts)} labels; "
                f"{len(self.bad_shards)} bad shards, {len(self.undecodable)} undecodable, "
                f"{len(self.duplicate_keys)} duplicate keys; {self.seconds:.1f} s")
        if self.label_counts:
            counts = np.array(list(self.label_counts.values()))
            text += f"\n  label histogram: min {counts.min()}, max {counts.max()}, " \
                    f"{dict(sorted(self.label_counts.items())) if len(counts) <= 20 else '(see --json)'}"
        for what, items in (("bad shard", self.bad_shards), ("undecodable", self.undecodable),
                            ("duplicate key", self.duplicate_keys)):
            for item in items[:10]:
                text += f"\n  {what}: {item}"
            if len(items) > 10:
                text += f"\n  ... {len(items) - 10} more {what}s"
        return text


def _check_shard(fs, root: str, shard: dict, decode: bool) -> dict:
    from streaming.base.format.mds.reader import MDSReader
    name = shard["raw_data"]["basename"]
    out = {"name": name, "problem": None, "keys": [], "labels": [], "undecodable": [], "bytes": 0}
    try:
        data = fs.cat_file(f"{root}/{name}")
    except FileNotFoundError:
        out["problem"] = "missing"
        return out
    out["bytes"] = len(data)
    if len(data) != shard["raw_data"]["bytes"]:
        out["problem"] = f"size {len(data)} bytes, index.json records {shard['raw_data']['bytes']}"
        return out
    for algo, want in (shard["raw_data"].get("hashes") or {}).items():
        got = hashlib.new(algo, data).hexdigest() if algo in hashlib.algorithms_available else None
        if got is not None and got != want:
            out["problem"] = f"{algo} {got} != recorded {want}"
            return out
    reader = MDSReader.from_json("", None, shard)
    n = shard["samples"]
    offsets = np.frombuffer(data, np.uint32, n + 1, offset=4)  # MDS layout: count, n+1 offsets, samples
    for i in range(n):
        sample = reader.decode_sample(data[offsets[i]:offsets[i + 1]])
        key = sample.get("key", f"{name}#{i}")
        out["keys"].append(key)
        out["labels"].append(int(sample.get("label", -1)))
        if not decode:
            continue
        try:
            if "image" in sample:
                check_decodes(sample["image"])
            for col in ("latent", "latent_flip"):
                if col in sample and not np.isfinite(sample[col]).all():
                    raise ValueError(f"{col} has non-finite values")
        except Exception as exc:  # any decoder error marks the sample, not the run
            out["undecodable"].append(f"{key}: {str(exc)[:120]}")
    return out


def verify_dataset(url: str, decode: bool = True, workers: int = 4, progress: bool = True) -> VerifyReport:
    started = time.perf_counter()
    index = load_index(url, check_files=False)  # missing shards are reported below, all of them
    report = VerifyReport(url=url, shards=len(index["shards"]))
    for meta in ("dataset.json", "latents.json"):  # image shards / latent cache
        try:
            report.expected_samples = int(json.loads(storage.read_bytes(storage.join(url, meta)))["images"])
            break
        except (storage.StorageError, KeyError, ValueError):
            continue
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    seen: set[str] = set()
    total = sum(s["samples"] for s in index["shards"])
    with show_progress(total=total, unit="sample", desc=f"verify {url}", enabled=progress) as bar, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        for res in pool.map(lambda s: _check_shard(fs, root, s, decode), index["shards"]):
            if res["problem"]:
                report.bad_shards.append(f"{res['name']}: {res['problem']}")
            report.bytes += res["bytes"]
            report.samples += len(res["keys"])
            report.undecodable += res["undecodable"]
            for key, label in zip(res["keys"], res["labels"]):
                if key in seen:
                    report.duplicate_keys.append(key)
                seen.add(key)
                report.label_counts[label] = report.label_counts.get(label, 0) + 1
            bar.update(len(res["keys"]))
    report.seconds = time.perf_counter() - started
    return report
