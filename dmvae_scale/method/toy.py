"""The 2-D experiment of the paper's Figure 3: distribution matching alone moves a network's outputs onto a reference.

A small "encoder" network maps 2-D noise to 2-D points. The real score (a small velocity MLP) is pretrained by flow
matching on reference samples and frozen; the fake score starts as a copy of it and tracks the encoder's outputs
online (one flow-matching step every iteration, on detached outputs); every k-th iteration the encoder takes one step
on the DM loss alone. Progress is measured by the sliced Wasserstein distance to fresh reference samples.

Tensor math and tiny networks only; plotting and file loading live with the CLI's helpers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .dm_loss import annealed_t_range, dm_loss
from .flow import flow_matching_loss
from .references import FileSamples, GaussianMixture, ReferenceSource, StandardGaussian, ring_means


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sliced 1-Wasserstein distance between two point sets (N, D) and (M, D), flattened beyond dim 1.

    Each random unit direction gives two 1-D distributions; their W1 is the mean gap between matching quantiles.
    Unequal sizes are compared at min(N, M) evenly spaced quantiles.
    """
    a, b = a.flatten(1).float(), b.flatten(1).float()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"point sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    dirs = torch.randn(a.shape[1], num_projections, generator=generator, device=a.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    n = min(pa.shape[0], pb.shape[0])
    if pa.shape[0] != n:
        pa = pa[torch.linspace(0, pa.shape[0] - 1, n, device=a.device).round().long()]
    if pb.shape[0] != n:
        pb = pb[torch.linspace(0, pb.shape[0] - 1, n, device=a.device).round().long()]
    return (pa - pb).abs().mean()


class ToyVelocity(nn.Module):
    """A velocity model for 2-D points: MLP over (x, sin/cos features of t); labels are ignored (unconditional)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_features: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(time_features // 2).float(), persistent=False)
        layers, width = [], dim + time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs
        return self.net(torch.cat([x, angles.sin(), angles.cos()], 1))


class ToyEncoder(nn.Module):
    """The network whose output distribution is matched: 2-D noise -> 2-D point, starting as a small blob."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, init_scale: float = 0.1):
        super().__init__()
        layers, width = [], dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        out = nn.Linear(width, dim)
        with torch.no_grad():  # start far from the reference: outputs concentrated near the origin
            out.weight.mul_(init_scale)
            out.bias.zero_()
        self.net = nn.Sequential(*layers, out)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u)


@dataclass
class ToySettings:
    hidden: int = 128
    pretrain_steps: int = 2000
    steps: int = 3000  # DM iterations (fake-score steps); the encoder steps every k-th one
    tokenizer_every: int = 5
    batch: int = 256
    score_lr: float = 2e-3
    fake_lr: float = 2e-3
    encoder_lr: float = 3e-3
    t_range: tuple[float, float] = (0.0, 1.0)
    t_anneal_min_final: float | None = None  # anneal the lower end of t_range to this over the run (None: fixed)
    eval_samples: int = 2000
    seed: int = 0


@dataclass
class ToyResult:
    reference: torch.Tensor  # (eval_samples, 2)
    before: torch.Tensor  # encoder outputs before DM training
    after: torch.Tensor  # encoder outputs after
    sw_before: float
    sw_after: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (iteration, SW)


def pretrain_score(source: ReferenceSource, settings: ToySettings, generator: torch.Generator) -> ToyVelocity:
    """Flow matching of a fresh ToyVelocity on the reference samples (the frozen real score)."""
    model = ToyVelocity(dim=math.prod(source.shape), hidden=settings.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=settings.score_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.pretrain_steps)
    for _ in range(settings.pretrain_steps):
        x1, _ = source.sample(settings.batch, generator)
        loss = flow_matching_loss(model, x1, None, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False).eval()


def run_toy(source: ReferenceSource, settings: ToySettings = ToySettings(), progress=None) -> ToyResult:
    """Train a ToyEncoder with the DM loss only until its outputs follow `source`; `progress(i, sw)` is optional."""
    if source.needs_images or len(source.shape) != 1:
        raise ValueError(f"the toy needs a synthetic reference of flat points; got shape {source.shape}")
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    eval_g = torch.Generator().manual_seed(settings.seed + 1)
    dim = source.shape[0]
    reference, _ = source.sample(settings.eval_samples, eval_g)
    eval_noise = torch.randn(settings.eval_samples, dim, generator=eval_g)

    def distance(encoder: ToyEncoder) -> float:
        with torch.no_grad():
            return float(sliced_wasserstein(encoder(eval_noise), reference,
                                            generator=torch.Generator().manual_seed(settings.seed + 2)))

    real = pretrain_score(source, settings, g)
    fake = copy.deepcopy(real).requires_grad_(True).train()
    encoder = ToyEncoder(dim, hidden=settings.hidden)
    fake_opt = torch.optim.Adam(fake.parameters(), lr=settings.fake_lr)
    enc_opt = torch.optim.Adam(encoder.parameters(), lr=settings.encoder_lr)
    # The encoder's step size decays to zero so that the matched distribution settles instead of oscillating.
    enc_steps = max(1, settings.steps // settings.tokenizer_every)
    enc_sched = torch.optim.lr_scheduler.CosineAnnealingLR(enc_opt, enc_steps)
    with torch.no_grad():
        before = encoder(eval_noise)
    result = ToyResult(reference, before, before, distance(encoder), float("nan"))
    for i in range(settings.steps):
        u = torch.randn(settings.batch, dim, generator=g)
        z = encoder(u)
        if i % settings.tokenizer_every == settings.tokenizer_every - 1:
            t_range = settings.t_range if settings.t_anneal_min_final is None else annealed_t_range(
                i, *settings.t_range, settings.steps, settings.t_anneal_min_final)
            loss, _ = dm_loss(z, None, real, fake, 1.0, None, t_range, g)
            enc_opt.zero_grad(set_to_none=True)
            loss.backward()
            enc_opt.step()
            enc_sched.step()
        fake_loss = flow_matching_loss(fake, z.detach(), None, g)
        fake_opt.zero_grad(set_to_none=True)
        fake_loss.backward()
        fake_opt.step()
        if progress is not None and (i + 1) % max(1, settings.steps // 10) == 0:
            sw = distance(encoder)
            result.history.append((i + 1, sw))
            progress(i + 1, sw)
    with torch.no_grad():
        result.after = encoder(eval_noise)
    result.sw_after = distance(encoder)
    return result


def toy_reference(kind: str, components: int = 8, radius: float = 2.0, std: float = 0.1,
                  samples: torch.Tensor | None = None) -> ReferenceSource:
    """The toy's 2-D reference: "gmm" (a ring of `components` Gaussians), "gaussian" (N(0, I)), or "file"
    (given `samples` of shape (N, 2))."""
    if kind == "gmm":
        return GaussianMixture(ring_means(components, radius), std)
    if kind == "gaussian":
        return StandardGaussian((2,))
    if kind == "file":
        if samples is None or samples.dim() != 2 or samples.shape[1] != 2:
            raise ValueError(f"the toy's file reference needs samples of shape (N, 2), got "
                             f"{None if samples is None else tuple(samples.shape)}")
        return FileSamples(samples)
    raise ValueError(f"toy reference {kind!r} is not one of gmm, gaussian, file")
