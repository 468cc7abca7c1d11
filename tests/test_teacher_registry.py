"""The teacher registry: weight sources, the features' form, batch invariance, and config errors that name the key."""
from __future__ import annotations

import pytest
import torch

from dmvae_scale.config import ConfigError, load_config
from dmvae_scale.distributed import teachers
from dmvae_scale.distributed.teachers import TeacherSpec, build_teacher, spec_from_config
from dmvae_scale.models.vit import WeightsFileError

TINY = TeacherSpec(name="random_vit", image_size=32, grid=8, arch="vit_tiny", patch_size=4, seed=3, chunk=8)
INCEPTION = TeacherSpec(name="inception", image_size=32, grid=8, block="mixed_7", input_size=160, chunk=4)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


@pytest.mark.unit
def test_random_vit_is_a_function_of_its_seed():
    x = _images(5, 0)
    a, b = build_teacher(TINY).encode(x), build_teacher(TINY).encode(x)
    other = build_teacher(TeacherSpec(**{**TINY.__dict__, "seed": 4})).encode(x)
    assert a.shape == (5, 64, 96) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)
    # The features are the frozen ViT's normalised patch tokens, as the tokenizer's encoder produces them.
    assert torch.equal(a, build_teacher(TINY).network(torch.cat([x, torch.zeros(3, 3, 32, 32)]))[:5])


@pytest.mark.unit
@pytest.mark.parametrize("spec", [TINY, INCEPTION], ids=["random_vit", "inception"])
def test_features_of_an_image_do_not_depend_on_its_batch(spec):
    """What lets the service concatenate requests of many workers and still match in-process features bit for bit."""
    torch.set_num_threads(1)
    teacher = build_teacher(spec)
    x = _images(11, 1)
    whole = teacher.encode(x)
    parts = torch.cat([teacher.encode(x[:3]), teacher.encode(x[3:4]), teacher.encode(x[4:])])
    assert torch.equal(whole, parts)


@pytest.mark.unit
def test_inception_teacher_is_the_bundled_pretrained_network_pooled_to_the_grid():
    torch.set_num_threads(2)
    path = teachers.bundled_inception_path()
    assert path.name == "default_1.pt"
    teacher = build_teacher(INCEPTION)
    assert teacher.feature_dim == 768
    x = _images(4, 2)
    feats = teacher.encode(x)
    assert feats.shape == (4, 64, 768)
    assert feats.min() >= 0  # the mixed blocks end in ReLU
    assert (feats[0] - feats[1]).abs().mean() > 1e-3


@pytest.mark.unit
def test_inception_teacher_wiring_matches_the_bundled_network_end_to_end():
    """Block mixed_10 pooled to a 1x1 grid at 299 px is FID's pool3 feature: compare with the file's own graph."""
    import torch.nn.functional as F
    torch.set_num_threads(2)
    spec = TeacherSpec(name="inception", image_size=32, grid=1, block="mixed_10", input_size=299, chunk=2)
    x = _images(2, 5)
    ours = build_teacher(spec).encode(x)[:, 0]
    bundled = torch.jit.load(str(teachers.bundled_inception_path()), map_location="cpu").eval()
    pixels = (x + 1) * 127.5
    with torch.no_grad():
        reference = bundled(F.interpolate((pixels - 128) / 128, size=(299, 299), mode="bilinear",
                                          align_corners=False))
    assert ours.shape == reference.shape == (2, 2048)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_inception_file_with_another_hash_is_refused(monkeypatch):
    monkeypatch.setattr(teachers, "INCEPTION_SHA256", "0" * 64)
    with pytest.raises(WeightsFileError, match="sha256 7ff4a85c.* is not the expected 0000"):
        build_teacher(INCEPTION)


@pytest.mark.unit
def test_inception_block_too_coarse_for_the_grid_is_refused_at_build_time():
    spec = TeacherSpec(**{**INCEPTION.__dict__, "block": "mixed_10", "input_size": 160})
    with pytest.raises(ValueError, match=r"smaller than the latent grid 8"):
        build_teacher(spec)
    with pytest.raises(ConfigError, match="not a TF-Inception block; choose one of conv, "):
        build_teacher(TeacherSpec(**{**INCEPTION.__dict__, "block": "mixed_11"}))


@pytest.mark.unit
def test_spec_from_config_takes_geometry_and_micro_batch_from_the_run():
    cfg = load_config("configs/demo/tokenizer.yaml", ["teacher.name=random_vit", "distributed.num_workers=2"])
    spec = spec_from_config(cfg)
    assert (spec.image_size, spec.grid, spec.arch, spec.patch_size) == (32, 8, "vit_tiny", 4)
    assert spec.chunk == cfg.batch_size // 2 and spec.device == "cpu" and spec.dtype == "float32"
    assert spec.seed == cfg.seed


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["teacher.name=dinov2"], "tokenizer.encoder.arch: 'vit_tiny' has no official DINOv2 weights"),
    (["teacher.name=dinov2", "tokenizer.encoder.arch=vit_s"], "tokenizer.encoder.weights: teacher.name=dinov2 needs"),
    (["teacher.name=dinov2", "tokenizer.encoder.arch=vit_s", "tokenizer.encoder.weights=/w/dinov2_vits14.pth"],
     "tokenizer.encoder.sha256: required with teacher.name=dinov2"),
    (["teacher.name=random_vit", "tokenizer.encoder.weights=/w/x.pth"],
     r"tokenizer.encoder.weights: stage 'tokenizer' does not use it \(only teacher.name=dinov2 reads a weights file\)"),
])
def test_config_errors_name_the_key(overrides, message):
    """A teacher that cannot be built is refused when the config loads (where submit and the pipeline check it),
    and a missing weights file or hash when the teacher is built from a complete config."""
    with pytest.raises(ConfigError, match=message):
        spec_from_config(load_config("configs/demo/tokenizer.yaml", overrides))


@pytest.mark.unit
def test_dinov2_teacher_refuses_a_file_with_the_wrong_hash(tmp_path):
    from dmvae_scale.models.vit import VisionTransformer
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(VisionTransformer("vit_tiny", 28, 14).state_dict(), path)  # a stand-in file; the hash is checked first
    spec = TeacherSpec(name="dinov2", image_size=28, grid=2, arch="vit_s", patch_size=14, weights=str(path),
                       sha256="ab" * 32, chunk=2)
    with pytest.raises(WeightsFileError, match="sha256 mismatch: expected abab"):
        build_teacher(spec)
