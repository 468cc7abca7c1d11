"""Analytic FLOPs against torch's FlopCounterMode, attention flop formulas, and the peak FLOP/s lookup."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dmvae_scale.cli import main as cli_main
from dmvae_scale.config import DecoderConfig, DiTConfig, EncoderConfig, TokenizerConfig
from dmvae_scale.models.dit import LightningDiT
from dmvae_scale.models.flops import (attention_flops, dit_flops, flash_attn_backward_flop, flash_attn_forward_flop,
                                      peak_bf16_flops, register_attention_flop_formulas, tokenizer_flops)
from dmvae_scale.models.tokenizer import Tokenizer

pytestmark = pytest.mark.unit


def counted_dit(cfg: DiTConfig, batch: int = 2) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of one training step, counted on the meta device."""
    with torch.device("meta"):
        model = LightningDiT(cfg)
        x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        t, y = torch.rand(batch), torch.zeros(batch, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x, t, y)
        forward = counter.get_total_flops()
        out.sum().backward()
    return forward / batch, counter.get_total_flops() / batch


@pytest.mark.parametrize("size,patch,input_size,channels,checkpointing", [
    ("S", 1, 16, 32, False), ("B", 2, 16, 32, False), ("XL", 1, 16, 32, False), ("XL", 2, 32, 4, False),
    ("XXL", 2, 16, 32, True),  # one size above XL, with activation checkpointing (the blocks' forward runs twice)
])
def test_dit_flops_match_flop_counter(size, patch, input_size, channels, checkpointing):
    cfg = DiTConfig(size=size, patch_size=patch, input_size=input_size, in_channels=channels, attention="math",
                    grad_checkpointing=checkpointing)
    forward, train = counted_dit(cfg)
    analytic = dit_flops(cfg)
    assert analytic.forward == pytest.approx(forward, rel=0.02)
    assert analytic.train == pytest.approx(train, rel=0.02)
    # Backward is about twice the forward; checkpointing adds about one more forward.
    assert analytic.backward / analytic.forward == pytest.approx(2.0, rel=0.01)
    assert analytic.train / analytic.forward == pytest.approx(4.0 if checkpointing else 3.0, rel=0.01)


def test_dit_flops_known_value():
    """XL/2 on a 32x32x4 latent grid (SD-VAE's 256px images): DiT's paper quotes 118.6 GFLOPs per forward for a
    GELU MLP and no QK-norm/RoPE; LightningDiT's SwiGLU keeps the parameter count, so the matmul count is close."""
    analytic = dit_flops(DiTConfig(size="XL", patch_size=2, input_size=32, in_channels=4))
    assert analytic.forward / 1e9 == pytest.approx(2 * 118.6, rel=0.03)  # the paper counts multiply-adds


@pytest.mark.parametrize("tcfg", [
    TokenizerConfig(),  # the paper's ViT-L/16 on 256 px, decoder [1, 2, 4, 4]
    TokenizerConfig(image_size=32, in_channels=1, latent_channels=8, encoder=EncoderConfig(arch="vit_tiny", patch_size=4),
                    decoder=DecoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)),
    TokenizerConfig(kind="kl_vae", latent_channels=4, encoder=EncoderConfig(patch_size=8)),  # SD-VAE-like baseline
    TokenizerConfig(kind="kl_vae", image_size=32, in_channels=1, latent_channels=4,
                    encoder=EncoderConfig(patch_size=4), decoder=DecoderConfig(base_channels=32, channel_mult=(1, 2, 2),
                                                                               num_res_blocks=1)),
])
def test_tokenizer_flops_match_flop_counter(tcfg):
    from dmvae_scale.models.kl_vae import KLTokenizer
    with torch.device("meta"):
        tokenizer = KLTokenizer(tcfg) if tcfg.kind == "kl_vae" else Tokenizer(tcfg, load_pretrained=False)
        images = torch.randn(1, tcfg.in_channels, tcfg.image_size, tcfg.image_size)
    counted = {}
    for part, run in [("encoder", lambda: tokenizer.encoder(images.expand(-1, 3, -1, -1))),
                      ("whole", lambda: tokenizer.decode(tokenizer.encode(images)))]:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run()
        counted[part] = counter.get_total_flops()
    analytic = tokenizer_flops(tcfg)
    assert analytic.encoder == pytest.approx(counted["encoder"], rel=0.02)
    assert analytic.forward == pytest.approx(counted["whole"], rel=0.02)


def test_cpu_sdpa_counted_once_registered():
    """torch counts nothing for SDPA's fused CPU kernel; after registration it counts what the math path counts."""
    q = torch.randn(2, 3, 40, 16, requires_grad=True)
    register_attention_flop_formulas()
    counter = FlopCounterMode(display=False)
    with counter:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * attention_flops(40, 40, 3, 16)
    assert register_attention_flop_formulas() == []  # idempotent


def test_flash_attn_formula_matches_sdpa_count():
    """The formula registered for flash_attn's ops (tensors (B, N, heads, d)) counts what torch counts for SDPA on
    the same attention (tensors (B, heads, N, d)), forward and backward."""
    b, n_q, n_k, h, d, d_v = 2, 24, 40, 4, 16, 8
    q = torch.randn(b, h, n_q, d, device="meta", requires_grad=True)
    k = torch.randn(b, h, n_k, d, device="meta", requires_grad=True)
    v = torch.randn(b, h, n_k, d_v, device="meta", requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        out = F.scaled_dot_product_attention(q, k, v)
        forward = counter.get_total_flops()
        out.sum().backward()
    backward = counter.get_total_flops() - forward
    flash_shapes = [(b, n_q, h, d), (b, n_k, h, d), (b, n_k, h, d_v)]
    assert flash_attn_forward_flop(*flash_shapes, 0.0, None, False) == forward
    assert flash_attn_backward_flop((b, n_q, h, d_v), *flash_shapes) == backward


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H800 PCIe", 756e12), ("NVIDIA H800", 989.4e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GH200 480GB", 989.4e12), ("h200", 989.4e12),
])
def test_peak_lookup_tells_variants_apart(name, peak):
    assert peak_bf16_flops(name).flops == pytest.approx(peak)


def test_peak_lookup_scales_mig_slices_and_names_unknowns():
    by_slices = peak_bf16_flops("NVIDIA A100-SXM4-40GB MIG 1g.5gb")
    assert by_slices.flops == pytest.approx(312e12 / 7) and "1/7" in by_slices.note
    by_sms = peak_bf16_flops("NVIDIA H100 80GB HBM3 MIG 3g.40gb", sm_count=60)
    assert by_sms.flops == pytest.approx(989.4e12 * 60 / 132) and "60/132 SMs" in by_sms.note
    unknown = peak_bf16_flops("Tesla K80")
    assert unknown.flops is None and "Tesla K80" in unknown.note


def test_models_command_shows_gflops(capsys):
    assert cli_main(["models", "--input-size", "16", "--in-channels", "32"]) == 0
    out = capsys.readouterr().out
    xl1 = next(line for line in out.splitlines() if line.startswith("XL/1 "))
    gflops = dit_flops(DiTConfig(size="XL", patch_size=1)).forward / 1e9
    assert f"{gflops:.1f}" in xl1 and "GFLOPs fwd" in out


@pytest.mark.integration
def test_a_training_run_logs_the_counted_and_the_analytic_flops_per_image_and_they_agree(tmp_path):
    """The reference stage on N(0, I) samples trains the DiT alone: FlopCounterMode's count of its first step (with
    the attention formulas registered) and models/flops.py's figure, both in the log, agree within 2%."""
    from dmvae_scale.config import load_config
    from dmvae_scale.train.launch import run_local
    cfg = load_config("configs/demo/reference.yaml", [
        f"run_dir={tmp_path}/ref", "reference.kind=gaussian", "inputs.tokenizer=null", "batch_size=8",
        "total_images=16", "log_every_images=8", "ckpt_every_images=0", "data.limit=64"])
    result = run_local(cfg, device="cpu", progress=False)
    last = result.history[-1]  # the first interval ends before the counted step's count is closed
    counted, analytic = last["gflops_per_image"], last["gflops_per_image_analytic"]
    assert analytic > 0 and abs(counted - analytic) / analytic < 0.02, (counted, analytic)
