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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apex_fused_rms_norm_equals_an_fp32_reference(dtype):
    """Compared with a relative tolerance against float32 math: apex rounds twice in bf16 (normalised value, then
    the product with the weight), so an absolute 2e-2 fails on outputs of 4 to 8 while every value is within a few
    bf16 steps (2^-8 relative each)."""
    if not fused_rms_norm_available():
        pytest.skip("NVIDIA apex with its fused_layer_norm_cuda kernel is not installed here")
    g = torch.Generator(device="cuda").manual_seed(0)
    x32 = 4 + 4 * torch.rand(4, 256, 1152, device="cuda", generator=g)
    w32 = 1 + 0.1 * torch.randn(1152, device="cuda", generator=g)
    x, weight = x32.to(dtype).requires_grad_(True), w32.to(dtype).requires_grad_(True)
    want = F.rms_norm(x.float(), (1152,), weight.float(), 1e-6)  # fp32 reference of the same inputs
    ours = rms_norm(x, weight, 1e-6)  # our entry point takes the apex kernel on CUDA
    rtol = 2 ** -6 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours.float(), want, rtol=rtol, atol=0)
    grad_ours = torch.autograd.grad(ours.float().square().sum(), (x, weight))
    grad_want = torch.autograd.grad(want.square().sum(), (x, weight))
    for a, b in zip(grad_ours, grad_want):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flash", "sdpa"])
def test_attention_backward_on_the_dits_strided_qkv_matches_float32_math(kernel):
    """q, k, v as the DiT makes them: strided views of one qkv projection (B, N, 3, heads, d) permuted to
    (3, B, heads, N, d). Forward and backward through the projection agree with float32 math attention."""
    if kernel == "flash" and not flash_available():
        pytest.skip("flash_attn is not installed here (pip install the `gpu` extra)")
    torch.manual_seed(0)
    batch, tokens, heads, head_dim = 2, 256, 16, 72  # DiT-XL's 1152 = 16 x 72
    proj = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim).cuda()
    x = torch.randn(batch, tokens, heads * head_dim, device="cuda")

    def run(backend):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = proj(xi).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            assert not q.is_contiguous()
            if backend == "math":
                q, k, v = q.float(), k.float(), v.float()
            out = attention(q, k, v, backend)
        out.float().square().mean().backward()
        return out.float(), xi.grad

    (out, grad), (want, grad_want) = run(kernel), run("math")
    assert ((out - want).norm() / want.norm()).item() < 2e-2
    assert ((grad - grad_want).norm() / grad_want.norm()).item() < 5e-2


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
