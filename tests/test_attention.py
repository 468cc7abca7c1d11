"""Attention backend choice, and the optional fused kernels (FlashAttention, apex RMSNorm) against torch on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from dmvae_scale.errors import UserError
from dmvae_scale.models.attention import (AttentionBackendError, attention, flash_available, math_attention,
                                          select_backend)
from dmvae_scale.models.layers import fused_rms_norm_available, rms_norm


# ---------------------------------------------------------------------------------------------------------------------
# Backend choice (CPU)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_auto_uses_sdpa_on_cpu_and_unknown_backends_are_refused():
    q = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    assert select_backend(q, "auto") == "sdpa"
    assert select_backend(q, "math") == "math"
    with pytest.raises(AttentionBackendError, match="'fast' is not one of auto, flash, sdpa, math"):
        select_backend(q, "fast")


@pytest.mark.unit
def test_forced_flash_without_cuda_fails_with_a_clear_message():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(UserError, match="attention backend 'flash'.*'auto' or 'sdpa'"):
        attention(q, q, q, "flash")


@pytest.mark.unit
def test_model_reports_its_attention_backend():
    from dmvae_scale.config import DiTConfig
    from dmvae_scale.models.dit import LightningDiT
    tiny = dict(depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=4, num_classes=3)
    assert LightningDiT(DiTConfig(**tiny)).attention_backend("cpu", torch.bfloat16) == "sdpa"
    assert LightningDiT(DiTConfig(**tiny, attention="math")).attention_backend() == "math"


# ---------------------------------------------------------------------------------------------------------------------
# GPU: fused kernels equal the torch reference
# ---------------------------------------------------------------------------------------------------------------------

# bf16 keeps 8 bits of mantissa (relative step 2^-8 ~ 4e-3); attention outputs here are O(1), so two bf16 kernels
# that accumulate in float32 differ by a few rounding steps at most: 2e-2 absolute leaves headroom, and a wrong
# layout or scale gives errors of order 1.
BF16_ATOL = 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 72, 128])  # 72: XL's head dimension; 128: XXL and 3B
def test_flash_attention_matches_sdpa_in_bf16(head_dim):
    if not flash_available():
        pytest.skip("flash_attn is not installed here (pip install the `gpu` extra)")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, head_dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    assert select_backend(q, "auto") == "flash"
    flash, sdpa = attention(q, k, v, "flash"), attention(q, k, v, "sdpa")
    reference = math_attention(q.float(), k.float(), v.float())
    assert flash.shape == q.shape and flash.dtype == torch.bfloat16
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=0, atol=BF16_ATOL)
    torch.testing.assert_close(flash.float(), reference, rtol=0, atol=BF16_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_ATOL)])
def test_apex_fused_rms_norm_equals_torch_rms_norm(dtype, atol):
    if not fused_rms_norm_available():
        pytest.skip("NVIDIA apex with its fused_layer_norm_cuda kernel is not installed here")
    from apex.normalization import FusedRMSNorm
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 256, 1152, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(1152, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    fused = FusedRMSNorm(1152, eps=1e-6).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
    want = F.rms_norm(x, (1152,), weight, 1e-6)
    torch.testing.assert_close(fused(x), want, rtol=0, atol=atol)
    ours = rms_norm(x, weight, 1e-6)  # our entry point takes the apex kernel on CUDA
    torch.testing.assert_close(ours, want, rtol=0, atol=atol)
    grad_ours = torch.autograd.grad(ours.float().square().sum(), (x, weight))
    grad_want = torch.autograd.grad(want.float().square().sum(), (x, weight))
    for a, b in zip(grad_ours, grad_want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=atol)


@pytest.mark.gpu
def test_dit_under_bf16_autocast_on_cuda_tracks_float32_math():
    import dataclasses

    from dmvae_scale.config import DiTConfig
    from dmvae_scale.models.dit import LightningDiT
    cfg = DiTConfig(depth=2, hidden_size=256, num_heads=4, input_size=16, in_channels=32, num_classes=10)
    torch.manual_seed(0)
    fast = LightningDiT(cfg).cuda()
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0.0, 0.05)
    slow = LightningDiT(dataclasses.replace(cfg, attention="math")).cuda()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(4, 32, 16, 16, device="cuda")
    t, y = torch.rand(4, device="cuda"), torch.tensor([0, 3, 9, 10], device="cuda")
    with torch.no_grad():
        want = slow(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(x, t, y).float()
    rel = (got - want).norm() / want.norm()
    assert rel < 3e-2, f"bf16 autocast output is {rel:.3g} (relative L2) away from float32"
