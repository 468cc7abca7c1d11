"""Damaged shards: a shard whose bytes no longer match its index stops the reader at once with a user error naming the
dataset, the shard and the sample; from the object store (SeaweedFS, checked on download) and from a local directory
(checked when a sample fails to decode). The damaged cached copy is dropped, so a restored shard reads again."""
import time

import pytest

from repo import tokenizer_artifact
from dmvae_scale.cli import main
from dmvae_scale.data import storage
from dmvae_scale.data.shards import load_index
from dmvae_scale.data.stream import ImageStreamDataset, ShardDataError, make_loader

pytestmark = pytest.mark.integration



def _damage(url: str, which: int = 1) -> str:
    """Flip 64 bytes in the middle of the dataset's shard number `which` (same length: only a hash can tell)."""
    name = load_index(url)["shards"][which]["raw_data"]["basename"]
    data = bytearray(storage.read_bytes(storage.join(url, name)))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    storage.write_bytes(storage.join(url, name), bytes(data))
    return name


def test_damaged_shard_in_the_object_store_fails_at_once_naming_it_and_a_restored_one_reads(s3_bucket, tmp_path):
    url = f"{s3_bucket}/fm"
    assert main(["data", "shards", "fashion-mnist", url, "--limit", "64", "--shard-mb", "0.01", "--workers", "1"]) == 0
    good = storage.read_bytes(storage.join(url, load_index(url)["shards"][1]["raw_data"]["basename"]))
    name = _damage(url)
    started = time.monotonic()
    ds = ImageStreamDataset(url, batch_size=8, image_size=28, shuffle=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ShardDataError, match=rf"^{url}: shard {name} does not match its index \(sha256 .*\), "
                                             rf"found (reading|downloading it for) sample"):
        for _ in make_loader(ds, num_workers=1):
            pass
    assert time.monotonic() - started < 30
    assert not (tmp_path / "cache" / name).exists()  # the damaged copy left the cache

    storage.write_bytes(storage.join(url, name), good)
    ds = ImageStreamDataset(url, batch_size=8, image_size=28, shuffle=False, cache_dir=str(tmp_path / "cache"))
    assert sum(len(b["label"]) for b in make_loader(ds)) == 64


def test_cache_latents_from_a_damaged_local_dataset_exits_2_naming_the_shard(tmp_path, capsys):
    src = str(tmp_path / "fm")
    assert main(["data", "shards", "fashion-mnist", src, "--limit", "48", "--shard-mb", "0.01", "--workers", "1"]) == 0
    name = _damage(src, which=0)
    art = tmp_path / "tok"
    tokenizer_artifact(art)
    capsys.readouterr()
    started = time.monotonic()
    rc = main(["data", "cache-latents", src, str(tmp_path / "latents"), "--tokenizer", str(art), "--weights", "raw",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{src}: shard {name} does not match its index" in err and "sample" in err
    assert "Traceback" not in err  # one line a user reads, not a DataLoader worker's traceback
    assert time.monotonic() - started < 30
