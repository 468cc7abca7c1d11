"""The distribution-matching loss (docs/method.md, stage 3), its t schedule, and the GAN losses."""
import pytest
import torch
from torch import nn

from dmvae_scale.method.dm_loss import annealed_t_range, dm_loss
from dmvae_scale.method.gan import adaptive_weight, hinge_d_loss, hinge_g_loss

pytestmark = pytest.mark.unit

NUM_CLASSES = 4


class ConditionalVelocity(nn.Module):
    """A small class-conditional velocity model over (B, C, H, W): conv over [x, t] plus a label bias."""

    def __init__(self, channels: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.label = nn.Embedding(NUM_CLASSES + 1, channels)  # index NUM_CLASSES is the null label

    def forward(self, x, t, y):
        y = torch.full((len(x),), NUM_CLASSES, dtype=torch.long) if y is None else y
        tt = t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.tanh(self.conv(torch.cat([x, tt], 1))) + self.label(y)[:, :, None, None]


def _explicit_g(z, y, real, fake, w, t, eps):
    """g of docs/method.md written out term by term, with CFG as two separate forwards."""
    with torch.no_grad():
        tb = t.view(-1, 1, 1, 1)
        x_t = tb * z + (1 - tb) * eps
        null = torch.full_like(y, NUM_CLASSES)

        def guided(model):
            v_c, v_u = model(x_t, t, y), model(x_t, t, null)
            return v_u + w * (v_c - v_u)

        x_real = x_t + (1 - tb) * guided(real)
        x_fake = x_t + (1 - tb) * guided(fake)
        weight = (z - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        return (x_fake - x_real) / weight


def test_gradient_wrt_latents_is_g_over_n_and_no_gradient_reaches_the_score_models():
    torch.manual_seed(0)
    real, fake = ConditionalVelocity(4, seed=1), ConditionalVelocity(4, seed=2)
    z = torch.randn(6, 4, 5, 5, requires_grad=True)
    y = torch.randint(0, NUM_CLASSES, (6,))
    t = torch.rand(6)
    eps = torch.randn(6, 4, 5, 5)
    loss, stats = dm_loss(z, y, real, fake, cfg_scale=3.0, null_label=NUM_CLASSES, t=t, noise=eps)
    loss.backward()

    g = _explicit_g(z.detach(), y, real, fake, 3.0, t, eps)
    assert g.abs().max() > 1e-3  # the two score models really differ: the check below is not 0 == 0
    torch.testing.assert_close(z.grad, g / z.numel(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss, 0.5 * (g ** 2).mean(), rtol=1e-5, atol=1e-8)
    for model in (real, fake):
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert set(stats) == {"dm_weight", "dm_grad_norm", "dm_real_fake_gap"}


def test_cfg_scale_changes_the_gradient_and_identical_scores_give_none():
    real, fake = ConditionalVelocity(2, seed=1), ConditionalVelocity(2, seed=2)
    z = torch.randn(4, 2, 3, 3)
    y = torch.randint(0, NUM_CLASSES, (4,))
    grads = []
    for w in (1.0, 5.0):
        zz = z.clone().requires_grad_(True)
        dm_loss(zz, y, real, fake, w, NUM_CLASSES, generator=torch.Generator().manual_seed(0))[0].backward()
        grads.append(zz.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-6

    zz = z.clone().requires_grad_(True)
    dm_loss(zz, y, real, real, 5.0, NUM_CLASSES, generator=torch.Generator().manual_seed(0))[0].backward()
    assert torch.equal(zz.grad, torch.zeros_like(zz))


def test_zero_weight_gives_zero_gradient_not_nan():
    """A sample whose real prediction equals it exactly has W = 0: g is 0 there, never NaN."""
    # Quarter-integers and t = 1/2 keep every step of x_t and x_real exact in floating point, so W is exactly 0.
    z = torch.randint(-8, 8, (3, 2, 4, 4)).float() / 4
    eps = torch.randint(-8, 8, (3, 2, 4, 4)).float() / 4

    def exact_real(x_t, t, y):  # the velocity that lands exactly on z
        return (z - x_t) / (1 - t.view(-1, 1, 1, 1))

    fake = ConditionalVelocity(2, seed=3)
    zz = z.clone().requires_grad_(True)
    loss, _ = dm_loss(zz, None, exact_real, fake, 1.0, None, t=torch.full((3,), 0.5), noise=eps)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(zz.grad, torch.zeros_like(zz))


def test_t_is_drawn_inside_the_range():
    seen = []

    def recording(x, t, y):
        seen.append(t.clone())
        return torch.zeros_like(x)

    z = torch.randn(512, 2, requires_grad=True)
    dm_loss(z, None, recording, recording, 1.0, None, t_range=(0.3, 0.6), generator=torch.Generator().manual_seed(1))
    t = torch.cat(seen)
    assert 0.3 <= float(t.min()) < 0.32 and 0.58 < float(t.max()) <= 0.6
    with pytest.raises(ValueError, match="t_range"):
        dm_loss(z, None, recording, recording, 1.0, None, t_range=(0.6, 0.3))


def test_annealed_t_range_narrows_toward_low_noise_then_holds():
    assert annealed_t_range(0, 0.0, 1.0, 0, 0.5) == (0.0, 1.0)
    assert annealed_t_range(0, 0.0, 1.0, 100, 0.5) == (0.0, 1.0)
    assert annealed_t_range(50, 0.0, 1.0, 100, 0.5) == pytest.approx((0.25, 1.0))
    assert annealed_t_range(100, 0.0, 1.0, 100, 0.5) == pytest.approx((0.5, 1.0))
    assert annealed_t_range(10_000, 0.0, 1.0, 100, 0.5) == pytest.approx((0.5, 1.0))
    with pytest.raises(ValueError, match="annealed lower end"):
        annealed_t_range(0, 0.0, 0.4, 100, 0.5)


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1.0))
    assert float(hinge_g_loss(fake)) == pytest.approx(1 / 3)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer_and_clamps():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(8, 5)
    out = layer(x)
    rec = (out - 1).abs().mean()
    gan = -(out * 7).mean()
    w = adaptive_weight(rec, gan, layer.weight, max_weight=1e4)
    g_rec, = torch.autograd.grad((layer(x) - 1).abs().mean(), layer.weight)
    g_gan, = torch.autograd.grad(-(layer(x) * 7).mean(), layer.weight)
    assert float(w) == pytest.approx(float(g_rec.norm() / (g_gan.norm() + 1e-6)), rel=1e-5)
    assert not w.requires_grad
    assert float(adaptive_weight(rec, gan * 1e-9, layer.weight, max_weight=3.0)) == 3.0
    rec.backward()  # the graphs were retained for the real backward
