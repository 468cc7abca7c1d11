"""Shards in a real S3-compatible store (SeaweedFS on 127.0.0.1): written by `data shards`, streamed back
byte-identical, verified; a missing shard and an unreachable endpoint fail fast with their names."""
import time

from s3_server import s3_client
import pytest

from dmvae_scale.cli import main
from dmvae_scale.data.storage import StorageError
from dmvae_scale.data.stream import ImageStreamDataset, make_loader
from dmvae_scale.localhost import free_port

pytestmark = pytest.mark.integration


def test_shards_to_s3_stream_back_byte_identical(imagenet_folder, s3_bucket, tmp_path, capsys):
    root, info = imagenet_folder
    url = f"{s3_bucket}/imagenet/train"
    assert main(["data", "shards", str(root), url, "--workers", "2", "--part-size", "4", "--shard-mb", "0.01"]) == 0
    assert "wrote 15 images" in capsys.readouterr().out

    ds = ImageStreamDataset(url, batch_size=5, image_size=32, crop="adm", cache_dir=str(tmp_path / "cache"),
                            with_keys=True)
    assert ds.num_samples == 15
    for i in range(ds.num_samples):
        raw = ds.get_item(i)  # downloads the shard from the server into the local cache
        source = root / raw["key"]  # keys are "<split>/<wnid>/<file>"
        assert raw["image"] == source.read_bytes()
    streamed = [k for batch in make_loader(ds) for k in batch["key"]]
    assert sorted(streamed) == sorted(str(p.relative_to(root)) for p in (root / "train").rglob("*")
                                      if p.is_file() and str(p) != info["corrupt"])
    del ds

    assert main(["data", "verify", url]) == 0
    # (a dataset built here first removes what Streaming readers killed by earlier tests left in /dev/shm, and says so)
    out = "".join(ln for ln in capsys.readouterr().out.splitlines(keepends=True)
                  if not ln.startswith("[data rank 0] removed "))
    assert out.startswith(f"OK: {url}: 15 samples")


def test_missing_shard_in_bucket_is_named(s3_bucket, s3_server, capsys):
    url = f"{s3_bucket}/fm"
    assert main(["data", "shards", "fashion-mnist", url, "--limit", "60", "--part-size", "30", "--workers", "1"]) == 0
    bucket = s3_bucket[len("s3://"):]
    s3_client(s3_server).delete_object(Bucket=bucket, Key="fm/part-00001/shard.00000.mds")
    with pytest.raises(StorageError, match="shard part-00001/shard.00000.mds listed in index.json is missing"):
        ImageStreamDataset(url, batch_size=4, image_size=28)
    assert main(["data", "verify", url]) == 1
    assert "bad shard: part-00001/shard.00000.mds: missing" in capsys.readouterr().out


def test_unreachable_endpoint_fails_fast_naming_it(s3_server, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", dead)
    started = time.monotonic()
    assert main(["data", "shards", "fashion-mnist", "s3://some-bucket/fm", "--limit", "10"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the S3 endpoint {dead}" in err and "s3://some-bucket/fm" in err
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {dead}"):
        ImageStreamDataset("s3://some-bucket/fm", batch_size=4, image_size=28)
    assert main(["data", "verify", "s3://some-bucket/fm"]) == 2
    assert time.monotonic() - started < 15  # seconds, not minutes of retries


def test_a_store_that_accepts_but_never_answers_is_an_error_naming_the_file(s3_server, monkeypatch):
    """A stuck connection (the store took the request and went silent) ends in a StorageError, not a hang."""
    import socket
    import threading

    from dmvae_scale.data import storage
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(storage, "SMALL_OP_TIMEOUT_S", 2.0)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"s3://silent/run/done.json: the store did not answer pipe_file "
                                               r"within 2 s"):
            storage.write_bytes("s3://silent/run/done.json", b"{}")
        assert time.monotonic() - started < 30
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def _keys(ds) -> list[str]:
    return sorted(ds[i]["key"] for i in range(len(ds)))


def test_a_dataset_rewritten_at_the_same_url_is_read_anew_not_from_the_stale_local_cache(s3_bucket, tmp_path):
    """Streaming trusts what it finds in its local directory: the default cache is keyed by the index too, so the
    second dataset at a URL is downloaded, and a named cache_dir holding the first is refused, naming it."""
    from dmvae_scale.data import storage
    from dmvae_scale.errors import UserError
    url = f"{s3_bucket}/rewritten"
    assert main(["data", "shards", "fashion-mnist", url, "--limit", "40", "--workers", "1"]) == 0
    first = ImageStreamDataset(url, batch_size=8, image_size=28, with_keys=True, shuffle=False)
    first_keys = _keys(first)
    assert len(first_keys) == 40
    del first
    named = tmp_path / "named"
    assert len(ImageStreamDataset(url, batch_size=8, image_size=28, cache_dir=str(named))) == 40

    storage.remove(url)
    assert main(["data", "shards", "fashion-mnist", url, "--split", "test", "--limit", "24", "--workers", "1"]) == 0
    second = ImageStreamDataset(url, batch_size=8, image_size=28, with_keys=True, shuffle=False)
    fresh = ImageStreamDataset(url, batch_size=8, image_size=28, with_keys=True, shuffle=False,
                               cache_dir=str(tmp_path / "fresh"))
    assert len(second) == 24 and _keys(second) == _keys(fresh) and not set(_keys(second)) & set(first_keys)
    with pytest.raises(UserError, match=f"cache_dir {named} holds a copy of another dataset .*{url}"):
        ImageStreamDataset(url, batch_size=8, image_size=28, cache_dir=str(named))


def _cache_bytes(cache) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*.mds"))


def test_many_shards_every_sample_once_with_and_without_cache_limit(s3_bucket, tmp_path):
    """The reader skips Streaming's per-sample cache lock once a shard is local for good (no cache limit); with a
    cache limit every call still goes through Streaming, which evicts. Both read each sample exactly once per epoch."""
    url = f"{s3_bucket}/fm-many"
    assert main(["data", "shards", "fashion-mnist", url, "--limit", "240", "--shard-mb", "0.01",
                 "--workers", "1"]) == 0

    free = ImageStreamDataset(url, batch_size=8, image_size=28, cache_dir=str(tmp_path / "free"), with_keys=True)
    assert free.num_shards >= 10
    loader = make_loader(free)
    for _epoch in range(2):  # the second epoch runs entirely on the fast path
        keys = [k for batch in loader for k in batch["key"]]
        assert len(keys) == 240 and len(set(keys)) == 240
    assert free._local_shards == set(range(free.num_shards))
    del loader, free

    largest = max(s.get_max_size() for s in ImageStreamDataset(
        url, batch_size=8, image_size=28, cache_dir=str(tmp_path / "probe")).shards)
    limit = 5 * largest  # Streaming requires at least 4; the dataset is 14 shards
    capped = ImageStreamDataset(url, batch_size=8, image_size=28, cache_dir=str(tmp_path / "capped"),
                                with_keys=True, cache_limit=limit)
    keys = [k for batch in make_loader(capped) for k in batch["key"]]
    assert len(keys) == 240 and len(set(keys)) == 240
    assert _cache_bytes(tmp_path / "capped") <= limit  # older shards were evicted on the way
    assert not getattr(capped, "_local_shards", set())
