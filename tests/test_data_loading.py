"""Input-pipeline settings (#20 item 3): data.num_workers / pin_memory / cache_limit / predownload and
distributed.cpus_per_worker load, refuse bad values in one line, and reach the DataLoader and StreamingDataset; the
cache directories of earlier versions of a dataset are removed unless a process still reads them."""
import os
import subprocess
import sys

import pytest

from dmvae_scale.config import ConfigError, cache_limit_bytes, load_config, pin_memory
from dmvae_scale.data.stream import _checked_cache_limit, hold_cache_dir, remove_stale_caches
from dmvae_scale.errors import UserError

pytestmark = pytest.mark.unit

DEMO = "configs/demo/tokenizer.yaml"


def test_keys_load_with_defaults_and_overrides():
    cfg = load_config(DEMO)
    assert (cfg.data.num_workers, cfg.data.pin_memory, cfg.data.cache_limit, cfg.data.predownload,
            cfg.distributed.cpus_per_worker) == (0, "auto", "20gb", None, 1.0)
    cfg = load_config(DEMO, ["data.num_workers=3", "data.pin_memory=true", "data.cache_limit=500mb",
                             "data.predownload=64", "distributed.cpus_per_worker=4"])
    assert (cfg.data.num_workers, cfg.data.pin_memory, cfg.data.cache_limit, cfg.data.predownload,
            cfg.distributed.cpus_per_worker) == (3, True, "500mb", 64, 4.0)
    assert load_config(DEMO, ["data.cache_limit=null"]).data.cache_limit is None


@pytest.mark.parametrize("override, message", [
    ("data.num_workers=-1", "data.num_workers: must be an integer >= 0 (0: load in the training process), got -1"),
    ("data.pin_memory=maybe", "data.pin_memory: expected one of 'auto', True, False, got 'maybe'"),
    ("data.cache_limit=lots", "data.cache_limit: must be a size such as 20gb or 500mb (or null: unbounded), got lots"),
    ("data.predownload=0", "data.predownload: must be a positive number of samples (or null: Streaming's default), "
                           "got 0"),
    ("distributed.cpus_per_worker=0", "distributed.cpus_per_worker: must be a positive number of CPUs, got 0.0"),
])
def test_bad_values_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert str(err.value) == message


def test_sizes_and_pin_memory_resolution():
    assert cache_limit_bytes("20gb") == 20 << 30 and cache_limit_bytes("1.5 MB") == 3 << 19
    assert cache_limit_bytes(4096) == 4096 and cache_limit_bytes("big") == -1
    assert pin_memory(load_config(DEMO)) is False  # auto on CPU workers
    assert pin_memory(load_config(DEMO, ["data.pin_memory=true"])) is True
    cfg = load_config(DEMO)
    cfg.distributed.use_gpu = True
    assert pin_memory(cfg) is True  # auto with GPUs


def test_cache_limit_below_four_shards_refused():
    index = {"shards": [{"raw_data": {"bytes": 3 << 20}}, {"raw_data": {"bytes": 1 << 20}}]}
    assert _checked_cache_limit("12mb", "s3://b/d", index) == 12 << 20
    with pytest.raises(UserError) as err:
        _checked_cache_limit("11mb", "s3://b/d", index)
    assert str(err.value) == ("data.cache_limit=11mb is below four shards of s3://b/d (4 x 3145728 bytes): raise it "
                              "to at least 12mb, or write smaller shards")


def test_settings_reach_loader_and_dataset(tmp_path):
    from dmvae_scale.data.shards import write_shards
    from dmvae_scale.train.batches import make_batches
    write_shards("fashion-mnist", str(tmp_path / "shards"), limit=16, progress=False)
    cfg = load_config(DEMO, [f"data.source={tmp_path / 'shards'}", "data.pin_memory=true", "data.predownload=8",
                             "data.image_size=32", "tokenizer.image_size=32", "tokenizer.encoder.patch_size=16"])
    batches = make_batches(cfg, per_rank_batch=4, rank=0, world=1)
    assert batches.loader.pin_memory is True and batches.loader.num_workers == 0
    assert batches.dataset.predownload == 8
    assert not batches.dataset.cache_limit  # a local dataset is read in place: never evicted
    cfg.data.pin_memory = "auto"
    assert make_batches(cfg, per_rank_batch=4, rank=0, world=1).loader.pin_memory is False


_HOLDER = ("import sys; from dmvae_scale.data.stream import hold_cache_dir; hold_cache_dir(sys.argv[1]); "
           "print('held', flush=True); sys.stdin.read()")


def test_stale_cache_dirs_removed_unless_in_use(tmp_path):
    root = tmp_path / "stream"
    for name in ("aaaa-old1", "aaaa-old2", "aaaa-new", "bbbb-other"):
        (root / name).mkdir(parents=True)
        (root / name / "shard.00000.mds").write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root / "aaaa-old2")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"  # another worker on this node still reads old2
        hold_cache_dir(str(root / "aaaa-new"))
        removed = remove_stale_caches(str(root), "aaaa-", keep=str(root / "aaaa-new"))
        assert removed == [str(root / "aaaa-old1")]
        assert sorted(os.listdir(root)) == ["aaaa-new", "aaaa-old2", "bbbb-other"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # its reader gone, the next new version removes it; a directory this process holds stays
    assert remove_stale_caches(str(root), "aaaa-", keep=str(root / "zzzz")) == [str(root / "aaaa-old2")]
    assert sorted(os.listdir(root)) == ["aaaa-new", "bbbb-other"]


def test_shards_at_training_size_read_back_as_resizing_at_load(tmp_path):
    import numpy as np
    from PIL import Image
    from dmvae_scale.data.shards import read_dataset_info, write_shards
    from dmvae_scale.data.stream import ImageStreamDataset
    rng = np.random.default_rng(0)
    for i in range(4):  # smooth photo-like images, wider and taller than they are long
        w, h = (120, 90) if i % 2 else (80, 110)
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([128 + 90 * np.sin(xx / (7 + i)), 128 + 90 * np.cos(yy / 9), (xx + yy) % 256], -1)
        d = tmp_path / "photos" / "train" / f"n{i % 2:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rgb + rng.normal(0, 3, rgb.shape)).clip(0, 255).astype(np.uint8)).save(d / f"{i}.JPEG",
                                                                                                  quality=90)
    write_shards(str(tmp_path / "photos"), str(tmp_path / "full"), progress=False)
    write_shards(str(tmp_path / "photos"), str(tmp_path / "small"), progress=False, image_size=32)
    assert read_dataset_info(str(tmp_path / "small"))["image_size"] == 32
    assert read_dataset_info(str(tmp_path / "full"))["image_size"] is None

    def images(url):
        ds = ImageStreamDataset(url, batch_size=1, image_size=32, crop="center", hflip=False, shuffle=False,
                                with_keys=True)
        return {ds[i]["key"]: ds[i]["image"] for i in range(ds.num_samples)}
    full, small = images(str(tmp_path / "full")), images(str(tmp_path / "small"))
    assert sorted(full) == sorted(small)
    for key in full:
        assert small[key].shape == (3, 32, 32)
        assert (small[key] - full[key]).abs().mean() < 0.03  # JPEG re-encoding only: ~4 of 255 levels at 32 px
    with pytest.raises(UserError, match="image_size must be a positive number of pixels"):
        write_shards(str(tmp_path / "photos"), str(tmp_path / "bad"), progress=False, image_size=0)
