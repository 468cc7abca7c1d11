"""The distribution-matching (DMD) loss of docs/method.md, stage 3, and its noise-range schedule.

A frozen "real" score model knows the reference p_r, an online "fake" score model tracks the current latent
distribution q. Both predict the clean latent from a noised one; their difference is the direction that moves q toward
p_r. The loss is written so that its gradient with respect to the latents is exactly g / N, with no gradient through
either score model (both run under torch.no_grad).

Pure tensor math: score models are plain callables `model(x, t, y) -> velocity`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .flow import VelocityFn, clean_from_velocity, guided_velocity, interpolate, sample_t, upcast


def dm_loss(z: torch.Tensor, y: Optional[torch.Tensor], real_score: VelocityFn, fake_score: VelocityFn,
            cfg_scale: float, null_label: Optional[int], t_range: tuple[float, float] = (0.0, 1.0),
            generator: torch.Generator | None = None, t: torch.Tensor | None = None,
            noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_DM for normalised latents `z` (B, ...) that carry the tokenizer's graph.

    t ~ U[t0, t1], x_t = t*z + (1-t)*eps; v_real, v_fake with CFG of scale `cfg_scale` on both (labels `y`, or None
    for unconditional); x_* = x_t + (1-t)*v_*; W = per-sample mean |z - x_real|; g = (x_fake - x_real) / W (NaN -> 0);
    L = 0.5 * mean((z - stopgrad(z - g))^2), whose gradient with respect to z is g / z.numel().
    `t` (B,) and `noise` (like z) may be given instead of drawn. Returns (loss, stats), stats detached (no host sync).
    Everything but the score models' own matmuls is float32, whatever dtype z comes in (bf16 under autocast): the
    difference x_fake - x_real of two nearly equal predictions would lose most of its bits in bf16. The loss is
    float32; its gradient reaches z in z's dtype.
    """
    t0, t1 = t_range
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= t0 < t1 <= 1, got {t_range}")
    with torch.no_grad():
        target = upcast(z.detach())
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=z.device, dtype=target.dtype)
        noise = upcast(noise)
        if t is None:
            t = sample_t(target.shape[0], generator, z.device, t0, t1)
        t = upcast(t)
        x_t = interpolate(target, noise, t)
        x_real = clean_from_velocity(x_t, t, guided_velocity(real_score, x_t, t, y, cfg_scale, null_label))
        x_fake = clean_from_velocity(x_t, t, guided_velocity(fake_score, x_t, t, y, cfg_scale, null_label))
        dims = tuple(range(1, target.dim()))
        weight = (target - x_real).abs().mean(dim=dims, keepdim=True)
        g = torch.nan_to_num((x_fake - x_real) / weight, nan=0.0, posinf=0.0, neginf=0.0)
    loss = 0.5 * ((upcast(z) - (target - g)) ** 2).mean()
    stats = {"dm_weight": weight.mean(), "dm_grad_norm": g.flatten(1).norm(dim=1).mean(),
             "dm_real_fake_gap": (x_fake - x_real).abs().mean()}
    return loss, stats


def annealed_t_range(step: int, t_min: float, t_max: float, anneal_steps: int, t_min_final: float
                     ) -> tuple[float, float]:
    """The noise range at iteration `step`: [t_min, t_max] fixed when anneal_steps == 0, else the lower end rises
    linearly from t_min to t_min_final over anneal_steps iterations (t=1 is clean: the range narrows toward low noise),
    then stays there."""
    if anneal_steps <= 0:
        return t_min, t_max
    if not t_min <= t_min_final < t_max:
        raise ValueError(f"annealed lower end {t_min_final} must lie in [t_min={t_min}, t_max={t_max})")
    frac = min(1.0, max(0, step) / anneal_steps)
    return t_min + frac * (t_min_final - t_min), t_max
