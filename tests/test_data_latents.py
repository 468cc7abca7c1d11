"""`data cache-latents`: latents of each image and of its mirror, from a saved tokenizer artifact, with the
artifact's latent normalisation carried along; served back by LatentStreamDataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from repo import tokenizer_artifact as demo_tokenizer_artifact
from dmvae_scale.artifacts import ArtifactInfo, LatentSpec, save_artifact
from dmvae_scale.cli import main
from dmvae_scale.config import config_hash, dump_yaml, load_config
from dmvae_scale.data.builtin import load_fashion_mnist
from dmvae_scale.data.latents import LatentStreamDataset
from dmvae_scale.data.shards import write_shards
from dmvae_scale.data.stream import make_loader
from dmvae_scale.data.transforms import ImageTransform, sample_rng
from dmvae_scale.models.tokenizer import Tokenizer

pytestmark = pytest.mark.integration
N = 48


@pytest.fixture(scope="module")
def tokenizer_artifact(tmp_path_factory):
    """A freshly initialised demo tokenizer saved as a stage artifact (the real stage's output has this form)."""
    d = tmp_path_factory.mktemp("tok") / "artifact"
    info, tok, _ = demo_tokenizer_artifact(d, latent=(0.25, 1.5))
    return d, info, tok


def test_cache_latents_matches_encoding_and_serves_flips(tokenizer_artifact, tmp_path, capsys):
    art_dir, info, tok = tokenizer_artifact
    src, dest = tmp_path / "fm", tmp_path / "latents"
    write_shards("fashion-mnist", str(src), limit=N, part_size=N, progress=False)
    assert main(["data", "cache-latents", str(src), str(dest), "--tokenizer", str(art_dir), "--weights", "raw",
                 "--batch-size", "16", "--workers", "0", "--device", "cpu"]) == 0
    assert f"cached latents of {N} images" in capsys.readouterr().out

    meta = json.loads((dest / "latents.json").read_text())
    assert meta["tokenizer"] == info.id and meta["latent_from"] == "artifact"
    assert meta["latent"] == {"channels": 4, "height": 8, "width": 8, "mean": 0.25, "scale": 1.5}
    assert meta["images"] == N and meta["measured"]["scale"] > 0

    images, labels = load_fashion_mnist("train")
    ds = LatentStreamDataset(str(dest), batch_size=8, hflip=False, with_keys=True, shuffle=False)
    assert ds.latent_spec == LatentSpec(4, 8, 8, 0.25, 1.5) and ds.tokenizer_id == info.id
    seen = {}
    for batch in make_loader(ds):
        for key, z, y in zip(batch["key"], batch["latent"], batch["label"]):
            seen[key] = z
            assert int(y) == labels[int(key.rsplit("/", 1)[1])]
    assert sorted(seen) == [f"fashion-mnist/train/{i:06d}" for i in range(N)]

    # the cached latent is the tokenizer's encoding of the ADM-cropped image (fp16 storage), the flip likewise
    transform = ImageTransform(32, "adm", hflip=False)
    for i in (0, 17, 40):
        raw = ds.get_item(i)
        key_index = int(raw["key"].rsplit("/", 1)[1])
        x = transform(Image.fromarray(images[key_index]).convert("RGB"), sample_rng(0, 0, 0))[None]
        with torch.no_grad():
            z, z_flip = tok.encode(x)[0], tok.encode(x.flip(-1))[0]
        torch.testing.assert_close(torch.from_numpy(raw["latent"].astype(np.float32)), z, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(raw["latent_flip"].astype(np.float32)), z_flip,
                                   atol=2e-3, rtol=2e-3)
        assert not torch.allclose(z, z_flip, atol=1e-3)
    del ds

    flipping = LatentStreamDataset(str(dest), batch_size=8, hflip=True, seed=3, with_keys=True, shuffle=False)
    chosen = [flipping[i] for i in range(N)]
    n_flipped = sum(not torch.equal(c["latent"], seen[c["key"]]) for c in chosen)
    assert 8 < n_flipped < 40  # about half take the mirrored image's latent
    assert all(torch.equal(c["latent"], flipping[i]["latent"]) for i, c in enumerate(chosen[:8]))  # deterministic
    del flipping

    assert main(["data", "verify", str(dest)]) == 0


def test_cache_latents_from_and_to_s3(tokenizer_artifact, s3_bucket, tmp_path, capsys):
    art_dir, info, _ = tokenizer_artifact
    src, dest = f"{s3_bucket}/fm", f"{s3_bucket}/latents"
    write_shards("fashion-mnist", src, limit=20, progress=False)
    assert main(["data", "cache-latents", src, dest, "--tokenizer", str(art_dir), "--weights", "raw",
                 "--batch-size", "8", "--workers", "0", "--device", "cpu", "--limit", "12"]) == 0
    assert "cached latents of 12 images" in capsys.readouterr().out
    ds = LatentStreamDataset(dest, batch_size=4, cache_dir=str(tmp_path / "cache"))
    assert ds.num_samples == 12 and ds.tokenizer_id == info.id
    batch = next(iter(make_loader(ds)))
    assert batch["latent"].shape == (4, 4, 8, 8) and torch.isfinite(batch["latent"]).all()
    del ds
    assert main(["data", "cache-latents", src, dest, "--tokenizer", str(art_dir), "--weights", "raw"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The generator stage trains on the cache
# ---------------------------------------------------------------------------------------------------------------------

def _generator_cfg(art_dir, cache, run_dir, total):
    return load_config("configs/demo/generator.yaml", [
        f"inputs.tokenizer={art_dir}", "inputs.tokenizer_weights=raw", f"data.latents={cache}", f"run_dir={run_dir}",
        "batch_size=8", f"total_images={total}", "log_every_images=8", "ckpt_every_images=16", "data.num_workers=0"])


def _fm_losses(result) -> dict:
    return {h["images"]: h["fm_loss"] for h in result.history}


def _train(cfg):
    from worker_process import train_in_process
    return train_in_process(cfg, _fm_losses)


def test_generator_trains_on_cached_latents_resumes_exactly_and_refuses_another_tokenizers_cache(
        tokenizer_artifact, tmp_path):
    from dmvae_scale.train.stages import StageInputError, build_stage
    art_dir, info, _ = tokenizer_artifact
    src, cache = tmp_path / "fm", tmp_path / "latents"
    write_shards("fashion-mnist", str(src), limit=N, part_size=N, progress=False)
    assert main(["data", "cache-latents", str(src), str(cache), "--tokenizer", str(art_dir), "--weights", "raw",
                 "--batch-size", "16", "--workers", "0", "--device", "cpu"]) == 0

    stage = build_stage(_generator_cfg(art_dir, cache, tmp_path / "x", 8))
    assert set(stage.models()) == {"generator"} and stage.teacher_spec is None  # no encoder runs on a cache
    assert stage.latent == LatentSpec(4, 8, 8, 0.25, 1.5)

    # A cache made by another tokenizer is refused, naming both.
    other_cfg = load_config("configs/demo/tokenizer.yaml", ["tokenizer.latent_channels=4"])
    torch.manual_seed(1)
    other = Tokenizer(other_cfg.tokenizer, load_pretrained=False)
    other_dir = tmp_path / "other" / "artifact"
    other_info = save_artifact(other_dir, ArtifactInfo("tokenizer", [], config_hash(other_cfg),
                                                       latent=LatentSpec(4, 8, 8, 0.25, 1.5)),
                               {"tokenizer": other.state_dict()}, config_yaml=dump_yaml(other_cfg))
    with pytest.raises(StageInputError, match=rf"data.latents: .* holds latents of tokenizer {info.id}, but "
                                              rf"inputs.tokenizer=.* is tokenizer {other_info.id}"):
        build_stage(_generator_cfg(other_dir, cache, tmp_path / "y", 8))

    # Train 32 images straight, and 16 then 32 in the same run directory: the resumed half is the same trajectory.
    straight = _train(_generator_cfg(art_dir, cache, tmp_path / "straight", 32))
    first = _train(_generator_cfg(art_dir, cache, tmp_path / "split", 16))
    second = _train(_generator_cfg(art_dir, cache, tmp_path / "split", 32))
    assert sorted(straight) == [8.0, 16.0, 24.0, 32.0] and sorted(first) == [8.0, 16.0]
    assert sorted(second) == [24.0, 32.0]  # only the missing images were trained
    for images in (8.0, 16.0):
        assert first[images] == pytest.approx(straight[images], rel=1e-6)
    for images in (24.0, 32.0):
        assert second[images] == pytest.approx(straight[images], rel=1e-6)
