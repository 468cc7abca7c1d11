"""Flow-matching samplers against Gaussian data whose velocity field is known in closed form.

Data x1 ~ N(mu, Sigma); x_t = t*x1 + (1-t)*x0 ~ N(t*mu, C_t) with C_t = t^2 Sigma + (1-t)^2 I, and the exact velocity is
v(x, t) = E[x1 - x0 | x_t = x] = mu + (t Sigma - (1-t) I) C_t^{-1} (x - t mu).
Integrating it from noise must reproduce mu and Sigma; the error of each sampler is measured, not assumed.
"""
import pytest
import torch

from dmvae_scale.method.flow import (SamplerSettings, flow_matching_loss, guided_velocity, interpolate, sample)

pytestmark = pytest.mark.unit

D = 3
MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
A = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.2, 0.3]], dtype=torch.float64)
SIGMA = A @ A.T


def exact_velocity(mu=MU, sigma=SIGMA):
    eye = torch.eye(D, dtype=torch.float64)

    def v(x, t, y=None):
        out = torch.empty_like(x)
        for tt in t.unique():
            m = t == tt
            tt = float(tt)
            c = tt * tt * sigma + (1 - tt) ** 2 * eye
            k = (tt * sigma - (1 - tt) * eye) @ torch.linalg.inv(c)
            out[m] = mu + (x[m] - tt * mu) @ k.T
        return out
    return v


def moments(x):
    m = x.mean(0)
    xc = x - m
    return m, xc.T @ xc / (x.shape[0] - 1)


def run(method, steps, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, D, generator=g, dtype=torch.float64)
    out = sample(exact_velocity(), noise, None, SamplerSettings(method=method, steps=steps), generator=g)
    m, c = moments(out)
    return (m - MU).abs().max().item(), (c - SIGMA).abs().max().item()


@pytest.mark.parametrize("method,steps,tol", [("ode_euler", 100, 0.05), ("ode_heun", 25, 0.05),
                                              ("sde_euler_maruyama", 250, 0.06)])
def test_samplers_reproduce_gaussian_moments(method, steps, tol):
    # Sampling noise with n=20000: the standard error of the mean is ~0.007 per coordinate, of the covariance ~0.01.
    mean_err, cov_err = run(method, steps)
    assert mean_err < tol, f"{method}: mean error {mean_err:.4f}"
    assert cov_err < tol, f"{method}: covariance error {cov_err:.4f}"


def test_heun_beats_euler_at_equal_steps():
    # Same noise, same number of steps: the deterministic error of the integrator is what differs.
    for steps in (4, 8):
        _, cov_euler = run("ode_euler", steps)
        _, cov_heun = run("ode_heun", steps)
        assert cov_heun < 0.5 * cov_euler, f"steps={steps}: heun {cov_heun:.4f} vs euler {cov_euler:.4f}"


def test_ode_is_deterministic_map_of_noise():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(64, D, generator=g, dtype=torch.float64)
    s = SamplerSettings(method="ode_heun", steps=10)
    a = sample(exact_velocity(), noise, None, s)
    b = sample(exact_velocity(), noise, None, s)
    assert torch.equal(a, b)


def _labelled_model():
    """Velocity model whose conditional field depends on the label: class c pulls toward mean c; null label toward 0."""
    means = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # index 2 = null

    def v(x, t, y):
        return means[y] - x * 0.1
    return v


def test_guidance_scale_one_equals_conditional_and_other_scales_change_output():
    model = _labelled_model()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(32, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=g)
    base = SamplerSettings(method="ode_euler", steps=10, cfg_scale=1.0)
    cond = sample(model, noise, y, base, null_label=2)
    plain = sample(lambda x, t, yy: model(x, t, y), noise, None, base)
    assert torch.allclose(cond, plain, atol=0, rtol=0)
    guided = sample(model, noise, y, SamplerSettings(method="ode_euler", steps=10, cfg_scale=4.0), null_label=2)
    assert (guided - cond).abs().max() > 1.0
    # v_u + w (v_c - v_u) at w=4: the class mean is pushed 4x further from the null mean than w=1.
    x = torch.zeros(4, D, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    yy = torch.tensor([0, 1, 0, 1])
    v4 = guided_velocity(model, x, t, yy, 4.0, null_label=2)
    assert torch.allclose(v4, 4.0 * model(x, t, yy))


def test_guidance_interval_applies_only_inside():
    model = _labelled_model()
    x = torch.zeros(4, D, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    v = guided_velocity(model, x, t, y, 3.0, null_label=2, interval=(0.3, 0.7))
    cond = model(x, t, y)
    assert torch.allclose(v[[0, 3]], cond[[0, 3]])
    assert torch.allclose(v[[1, 2]], 3.0 * cond[[1, 2]])


def test_flow_matching_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    # For data concentrated at one point the exact velocity at x_t is (x1 - x_t)/(1-t): the loss vanishes.
    x1 = torch.ones(16, D, dtype=torch.float64) * 2.0
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(16, D, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9
    model = lambda xt, tt, y: (x1 - xt) / (1 - tt[:, None])
    assert flow_matching_loss(model, x1, None, t=t, x0=x0).item() < 1e-20
    assert torch.allclose(interpolate(x1, x0, torch.ones(16, dtype=torch.float64)), x1)


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="not one of ode_euler, ode_heun, sde_euler_maruyama"):
        SamplerSettings(method="euler")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="time_shift=2.5 applies to the ode_\\* samplers only"):
        SamplerSettings(method="sde_euler_maruyama", time_shift=2.5)


def test_sde_takes_sits_steps_diffusion_2_1_minus_t_and_a_final_mean_step():
    """Three grid points on [0, 0.96]: two Euler-Maruyama steps of dx = [v + (1-t) score] dt + sqrt(2(1-t)) dW, with
    score = -(x - t v)/(1-t), then one noise-free step of the same drift over the last 0.04, recomputed by hand."""
    v_of = lambda x, t, y=None: 0.3 * x + 1.0 + t[:, None]  # any smooth field: the test checks the integrator
    noise = torch.randn(5, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = sample(v_of, noise, None, SamplerSettings(method="sde_euler_maruyama", steps=3),
                 generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    x = noise.clone()
    for t0, dt in ((0.0, 0.48), (0.48, 0.48)):
        v = v_of(x, torch.full((5,), t0, dtype=torch.float64))
        score = -(x - t0 * v) / (1 - t0)
        eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = x + (v + (1 - t0) * score) * dt + (2 * (1 - t0) * dt) ** 0.5 * eps
    v = v_of(x, torch.full((5,), 0.96, dtype=torch.float64))
    want = x + (v + 0.04 * (-(x - 0.96 * v) / 0.04)) * 0.04
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ode_time_shift_warps_the_grid_toward_noise_and_still_samples_the_data():
    from dmvae_scale.method.flow import shift_time
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(shift_time(grid, 1.0), grid, rtol=0, atol=1e-15)
    shifted = shift_time(grid, 2.5)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:] >= shifted[:-1]).all())
    assert float(shifted[5]) == pytest.approx(1 - 2.5 * 0.5 / (1 + 1.5 * 0.5))  # 0.2857: half the steps below t=0.29
    # The shift changes the path's discretisation, not its target.
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, D, generator=g, dtype=torch.float64)
    plain = sample(exact_velocity(), noise, None, SamplerSettings(method="ode_heun", steps=6))
    out = sample(exact_velocity(), noise, None, SamplerSettings(method="ode_heun", steps=6, time_shift=2.5))
    assert not torch.allclose(plain, out)
    m, c = moments(out)
    assert (m - MU).abs().max().item() < 0.05 and (c - SIGMA).abs().max().item() < 0.05


def test_sampler_time_shift_is_a_config_key_checked_against_the_method():
    from dmvae_scale.config import ConfigError, load_config
    cfg = load_config("configs/demo/generator.yaml", ["sampler.time_shift=2.5"])
    assert cfg.sampler.time_shift == 2.5
    with pytest.raises(ConfigError, match="sampler.time_shift=2.5 applies to the ode_\\* samplers only"):
        load_config("configs/demo/generator.yaml", ["sampler.time_shift=2.5", "sampler.method=sde_euler_maruyama"])
