"""The KL-VAE baseline tokenizer: same latent shape and decoder as DMVAE, a diagonal Gaussian posterior, its KL."""
import pytest
import torch

from dmvae_scale.config import ConfigError, load_config
from dmvae_scale.method.kl import gaussian_kl
from dmvae_scale.models.kl_vae import KLTokenizer
from dmvae_scale.models.tokenizer import Tokenizer

pytestmark = pytest.mark.unit


def _cfgs():
    dmvae = load_config("configs/demo/tokenizer.yaml").tokenizer
    kl = load_config("configs/demo/tokenizer.yaml", ["tokenizer.kind=kl_vae", "tokenizer.encoder.frozen=false",
                                                     "teacher.name=random_vit"]).tokenizer
    return dmvae, kl


def test_same_latent_shape_and_same_decoder_as_dmvae():
    dmvae_cfg, kl_cfg = _cfgs()
    torch.manual_seed(0)
    dmvae, kl = Tokenizer(dmvae_cfg), KLTokenizer(kl_cfg)
    assert kl.latent_shape == dmvae.latent_shape == (4, 8, 8)
    assert kl.decoder.state_dict().keys() == dmvae.decoder.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(kl.decoder.state_dict().values(), dmvae.decoder.state_dict().values()))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, z, mean, logvar = kl(x, torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and z.shape == mean.shape == logvar.shape == (2, 4, 8, 8)
    assert torch.equal(kl.encode(x), mean)  # deterministic latents for statistics and the generator
    # The sample is mean + std * eps with the given generator's eps.
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, mean + torch.exp(0.5 * logvar) * eps, atol=1e-6)


def test_gradients_reach_the_encoder_through_sample_and_kl():
    _, kl_cfg = _cfgs()
    kl = KLTokenizer(kl_cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _, mean, logvar = kl(x)
    ((recon - x).abs().mean() + gaussian_kl(mean, logvar)).backward()
    assert kl.encoder.conv_in.weight.grad.abs().sum() > 0 and kl.bottleneck.weight.grad.abs().sum() > 0
    kl.zero_grad()
    kl.set_encoder_trainable(False)
    recon, _, _, _ = kl(x)
    recon.abs().mean().backward()
    assert kl.encoder.conv_in.weight.grad is None and kl.decoder.conv_out.weight.grad is not None


def test_gaussian_kl_is_the_closed_form_and_zero_at_the_prior():
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)) == 0
    mean, logvar = torch.full((10,), 2.0), torch.full((10,), 0.5)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
                                             torch.distributions.Normal(0.0, 1.0)).mean()
    assert float(gaussian_kl(mean, logvar)) == pytest.approx(float(want), rel=1e-6)


def test_kl_weight_is_refused_for_the_deterministic_tokenizer():
    with pytest.raises(ConfigError, match="loss.kl_weight=0.001 applies to tokenizer.kind=kl_vae only"):
        load_config("configs/demo/tokenizer.yaml", ["loss.kl_weight=0.001"])
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        load_config("configs/demo/tokenizer.yaml", ["tokenizer.kind=sd"])


@pytest.mark.integration
def test_kl_chain_trains_and_the_generator_config_serves_either_latent_space(tmp_path):
    from dmvae_scale.artifacts import load_artifact
    from dmvae_scale.data.artifact_store import open_tokenizer
    from dmvae_scale.models.kl_vae import KLTokenizer
    from dmvae_scale.train.launch import run_local
    small = ["batch_size=16", "data.limit=64", "data.stats_images=32", "log_every_images=16"]
    tok = run_local(load_config("configs/demo/kl_tokenizer.yaml", [f"run_dir={tmp_path}/tok", "total_images=32",
                                                                    "loss.gan_start_step=1", *small]), progress=False)
    assert tok.info.extra["tokenizer_kind"] == "kl_vae" and "kl" in tok.final_metrics
    dec = run_local(load_config("configs/demo/kl_decoder.yaml", [f"run_dir={tmp_path}/dec", "total_images=16",
                                                                  f"inputs.tokenizer={tok.artifact}", *small]),
                    progress=False)
    assert dec.info.latent is not None and dec.info.latent.scale > 0
    # Encoder and posterior stayed exactly as the tokenizer stage handed them on (EMA).
    _, tok_ema = load_artifact(tok.artifact, "ema")
    _, dec_raw = load_artifact(dec.artifact, "raw")
    assert all(torch.equal(dec_raw["tokenizer"][k], tok_ema["tokenizer"][k])
               for k in tok_ema["tokenizer"] if k.startswith(("encoder.", "bottleneck.")))
    # The demo generator config, unchanged but for where its tokenizer comes from.
    gen = run_local(load_config("configs/demo/generator.yaml", [f"run_dir={tmp_path}/gen", "total_images=16",
                                                                 f"inputs.tokenizer={dec.artifact}", *small]),
                    progress=False)
    assert gen.info.latent == dec.info.latent
    model, _ = open_tokenizer(dec.artifact)
    assert isinstance(model, KLTokenizer)
