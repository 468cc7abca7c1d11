"""DINOv2 layout and loader: official key names/shapes, strict loading, sha256, resampling of pos grid and kernel."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from dmvae_scale.config import DecoderConfig, EncoderConfig, TokenizerConfig
from dmvae_scale.errors import UserError
from dmvae_scale.models.tokenizer import Tokenizer
from dmvae_scale.models.vit import (VisionTransformer, load_dinov2_weights, resample_patch_kernel,
                                    resample_pos_embed)

pytestmark = pytest.mark.unit


def official_dinov2_shapes(dim: int, depth: int, ffn: str = "mlp") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an official `dinov2_vit*14_pretrain.pth` (518 px, patch 14 -> 37x37 grid).

    Source: facebookresearch/dinov2, hub settings in dinov2/hub/backbones.py (img_size=518, patch_size=14,
    init_values=1.0 -> LayerScale `ls1/ls2.gamma`, block_chunks=0 -> flat `blocks.N`, no register tokens, ffn "mlp",
    "swiglufused" for ViT-g), modules from dinov2/models/vision_transformer.py and dinov2/layers/ (attention.py: qkv
    and proj with bias; mlp.py: fc1/fc2; swiglu_ffn.py: w12/w3 with hidden (int(4D*2/3)+7)//8*8; patch_embed.py:
    proj conv; mask_token (1, D)). Written out here by hand, independent of our model code.
    """
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                       p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                       p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,), p + "ls1.gamma": (dim,),
                       p + "norm2.weight": (dim,), p + "norm2.bias": (dim,), p + "ls2.gamma": (dim,)})
        if ffn == "mlp":
            shapes.update({p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                           p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})
        else:
            hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
            shapes.update({p + "mlp.w12.weight": (2 * hidden, dim), p + "mlp.w12.bias": (2 * hidden,),
                           p + "mlp.w3.weight": (dim, hidden), p + "mlp.w3.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def make_vits14_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_dinov2_shapes(384, 12).items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("gamma"):
            state[key] = 0.1 + 0.05 * torch.rand(shape, generator=g)
        else:
            state[key] = 0.02 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def vits14_file(tmp_path_factory):
    state = make_vits14_state()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("arch,dim,depth,ffn", [("vit_s", 384, 12, "mlp"), ("vit_b", 768, 12, "mlp"),
                                                ("vit_l", 1024, 24, "mlp"), ("vit_g", 1536, 40, "swiglu")])
def test_model_layout_equals_official_checkpoint_layout(arch, dim, depth, ffn):
    with torch.device("meta"):  # shapes only: ViT-g would need 4.5 GB otherwise
        model = VisionTransformer(arch, image_size=518, patch_size=14)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_dinov2_shapes(dim, depth, ffn)


def test_official_vits14_loads_strictly_into_224px_patch16(vits14_file):
    path, state = vits14_file
    model = VisionTransformer("vit_s", image_size=224, patch_size=16)
    load_dinov2_weights(model, path)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 384)
    assert model.patch_embed.proj.weight.shape == (384, 3, 16, 16)
    torch.testing.assert_close(model.pos_embed[:, 0], state["pos_embed"][:, 0], rtol=0, atol=0)  # class pos kept
    torch.testing.assert_close(model.blocks[7].attn.qkv.weight, state["blocks.7.attn.qkv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[11].ls2.gamma, state["blocks.11.ls2.gamma"], rtol=0, atol=0)
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        tokens = model(images)
        grid = model.forward_grid(images)
    assert tokens.shape == (2, 196, 384) and torch.isfinite(tokens).all()
    assert grid.shape == (2, 384, 14, 14)
    torch.testing.assert_close(grid[:, :, 3, 5], tokens[:, 3 * 14 + 5])  # row-major token order


def test_renamed_and_extra_keys_are_named_in_the_error(vits14_file, tmp_path):
    _, state = vits14_file
    bad = dict(state)
    bad["blocks.0.attn.qkv_renamed.weight"] = bad.pop("blocks.0.attn.qkv.weight")
    bad["head.weight"] = torch.zeros(10, 384)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(UserError) as err:
        load_dinov2_weights(VisionTransformer("vit_s", 224, 16), path)
    msg = str(err.value)
    assert "missing keys [blocks.0.attn.qkv.weight]" in msg
    assert "blocks.0.attn.qkv_renamed.weight" in msg and "head.weight" in msg


def test_checkpoint_of_another_size_names_the_key_and_shapes(tmp_path):
    state = {k: torch.zeros(s) for k, s in official_dinov2_shapes(96, 4).items()}
    state["blocks.2.mlp.fc1.weight"] = torch.zeros(100, 96)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"'blocks.2.mlp.fc1.weight' has shape \(100, 96\).*needs \(384, 96\)"):
        load_dinov2_weights(VisionTransformer("vit_tiny", 32, 4), path)


def test_sha256_is_checked(vits14_file):
    path, _ = vits14_file
    wrong = "0" * 64
    with pytest.raises(UserError) as err:
        load_dinov2_weights(VisionTransformer("vit_s", 224, 16), path, sha256=wrong)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in str(err.value) and wrong in str(err.value) and actual in str(err.value)
    load_dinov2_weights(VisionTransformer("vit_s", 224, 16), path, sha256=actual.upper())  # right hash loads


def test_same_geometry_load_is_an_exact_identity(vits14_file):
    path, state = vits14_file
    model = load_dinov2_weights(VisionTransformer("vit_s", 518, 14), path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert torch.equal(resample_pos_embed(pos, 37), pos)


def test_resampled_pos_embed_reproduces_a_linear_grid():
    # a position embedding that is linear in the patch-centre coordinate must stay linear in the new centres
    g0, g1 = 37, 16
    centres0 = (torch.arange(g0) + 0.5) / g0
    ramp = (centres0.view(g0, 1) * 2 + centres0.view(1, g0) * -3).reshape(1, g0 * g0, 1)
    pos = torch.cat([torch.full((1, 1, 1), 7.0), ramp], dim=1)
    out = resample_pos_embed(pos, g1)
    centres1 = (torch.arange(g1) + 0.5) / g1
    want = (centres1.view(g1, 1) * 2 + centres1.view(1, g1) * -3)
    assert out[0, 0, 0] == 7.0
    # bicubic with border clamping bends the outermost ring; the interior must be linear to 1e-3
    torch.testing.assert_close(out[0, 1:, 0].view(g1, g1)[2:-2, 2:-2], want[2:-2, 2:-2], atol=1e-3, rtol=0)


def test_resampled_kernel_preserves_patch_tokens_of_an_upsampled_image():
    g = torch.Generator().manual_seed(1)
    kernel = torch.randn(64, 3, 14, 14, generator=g)
    new = resample_patch_kernel(kernel, 16)
    # patch by patch the pseudo-inverse makes it exact (up to float32 rounding): <up(x), w'> = <x, w>
    patches = torch.randn(8, 3, 14, 14, generator=g)
    up = F.interpolate(patches, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    ref = F.conv2d(patches, kernel)
    assert (F.conv2d(up, new) - ref).abs().max() < 1e-5 * ref.abs().max()
    # whole smooth images upsampled 224 -> 256 px: tokens agree within 2% (relative L2), borders blur slightly
    image = F.interpolate(torch.randn(2, 3, 16, 16, generator=g), size=(224, 224), mode="bicubic", align_corners=False)
    tokens14 = F.conv2d(image, kernel, stride=14)
    image256 = F.interpolate(image, size=(256, 256), mode="bicubic", align_corners=False, antialias=True)
    tokens16 = F.conv2d(image256, new, stride=16)
    assert ((tokens16 - tokens14).norm() / tokens14.norm()) < 0.02


def test_tokenizer_loads_configured_weights(vits14_file):
    path, state = vits14_file
    cfg = TokenizerConfig(image_size=224, latent_channels=4,
                          encoder=EncoderConfig(arch="vit_s", patch_size=16, weights=str(path)),
                          decoder=DecoderConfig(base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1,
                                                mid_attention=False))
    tok = Tokenizer(cfg)
    torch.testing.assert_close(tok.encoder.blocks[0].mlp.fc2.weight, state["blocks.0.mlp.fc2.weight"], rtol=0, atol=0)
    assert tok.latent_shape == (4, 14, 14)
    cfg.encoder.sha256 = "f" * 64
    with pytest.raises(UserError, match="sha256 mismatch"):
        Tokenizer(cfg)
    cfg.encoder.weights = str(path.parent / "absent.pth")
    with pytest.raises(UserError, match="not found"):
        Tokenizer(cfg)
