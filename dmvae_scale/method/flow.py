"""Flow matching in the t=0-noise convention of docs/method.md, and its samplers.

Time t=0 is pure noise, t=1 is clean data:  x_t = t*x1 + (1-t)*x0,  x0 ~ N(0, I),  velocity target v = x1 - x0.
From a velocity model:  x1_hat = x_t + (1-t)*v,  x0_hat = x_t - t*v,  score(x_t) = -x0_hat / (1-t).
The derivations are in docs/method.md.

A velocity model is any callable `model(x, t, y) -> v` with x of shape (B, ...), t of shape (B,), y of shape (B,)
integer labels (the null label for unconditional). Pure tensor math: no I/O, no distribution.

Precision: under bf16 autocast a model's output (and a tokenizer's latents) come out bf16. The path arithmetic here
(noise, t, x_t, the velocity target, guidance and x1_hat) is always done in float32: in bf16, t near 1 has only a few
dozen distinct values and x_t would be built from a rounded t while the model is given the exact one. Only the
matmuls inside the model run in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

SAMPLERS = ("ode_euler", "ode_heun", "sde_euler_maruyama")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 latents or model outputs become float32, float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t*x1 + (1-t)*x0."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * x0


def clean_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x1_hat = x_t + (1-t)*v, in float32 whatever dtype the model's v came out in."""
    x_t = upcast(x_t)
    return x_t + (1 - _bcast(t, x_t)) * upcast(v)


def sample_t(batch: int, generator: torch.Generator | None = None, device=None,
             t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    return t_min + (t_max - t_min) * torch.rand(batch, generator=generator, device=device)


def drop_labels(y: torch.Tensor, null_label: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label with probability p (classifier-free guidance training)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)


def flow_matching_loss(model: VelocityFn, x1: torch.Tensor, y: Optional[torch.Tensor],
                       generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                       x0: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the model's velocity and x1 - x0 at a uniform random time.

    x1, x0, t, x_t and the target are float32 (bf16 latents are upcast first), and the model gets the very t that
    built x_t; under autocast only the model's own matmuls run in bf16."""
    x1 = upcast(x1)
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=torch.float32)
    x0 = upcast(x0)
    if t is None:
        t = sample_t(x1.shape[0], generator, x1.device)
    t = upcast(t)
    x_t = interpolate(x1, x0, t)
    v = model(x_t, t, y)
    return ((upcast(v) - (x1 - x0)) ** 2).mean()


def guided_velocity(model: VelocityFn, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor],
                    cfg_scale: float, null_label: Optional[int],
                    interval: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """v = v_u + w*(v_c - v_u), in one batched forward; only where t lies in `interval` (else the conditional v).

    With w == 1 (or no labels) this is exactly the conditional velocity: one forward, no guidance arithmetic.
    """
    if cfg_scale == 1.0 or y is None:
        return upcast(model(x, t, y))
    if null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the model's num_classes)")
    x2 = torch.cat([x, x], 0)
    t2 = torch.cat([t, t], 0)
    y2 = torch.cat([y, torch.full_like(y, null_label)], 0)
    v_c, v_u = upcast(model(x2, t2, y2)).chunk(2, 0)
    guided = v_u + cfg_scale * (v_c - v_u)
    if interval is not None:
        lo, hi = interval
        inside = _bcast(((t >= lo) & (t <= hi)).float(), guided)
        guided = inside * guided + (1 - inside) * v_c
    return guided


@dataclass
class SamplerSettings:
    method: str = "sde_euler_maruyama"
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_interval: Optional[tuple[float, float]] = None
    t_end_sde: float = 0.04  # SDE integrates to 1 - t_end_sde, then takes one noise-free (mean) step to t=1
    time_shift: float = 1.0  # ODE samplers: > 1 spends more of the steps near noise (docs/method.md, "Sampling")

    def __post_init__(self):
        if self.method not in SAMPLERS:
            raise ValueError(f"sampler method '{self.method}' is not one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if not self.time_shift > 0:
            raise ValueError(f"sampler time_shift must be > 0, got {self.time_shift}")
        if self.time_shift != 1.0 and not self.method.startswith("ode_"):
            raise ValueError(f"sampler time_shift={self.time_shift} applies to the ode_* samplers only, not "
                             f"'{self.method}'; set time_shift=1.0 or an ode_* method")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp a time grid toward noise: the noise level s = 1-t becomes shift*s / (1 + (shift-1)*s).

    shift = 1 is the identity; the ends 0 and 1 stay fixed; shift > 1 puts more of the grid at low t (high noise)."""
    s = 1.0 - t
    return 1.0 - shift * s / (1.0 + (shift - 1.0) * s)


def sde_drift(x: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
    """Drift of SiT's reverse-time SDE with diffusion D(t) = 1-t (g^2 = 2D): v + D*score.

    score(x_t) = -x0_hat/(1-t) with x0_hat = x - t*v, so v + (1-t)*score = v - (x - t*v): no division near t=1."""
    return v - (x - t * v)


@torch.no_grad()
def sample(model: VelocityFn, noise: torch.Tensor, y: Optional[torch.Tensor], settings: SamplerSettings,
           null_label: Optional[int] = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from t=0 (noise) to t=1 (data) with the chosen sampler (docs/method.md, "Sampling")."""
    s = settings
    B = noise.shape[0]

    def vel(x, tt):
        return guided_velocity(model, x, torch.full((B,), tt, device=x.device, dtype=x.dtype), y,
                               s.cfg_scale, null_label, s.guidance_interval)

    x = noise
    if s.method in ("ode_euler", "ode_heun"):
        grid = torch.linspace(0.0, 1.0, s.steps + 1, dtype=torch.float64)
        ts = shift_time(grid, s.time_shift).tolist() if s.time_shift != 1.0 else grid.tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            dt = t1 - t0
            v0 = vel(x, t0)
            if s.method == "ode_euler":
                x = x + dt * v0
            else:
                x_pred = x + dt * v0
                v1 = vel(x_pred, t1)
                x = x + dt * 0.5 * (v0 + v1)
        return x

    # SiT's Euler-Maruyama: dx = [v + D*score] dt + sqrt(2D) dW with D = 1-t, whose marginals equal the flow's.
    # `steps` grid points on [0, 1 - t_end_sde]: steps-1 stochastic steps, then one mean (noise-free) step of the same
    # drift over the last t_end_sde, so the returned sample carries no fresh noise.
    t_last = 1.0 - s.t_end_sde
    ts = torch.linspace(0.0, t_last, s.steps, dtype=torch.float64).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        drift = sde_drift(x, t0, vel(x, t0))
        g = (2.0 * (1.0 - t0)) ** 0.5
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + drift * dt + g * (dt ** 0.5) * eps
    return x + sde_drift(x, ts[-1], vel(x, ts[-1])) * s.t_end_sde
