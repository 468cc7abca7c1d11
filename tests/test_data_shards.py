"""`data shards` on a local destination: original bytes kept, labels in class order, corrupt files named, a killed
conversion resumed without losing or duplicating a sample; `data verify` finds tampering; missing shards named."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmvae_scale.cli import main
from dmvae_scale.data.shards import CorruptImageError, write_shards
from dmvae_scale.data.storage import StorageError
from dmvae_scale.data.stream import ImageStreamDataset
from dmvae_scale.errors import UserError

pytestmark = pytest.mark.integration


def read_all(dest):
    """Every stored sample, read straight from the shard files (independent of StreamingDataset)."""
    from streaming.base.format.mds.reader import MDSReader
    index = json.loads(Path(dest, "index.json").read_text())
    out = []
    for shard in index["shards"]:
        reader = MDSReader.from_json(str(dest), None, shard)
        out += [reader.get_item(i) for i in range(shard["samples"])]
    return out


def test_folder_tree_keeps_bytes_and_labels_and_names_corrupt_file(imagenet_folder, tmp_path, capsys):
    root, info = imagenet_folder
    dest = tmp_path / "shards"
    rc = main(["data", "shards", str(root), str(dest), "--split", "train", "--workers", "2", "--part-size", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 15 images" in out and "1 corrupt skipped" in out
    assert info["corrupt"] in out  # the summary names the bad file

    samples = read_all(dest)
    files = {f"train/{p.relative_to(root / 'train').as_posix()}": p
             for p in (root / "train").rglob("*") if p.is_file() and str(p) != info["corrupt"]}
    assert sorted(s["key"] for s in samples) == sorted(files)
    for s in samples:
        assert s["image"] == files[s["key"]].read_bytes()  # byte-identical, never re-encoded
        wnid = s["key"].split("/")[1]
        assert s["label"] == ["n01440764", "n01443537", "n01484850"].index(wnid)  # sorted synset order
    meta = json.loads((dest / "dataset.json").read_text())
    assert meta["label_counts"] == [5, 5, 5] and meta["corrupt"][0]["path"] == info["corrupt"]

    with pytest.raises(CorruptImageError, match=info["corrupt"]):
        write_shards(str(root), str(tmp_path / "strict"), split="train", on_corrupt="fail", progress=False)


def test_killed_conversion_resumes_without_loss_or_duplicates(tmp_path):
    dest = tmp_path / "fm"
    cmd = [sys.executable, "-m", "dmvae_scale.cli", "data", "shards", "fashion-mnist", str(dest),
           "--limit", "1500", "--part-size", "50", "--workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(dest.glob("part-*/done.json"))) < 3:
            assert proc.poll() is None, "conversion ended before it could be interrupted"
            assert time.monotonic() < deadline, "no part finished within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(list(dest.glob("part-*/done.json")))
    assert not (dest / "index.json").exists() and done_before < 30

    summary = write_shards("fashion-mnist", str(dest), limit=1500, part_size=50, workers=2, progress=False)
    assert summary.reused_parts == done_before and summary.images == 1500
    keys = [s["key"] for s in read_all(dest)]
    assert len(keys) == 1500 and sorted(keys) == [f"fashion-mnist/train/{i:06d}" for i in range(1500)]

    with pytest.raises(UserError, match="different conversion.*num_samples"):
        write_shards("fashion-mnist", str(dest), limit=1000, part_size=50, progress=False)


def test_verify_counts_and_finds_tampered_and_missing_shards(tmp_path, capsys):
    dest = tmp_path / "fm"
    write_shards("fashion-mnist", str(dest), limit=200, part_size=100, shard_bytes=1 << 14, progress=False)
    assert main(["data", "verify", str(dest)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "200 samples" in out and "0 undecodable" in out

    shard = sorted(dest.glob("part-00001/shard.*.mds"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(dest)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out and f"bad shard: part-00001/{shard.name}: sha256" in out

    shard.unlink()
    with pytest.raises(StorageError, match=f"shard part-00001/{shard.name} listed in index.json is missing"):
        ImageStreamDataset(str(dest), batch_size=4, image_size=28)
    assert main(["data", "verify", str(tmp_path / "nothing")]) == 2
    assert "no index.json" in capsys.readouterr().err


def test_verify_names_undecodable_sample(tmp_path, capsys):
    """Shards written by another tool may hold broken images; verify names each by key."""
    import io

    from PIL import Image
    from streaming import MDSWriter

    from dmvae_scale.data.shards import COLUMNS
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    good = buf.getvalue()
    with MDSWriter(out=str(tmp_path / "ds"), columns=COLUMNS, hashes=["sha256"]) as w:
        w.write({"key": "a/good", "label": 0, "image": good})
        w.write({"key": "a/broken", "label": 1, "image": good[:40]})
        w.write({"key": "a/good", "label": 0, "image": good})
    assert main(["data", "verify", str(tmp_path / "ds")]) == 1
    out = capsys.readouterr().out
    assert "3 samples" in out and "1 undecodable" in out and "undecodable: a/broken" in out
    assert "duplicate key: a/good" in out
