"""LightningDiT: parameter counts of the family, zero-init, conditioning, grids, checkpointing, attention backends."""
import pytest
import torch

from dmvae_scale.cli import main as cli_main
from dmvae_scale.config import ConfigError, DiTConfig
from dmvae_scale.method.flow import flow_matching_loss
from dmvae_scale.models.attention import attention
from dmvae_scale.models.dit import DIT_SIZES, InputShapeError, LightningDiT, param_count, resolve_shape
from dmvae_scale.models.layers import RMSNorm, apply_rope, rope_2d_tables

pytestmark = pytest.mark.unit

# Published parameter counts of the DiT family (DiT paper, Table 1) that LightningDiT keeps, in millions.
PUBLISHED_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}


def tiny_cfg(**kw) -> DiTConfig:
    base = dict(depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4, num_classes=10)
    base.update(kw)
    return DiTConfig(**base)


def randomized(cfg: DiTConfig, seed: int = 0) -> LightningDiT:
    """A model with every parameter random (a fresh one outputs zeros, which would make comparisons vacuous)."""
    torch.manual_seed(seed)
    model = LightningDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def inputs(cfg: DiTConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------------------------------------
# Sizes and counts (meta device: no memory)
# ---------------------------------------------------------------------------------------------------------------------

def test_xl1_on_imagenet_latents_has_lightningdit_parameter_count():
    count = param_count(DiTConfig(size="XL", patch_size=1, input_size=16, in_channels=32, num_classes=1000))
    assert abs(count - 675e6) / 675e6 < 0.02, count


@pytest.mark.parametrize("size", sorted(PUBLISHED_M))
def test_dit_family_matches_published_counts(size):
    count = param_count(DiTConfig(size=size, patch_size=2, in_channels=4, input_size=32))  # the DiT paper's setting
    assert abs(count / 1e6 - PUBLISHED_M[size]) / PUBLISHED_M[size] < 0.02, count


def test_scaling_sizes_land_near_their_stated_sizes():
    xxl = param_count(DiTConfig(size="XXL"))
    big = param_count(DiTConfig(size="3B"))
    assert abs(xxl - 1.5e9) / 1.5e9 < 0.05, xxl
    assert 3.0e9 <= big < 3.2e9, big
    for size in ("XXL", "3B"):
        shape = DIT_SIZES[size]
        assert shape.hidden_size // shape.num_heads in (64, 128)


def test_explicit_shape_overrides_the_size_and_bad_shapes_are_refused():
    shape = resolve_shape(DiTConfig(size="XL", depth=2))
    assert (shape.depth, shape.hidden_size, shape.num_heads) == (2, 1152, 16)
    assert resolve_shape(DiTConfig(size="custom", depth=3, hidden_size=96, num_heads=3)).hidden_size == 96
    with pytest.raises(ConfigError, match="valid sizes: S, B, L, XL"):
        resolve_shape(DiTConfig(size="XXXL"))
    with pytest.raises(ConfigError, match="not divisible by num_heads=5"):
        resolve_shape(DiTConfig(hidden_size=64, num_heads=5))
    with pytest.raises(ConfigError, match="not a multiple of patch_size=2"):
        resolve_shape(DiTConfig(input_size=9, patch_size=2))


def test_models_command_lists_every_size_with_xl_count(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for size in DIT_SIZES:
        assert f"{size}/1 " in out and f"{size}/2 " in out, size
    xl_line = next(line for line in out.splitlines() if line.startswith("XL/1 "))
    assert xl_line.split()[-3] == f"{param_count(DiTConfig(size='XL')) / 1e6:.1f}"  # then GFLOPs fwd, train


# ---------------------------------------------------------------------------------------------------------------------
# Behaviour (tiny widths)
# ---------------------------------------------------------------------------------------------------------------------

def test_fresh_model_predicts_exactly_zero_velocity():
    cfg = tiny_cfg()
    x, t, y = inputs(cfg)
    assert torch.equal(LightningDiT(cfg)(x, t, y), torch.zeros_like(x))


def test_conditioning_reaches_the_output_after_training_steps():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = LightningDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = inputs(cfg, batch=8)

    def step():
        opt.zero_grad()
        flow_matching_loss(model, x, y, generator=torch.Generator().manual_seed(0)).backward()
        opt.step()

    step()
    with torch.no_grad():
        out = model(x, t, y)
        # adaLN-Zero: the first step can only move the output layer, whose input does not see t or y yet.
        assert out.abs().max() > 0
        assert torch.equal(model(x, 1 - t, y), out)
    step()
    with torch.no_grad():
        out = model(x, t, y)
        other_t = model(x, (t + 0.5) % 1, y)
        other_y = model(x, t, (y + 1) % cfg.num_classes)
    assert (other_t - out).abs().max() > 1e-6
    assert (other_y - out).abs().max() > 1e-6


@pytest.mark.parametrize("input_size,patch_size", [(8, 1), (8, 2), (12, 1), (12, 2)])
def test_grids_and_patch_sizes_round_trip_shape(input_size, patch_size):
    cfg = tiny_cfg(input_size=input_size, patch_size=patch_size)
    x, t, y = inputs(cfg)
    out = randomized(cfg)(x, t, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_unconditional_call_uses_the_null_label():
    cfg = tiny_cfg()
    model = randomized(cfg)
    x, t, _ = inputs(cfg)
    null = torch.full((x.shape[0],), cfg.num_classes)
    assert torch.equal(model(x, t, None), model(x, t, null))


def test_wrong_grid_is_refused_with_the_expected_shape():
    model = LightningDiT(tiny_cfg(input_size=8))
    with pytest.raises(InputShapeError, match=r"\(B, 4, 8, 8\).*got \(2, 4, 12, 12\)"):
        model(torch.zeros(2, 4, 12, 12), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_activation_checkpointing_gives_identical_outputs_and_gradients():
    cfg = tiny_cfg(depth=3)
    plain, ckpt = randomized(cfg), randomized(cfg)
    ckpt.grad_checkpointing = True
    calls = {"n": 0}
    for block in ckpt.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x, t, y = inputs(cfg)
    out_plain, out_ckpt = plain(x, t, y), ckpt(x, t, y)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    assert calls["n"] == 2 * cfg.depth  # each block started again during backward: checkpointing is on
    assert torch.equal(out_plain, out_ckpt)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Attention backends and position encodings
# ---------------------------------------------------------------------------------------------------------------------

def test_math_and_sdpa_attention_agree_on_cpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), rtol=0, atol=1e-5)


def test_model_with_math_and_sdpa_backends_agrees():
    cfg_math, cfg_sdpa = tiny_cfg(attention="math"), tiny_cfg(attention="sdpa")
    x, t, y = inputs(cfg_math)
    out_math = randomized(cfg_math)(x, t, y)
    out_sdpa = randomized(cfg_sdpa)(x, t, y)
    assert out_math.abs().max() > 0.1
    # Outputs reach ~13; the two kernels sum in different orders, so the error is relative (seen: 8e-7 relative).
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_grid_offset():
    grid, head_dim = 6, 16
    cos, sin = rope_2d_tables(grid, head_dim)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def score(qpos, kpos):
        qi, ki = qpos[0] * grid + qpos[1], kpos[0] * grid + kpos[1]
        rq = apply_rope(q[None], cos[qi:qi + 1], sin[qi:qi + 1])
        rk = apply_rope(k[None], cos[ki:ki + 1], sin[ki:ki + 1])
        return (rq * rk).sum()

    same_offset = [score((0, 1), (2, 4)), score((3, 2), (5, 5)), score((1, 0), (3, 3))]
    for s in same_offset[1:]:
        torch.testing.assert_close(s, same_offset[0], rtol=0, atol=1e-5)
    # Row and column offsets are told apart: swapping them changes the score.
    assert (score((0, 0), (2, 3)) - score((0, 0), (3, 2))).abs() > 1e-3


def test_rms_norm_matches_its_formula():
    x = torch.randn(5, 24)
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    want = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)
