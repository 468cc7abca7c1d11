"""Analytic FLOPs of our models, the peak dense bf16 FLOP/s of accelerators, and attention flop formulas.

FLOPs are counted the way `torch.utils.flop_counter.FlopCounterMode` counts them, so the analytic number and the
counted one in a training log agree: only matrix products (linear layers, convolutions, attention's two batched
products) at 2 FLOPs per multiply-add; norms, activations, softmax and RoPE are left out (a few percent of the time,
none of the tensor-core work MFU is about). Backward is twice the forward for every product whose input needs a
gradient and once for those whose input does not (the patch embedding of latents, the first timestep layer), and
attention's backward is twice its forward (torch's convention; FlashAttention's backward also recomputes Q K^T,
which is real work but not counted as model FLOPs). Activation checkpointing adds one more forward of the blocks.

    dit_flops(cfg)          # DiTFlops(forward=..., backward=..., recompute=...) per image, .train = sum
    tokenizer_flops(tcfg)   # encoder / bottleneck / decoder forward per image
    peak_bf16_flops("NVIDIA H100 PCIe")  -> PeakFlops(flops=756e12, key="H100 PCIe", note=...)
    register_attention_flop_formulas()   # lets FlopCounterMode see CPU SDPA and flash_attn's ops

This module needs torch only (no yaml / ray / deepspeed), so tools/gpu_throughput.py can use it on a bare machine.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from ..config import DecoderConfig, DiTConfig, TokenizerConfig
from .dit import resolve_shape
from .layers import swiglu_hidden
from .vit import VIT_ARCHS, dinov2_swiglu_hidden

TIMESTEP_FREQ_DIM = 256  # layers.TimestepEmbedding's sinusoid width


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def attention_flops(tokens_q: int, tokens_k: int, heads: int, head_dim_qk: int, head_dim_v: int | None = None) -> int:
    """Forward FLOPs of softmax(Q K^T) V for one sample: the two batched products (non-causal)."""
    head_dim_v = head_dim_qk if head_dim_v is None else head_dim_v
    return 2 * heads * tokens_q * tokens_k * head_dim_qk + 2 * heads * tokens_q * tokens_k * head_dim_v


# ----------------------------------------------------------------------------------------------------------------------
# LightningDiT
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiTFlops:
    """FLOPs per image of one LightningDiT training step (one forward, one backward), FlopCounterMode's counting."""

    forward: int
    backward: int
    recompute: int  # the blocks' second forward under activation checkpointing (0 without)
    attention_forward: int  # part of `forward` spent in attention's two products

    @property
    def train(self) -> int:
        return self.forward + self.backward + self.recompute


def dit_flops(cfg: DiTConfig) -> DiTFlops:
    """Per-image FLOPs of the LightningDiT `cfg` describes (any size, patch, latent grid and channel count)."""
    shape = resolve_shape(cfg)
    d, depth, heads = shape.hidden_size, shape.depth, shape.num_heads
    n = (cfg.input_size // cfg.patch_size) ** 2
    hidden = swiglu_hidden(d, cfg.mlp_ratio)
    patch_in = cfg.in_channels * cfg.patch_size ** 2

    patch_embed = _linear(n, patch_in, d)  # a stride-p conv is a linear map of each p x p patch
    t_first, t_second = _linear(1, TIMESTEP_FREQ_DIM, d), _linear(1, d, d)
    attn = attention_flops(n, n, heads, d // heads)
    block = (_linear(1, d, 6 * d)  # adaLN modulation, once per image
             + _linear(n, d, 3 * d) + attn + _linear(n, d, d)  # qkv, attention, proj
             + _linear(n, d, 2 * hidden) + _linear(n, hidden, d))  # SwiGLU w12, w3
    final = _linear(1, d, 2 * d) + _linear(n, d, patch_in)
    forward = patch_embed + t_first + t_second + depth * block + final
    # Backward: input and weight gradients (2x) everywhere except where the input needs none (latents, sinusoid).
    backward = 2 * forward - patch_embed - t_first
    recompute = depth * block if cfg.grad_checkpointing else 0
    return DiTFlops(forward, backward, recompute, depth * attn)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer parts
# ----------------------------------------------------------------------------------------------------------------------

def vit_forward_flops(arch: str, image_size: int, patch_size: int) -> int:
    """Forward FLOPs per image of the SSL ViT encoder (class token included in the sequence)."""
    spec = VIT_ARCHS[arch]
    d = spec.dim
    grid = image_size // patch_size
    n = grid * grid + 1
    mlp = (_linear(n, d, 2 * dinov2_swiglu_hidden(4 * d)) + _linear(n, dinov2_swiglu_hidden(4 * d), d)
           if spec.ffn == "swiglu" else _linear(n, d, 4 * d) + _linear(n, 4 * d, d))
    block = _linear(n, d, 3 * d) + attention_flops(n, n, spec.heads, d // spec.heads) + _linear(n, d, d) + mlp
    return _linear(grid * grid, 3 * patch_size ** 2, d) + spec.depth * block


def bottleneck_forward_flops(dim: int, latent_channels: int, tokens: int) -> int:
    """Per-token MLP D -> 2D -> C over `tokens` tokens."""
    return _linear(tokens, dim, 2 * dim) + _linear(tokens, 2 * dim, latent_channels)


def _conv(side: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * side * side * c_in * c_out * kernel * kernel


def _resnet(side: int, c_in: int, c_out: int) -> int:
    skip = _conv(side, c_in, c_out, 1) if c_in != c_out else 0
    return _conv(side, c_in, c_out, 3) + _conv(side, c_out, c_out, 3) + skip


def decoder_forward_flops(cfg: DecoderConfig, latent_channels: int, out_channels: int, factor: int,
                          latent_side: int) -> int:
    """Forward FLOPs per image of conv.ConvDecoder (same layer plan as its constructor)."""
    from .conv import upsampling_plan
    on_latent, after_level = upsampling_plan(tuple(cfg.channel_mult), factor)
    widths = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]
    side, ch, total = latent_side, widths[0], 0
    if on_latent:
        side *= 2
        total += _conv(side, latent_channels, latent_channels, 3)
    total += _conv(side, latent_channels, ch, 3) + 2 * _resnet(side, ch, ch)
    if cfg.mid_attention:  # 1x1 qkv and proj convs + single-head attention over side^2 positions
        total += _conv(side, ch, 3 * ch, 1) + _conv(side, ch, ch, 1) + attention_flops(side ** 2, side ** 2, 1, ch)
    for width, up in zip(widths, after_level):
        for _ in range(cfg.num_res_blocks):
            total += _resnet(side, ch, width)
            ch = width
        if up:
            side *= 2
            total += _conv(side, ch, ch, 3)
    return total + _conv(side, ch, out_channels, 3)


@dataclass(frozen=True)
class TokenizerFlops:
    """Forward FLOPs per image of each tokenizer part."""

    encoder: int
    bottleneck: int
    decoder: int

    @property
    def forward(self) -> int:
        return self.encoder + self.bottleneck + self.decoder


def kl_encoder_forward_flops(cfg: TokenizerConfig) -> int:
    """Forward FLOPs per image of the KL-VAE baseline's conv encoder (kl_vae.ConvEncoder, same layer plan)."""
    dec, factor = cfg.decoder, cfg.encoder.patch_size
    steps = int(round(math.log2(factor)))
    widths = [dec.base_channels * m for m in dec.channel_mult]
    side, ch = cfg.image_size, widths[0]
    total = _conv(side, 3, ch, 3)
    for i, width in enumerate(widths):
        for _ in range(dec.num_res_blocks):
            total += _resnet(side, ch, width)
            ch = width
        if i < steps:
            side //= 2
            total += _conv(side, ch, ch, 3)  # stride-2 conv: its output grid
    total += 2 * _resnet(side, ch, ch)
    if dec.mid_attention:
        total += _conv(side, ch, 3 * ch, 1) + _conv(side, ch, ch, 1) + attention_flops(side ** 2, side ** 2, 1, ch)
    return total


def tokenizer_flops(cfg: TokenizerConfig) -> TokenizerFlops:
    """Per-image forward FLOPs of each part of the tokenizer `cfg` describes (DMVAE, or the KL-VAE baseline)."""
    enc = cfg.encoder
    if getattr(cfg, "kind", "dmvae") == "kl_vae":
        grid = cfg.image_size // enc.patch_size
        width = cfg.decoder.base_channels * cfg.decoder.channel_mult[-1]
        return TokenizerFlops(
            encoder=kl_encoder_forward_flops(cfg), bottleneck=_conv(grid, width, 2 * cfg.latent_channels, 1),
            decoder=decoder_forward_flops(cfg.decoder, cfg.latent_channels, cfg.in_channels, enc.patch_size, grid))
    grid = cfg.image_size // enc.patch_size
    dim = VIT_ARCHS[enc.arch].dim
    return TokenizerFlops(
        encoder=vit_forward_flops(enc.arch, cfg.image_size, enc.patch_size),
        bottleneck=bottleneck_forward_flops(dim, cfg.latent_channels, grid * grid),
        decoder=decoder_forward_flops(cfg.decoder, cfg.latent_channels, cfg.in_channels, enc.patch_size, grid))


# ----------------------------------------------------------------------------------------------------------------------
# Peak dense bf16 FLOP/s
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    peak_bf16: float  # dense (no 2:4 sparsity) bf16 tensor-core FLOP/s, vendor datasheet
    sms: Optional[int] = None  # streaming multiprocessors of the whole GPU (scales a MIG slice by its SM count)
    memory_gib: Optional[float] = None


# Keys are matched case-insensitively as substrings of the CUDA device name, longest key first, so "H100 PCIe" and
# "H100 NVL" win over "H100" (whose CUDA name, "NVIDIA H100 80GB HBM3", is the SXM part).
ACCELERATORS: dict[str, Accelerator] = {
    "H100": Accelerator(989.4e12, 132, 80),          # SXM5
    "H100 PCIe": Accelerator(756.0e12, 114, 80),
    "H100 NVL": Accelerator(835.0e12, 132, 94),
    "H200": Accelerator(989.4e12, 132, 141),         # SXM
    "H200 NVL": Accelerator(835.0e12, 132, 141),
    "H800": Accelerator(989.4e12, 132, 80),          # SXM
    "H800 PCIe": Accelerator(756.0e12, 114, 80),
    "H800 NVL": Accelerator(835.0e12, 132, 94),
    "GH200": Accelerator(989.4e12, 132, 96),
    "H20": Accelerator(148.0e12, 78, 96),
    "A100": Accelerator(312.0e12, 108, 80),          # SXM4 and PCIe, 40 and 80 GB: same peak
    "A100-SXM4-40GB": Accelerator(312.0e12, 108, 40),
    "A100-PCIE-40GB": Accelerator(312.0e12, 108, 40),
    "A800": Accelerator(312.0e12, 108, 80),
    "B200": Accelerator(2250.0e12, 148, 180),
    "B100": Accelerator(1750.0e12, 132, 180),
    "GB200": Accelerator(2500.0e12, 148, 186),
    "L40S": Accelerator(362.05e12, 142, 48),
    "L40": Accelerator(181.0e12, 142, 48),
    "L4": Accelerator(121.0e12, 58, 24),
    "A10G": Accelerator(70.0e12, 80, 24),
    "A10": Accelerator(125.0e12, 72, 24),
    "RTX 4090": Accelerator(165.2e12, 128, 24),
    "MI300X": Accelerator(1307.4e12, None, 192),
    "MI325X": Accelerator(1307.4e12, None, 256),
}
# The table in train/worker.py's MFU (PEAK_BF16_FLOPS) had these; every one is above with the same number or a split.
PEAK_BF16_FLOPS: dict[str, float] = {key: acc.peak_bf16 for key, acc in ACCELERATORS.items()}

MIG_SLICES_PER_GPU = 7  # A100 / H100 / H200 expose 7 compute slices to MIG
_MIG = re.compile(r"\bMIG\s+(\d+)g\.(\d+)gb", re.IGNORECASE)


@dataclass(frozen=True)
class PeakFlops:
    """Result of a peak lookup: `flops` None when unknown, with `note` saying why (or how it was scaled)."""

    flops: Optional[float]
    key: Optional[str]
    note: str = ""


def match_accelerator(name: str) -> Optional[str]:
    """The ACCELERATORS key a device name (`torch.cuda.get_device_name`, or a short name like "h200") matches."""
    bare = _MIG.sub("", name).lower()
    for key in sorted(ACCELERATORS, key=len, reverse=True):
        if key.lower() in bare:
            return key
    return None


def peak_bf16_flops(name: str, sm_count: Optional[int] = None) -> PeakFlops:
    """Dense bf16 peak FLOP/s of the device called `name`; for a MIG slice ("... MIG 3g.40gb"), the whole GPU's
    peak times the slice's share: its SM count over the whole GPU's when `sm_count` (the slice's, from
    torch.cuda.get_device_properties().multi_processor_count) is given, else its compute slices over 7."""
    key = match_accelerator(name)
    if key is None:
        return PeakFlops(None, None, f"unknown device {name!r}: no peak in models.flops.ACCELERATORS")
    acc = ACCELERATORS[key]
    mig = _MIG.search(name)
    if mig is None:
        return PeakFlops(acc.peak_bf16, key)
    slices = int(mig.group(1))
    if sm_count and acc.sms:
        share = min(sm_count / acc.sms, 1.0)
        return PeakFlops(acc.peak_bf16 * share, key, f"MIG {slices}g slice: {sm_count}/{acc.sms} SMs of a {key}")
    if slices > MIG_SLICES_PER_GPU:
        return PeakFlops(None, key, f"MIG slice {mig.group(0)!r} claims more than {MIG_SLICES_PER_GPU} slices")
    return PeakFlops(acc.peak_bf16 * slices / MIG_SLICES_PER_GPU, key,
                     f"MIG {slices}g slice: {slices}/{MIG_SLICES_PER_GPU} of a {key} (SM count not given)")


def cuda_peak_bf16_flops(device=None) -> PeakFlops:
    """peak_bf16_flops for a CUDA device, its SM count read from the driver (so MIG slices scale exactly)."""
    import torch
    props = torch.cuda.get_device_properties(device)
    return peak_bf16_flops(props.name, props.multi_processor_count)


# ----------------------------------------------------------------------------------------------------------------------
# Flop formulas FlopCounterMode lacks
# ----------------------------------------------------------------------------------------------------------------------

def flash_attn_forward_flop(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """flash_attn's forward on (B, N, heads, head_dim) tensors; same count as torch's SDPA formula (non-causal).

    Causal attention is counted in full too, as torch does for SDPA's is_causal (our models never use it)."""
    b, n_q, h, d_qk = q_shape
    n_k, d_v = k_shape[1], v_shape[3]
    return b * attention_flops(n_q, n_k, h, d_qk, d_v)


def flash_attn_backward_flop(dout_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """flash_attn's backward: twice the forward (dV, dP, dQ, dK products), torch's SDPA backward convention."""
    return 2 * flash_attn_forward_flop(q_shape, k_shape, v_shape)


def sdpa_cpu_forward_flop(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu on (B, heads, N, head_dim) tensors."""
    b, h, n_q, d_qk = q_shape
    return b * attention_flops(n_q, k_shape[2], h, d_qk, v_shape[3])


def sdpa_cpu_backward_flop(grad_out_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return 2 * sdpa_cpu_forward_flop(q_shape, k_shape, v_shape)


def _register(target, formula) -> bool:
    from torch.utils.flop_counter import flop_registry, register_flop_formula
    if target is None or target in flop_registry:
        return False
    register_flop_formula(target)(formula)
    return True


def _op(namespace: str, name: str):
    import torch
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def register_attention_flop_formulas() -> list[str]:
    """Teach FlopCounterMode the attention kernels it does not count: torch's CPU flash SDPA (fused; counted as
    zero before, so CPU runs missed all attention FLOPs) and flash_attn's custom ops when flash_attn imports.
    Idempotent; returns the ops registered by this call."""
    done = []
    pairs = [(_op("aten", "_scaled_dot_product_flash_attention_for_cpu"), sdpa_cpu_forward_flop),
             (_op("aten", "_scaled_dot_product_flash_attention_for_cpu_backward"), sdpa_cpu_backward_flop)]
    from .attention import flash_available
    if flash_available():  # importing flash_attn registers torch.ops.flash_attn (flash-attn >= 2.6)
        pairs += [(_op("flash_attn", "_flash_attn_forward"), flash_attn_forward_flop),
                  (_op("flash_attn", "_flash_attn_backward"), flash_attn_backward_flop)]
    for target, formula in pairs:
        if _register(target, formula):
            done.append(str(target))
    return done
