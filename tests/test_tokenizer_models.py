"""Tokenizer shapes and freezing, decoder upsampling plan, PatchGAN, DiffAugment, perceptual distance."""

import pytest
import torch

from repo import REPO
from dmvae_scale.config import (DecoderConfig, DiscriminatorConfig, EncoderConfig, TokenizerConfig,
                                load_config)
from dmvae_scale.errors import UserError
from dmvae_scale.models.discriminator import DiffAugment, PatchDiscriminator, consistency_term
from dmvae_scale.models.perceptual import PerceptualDistance
from dmvae_scale.models.conv import upsampling_plan
from dmvae_scale.models.tokenizer import Tokenizer

pytestmark = pytest.mark.unit



def demo_tokenizer_config() -> TokenizerConfig:
    return load_config(REPO / "configs/demo/tokenizer.yaml").tokenizer


def images(b=2, c=3, size=32, seed=0):
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_demo_config_shapes():
    tok = Tokenizer(demo_tokenizer_config())
    recon, z = tok(images())
    assert tok.latent_shape == (4, 8, 8)
    assert z.shape == (2, 4, 8, 8) and recon.shape == (2, 3, 32, 32)
    torch.testing.assert_close(tok.decode(z), recon)
    torch.testing.assert_close(tok.encode(images()), z)  # deterministic: no sampling in encode


def test_64px_patch16_shapes_and_grayscale():
    cfg = TokenizerConfig(image_size=64, in_channels=1, latent_channels=8,
                          encoder=EncoderConfig(arch="vit_tiny", patch_size=16),
                          decoder=DecoderConfig(base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1))
    tok = Tokenizer(cfg)
    recon, z = tok(images(c=1, size=64))
    assert tok.latent_shape == (8, 4, 4) and z.shape == (2, 8, 4, 4)
    assert recon.shape == (2, 1, 64, 64)
    # grayscale reaches the RGB encoder as three equal channels; tokens fill the grid row by row
    gray = images(c=1, size=64)
    tokens = tok.bottleneck(tok.encoder(gray.repeat(1, 3, 1, 1)))  # (B, 16, C)
    torch.testing.assert_close(tok.encode(gray), tokens.transpose(1, 2).reshape(2, 8, 4, 4))
    torch.testing.assert_close(tok.encode(gray)[:, :, 1, 2], tokens[:, 1 * 4 + 2])


def test_upsampling_plan_matches_patch_size():
    # (2x on the latent?, [2x after level i, deepest level first]); the shallowest level never upsamples
    assert upsampling_plan((1, 2, 2), 4) == (False, [True, True, False])  # demo: one 2x per transition
    assert upsampling_plan((1, 2, 4, 4), 16) == (True, [True, True, True, False])  # ImageNet: +1 on the latent
    assert upsampling_plan((1, 2, 4, 4), 8) == (False, [True, True, True, False])
    assert upsampling_plan((1, 2, 4, 4), 4) == (False, [False, True, True, False])  # nearest the output first


@pytest.mark.parametrize("patch,mult", [(8, (1, 2)), (12, (1, 2, 4, 4)), (32, (1, 2, 4, 4))])
def test_unreachable_decoder_factor_names_both_keys(patch, mult):
    cfg = TokenizerConfig(image_size=96, latent_channels=4, encoder=EncoderConfig(arch="vit_tiny", patch_size=patch),
                          decoder=DecoderConfig(base_channels=8, channel_mult=mult, num_res_blocks=1))
    with pytest.raises(UserError) as err:
        Tokenizer(cfg)
    assert "tokenizer.decoder.channel_mult" in str(err.value) and f"tokenizer.encoder.patch_size={patch}" in str(err.value)


def test_frozen_encoder_gets_no_grads_but_bottleneck_and_decoder_do():
    tok = Tokenizer(demo_tokenizer_config())  # demo: encoder.frozen defaults to true
    tok.train()
    assert not tok.encoder.training and tok.decoder.training
    recon, z = tok(images())
    (recon.square().mean() + z.square().mean()).backward()
    assert all(p.grad is None for p in tok.encoder.parameters())
    for part in (tok.bottleneck, tok.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert tok.last_layer is tok.decoder.conv_out.weight

    tok.set_encoder_trainable(True)  # stage 3: end to end
    assert tok.encoder.training
    tok.zero_grad()
    tok(images())[0].square().mean().backward()
    trainable = [n for n, p in tok.encoder.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(tok.encoder.parameters())) - 1  # all but DINOv2's unused mask_token
    assert all(p.grad is not None for p in tok.encoder.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- discriminator

def test_discriminator_outputs_a_patch_map_independent_of_the_batch():
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=16, num_layers=2), in_channels=3)
    x = images(b=3)
    logits = disc(x)
    assert logits.shape == (3, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6
    torch.testing.assert_close(disc(x[:1]), logits[:1], atol=1e-5, rtol=1e-5)  # no batch statistics
    classic = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=3), in_channels=3)
    assert classic(images(b=1, size=256)).shape == (1, 1, 30, 30)  # the 70x70 PatchGAN's map at 256 px


def test_diffaugment_is_differentiable_and_reproducible():
    aug = DiffAugment()
    x = images(b=4, size=16).requires_grad_(True)
    out_a = aug(x, torch.Generator().manual_seed(3))
    out_b = aug(x, torch.Generator().manual_seed(3))
    out_c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)
    out_a.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_translation_is_a_zero_filled_shift():
    x = images(b=3, size=16) + 3  # strictly positive, so zero fill is visible
    out = DiffAugment(("translation",))(x, torch.Generator().manual_seed(0))
    for i in range(3):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ys, yd = (slice(0, 16 - dy), slice(dy, 16)) if dy >= 0 else (slice(-dy, 16), slice(0, 16 + dy))
                xs, xd = (slice(0, 16 - dx), slice(dx, 16)) if dx >= 0 else (slice(-dx, 16), slice(0, 16 + dx))
                ref[:, yd, xd] = x[i][:, ys, xs]
                matches.append(torch.equal(out[i], ref))
        assert sum(matches) == 1  # exactly one shift within 1/8 of the side explains the output


def test_cutout_zeroes_at_most_a_half_side_square():
    x = images(b=8, size=16) + 3
    out = DiffAugment(("cutout",))(x, torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros <= 64).all() and (zeros > 0).all()
    assert torch.equal(out[out != 0], x[out != 0])


def test_consistency_term():
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=2))
    x = images(b=2)
    assert consistency_term(disc, x, DiffAugment(()), torch.Generator().manual_seed(0)) == 0
    term = consistency_term(disc, x, DiffAugment(), torch.Generator().manual_seed(0))
    assert term > 0
    term.backward()
    assert disc.net[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- perceptual

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-format VGG16 file with seeded random weights (no pretrained VGG16 exists offline)."""
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).state_dict()  # torchvision's VGG16 feature stack (keys features.N.*)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)  # classifier entries are optional
    return path


def test_perceptual_is_the_lpips_package_distance_with_its_learned_heads(vgg_file):
    import lpips
    ours = PerceptualDistance(vgg_file)
    theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()  # heads from the wheel, trunk below
    trunk = torch.load(vgg_file, weights_only=True)
    for name, param in theirs.net.named_parameters():  # slice{k}.{index}.weight -> features.{index}.weight
        param.data.copy_(trunk["features." + name.split(".", 1)[1]])
    x, y = images(b=3), images(b=3, seed=9)
    want = theirs(x, y).flatten()
    assert torch.allclose(ours(x, y), want, rtol=1e-5, atol=1e-7), (ours(x, y), want)
    # The learned heads matter: equal channel weights would give another number.
    assert float(ours.head0.std()) > 0
    assert torch.equal(ours(x, x), torch.zeros(3))


def test_perceptual_is_differentiable_and_frozen(vgg_file):
    dist = PerceptualDistance(vgg_file)
    x = images(b=2).requires_grad_(True)
    dist(x, images(b=2, seed=5)).sum().backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dist.parameters())
    dist.train()
    assert not dist.training


def test_perceptual_needs_a_vgg_file_and_refuses_the_fid_network(vgg_file, tmp_path):
    from dmvae_scale.models.bundled_inception import find_bundled_inception
    with pytest.raises(UserError, match="loss.perceptual_weights is not set.*loss.perceptual_weight=0"):
        PerceptualDistance()
    inception = find_bundled_inception()
    assert inception is not None
    with pytest.raises(UserError, match="FID Inception.*game the metric"):
        PerceptualDistance(inception)
    with pytest.raises(UserError, match="expected " + "0" * 64):
        PerceptualDistance(vgg_file, sha256="0" * 64)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="missing keys.*features.0.bias"):
        PerceptualDistance(tmp_path / "other.pth")