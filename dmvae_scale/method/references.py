"""Reference distributions p_r behind one interface (docs/method.md, stage 2 and Table 1).

A reference is anything that yields latent-shaped samples: `source.sample(n, generator, images, labels)` returns
(samples (n, *shape), labels or None). Sources that derive samples from images (a frozen tokenizer's latents, noisy
latents of another tokenizer) say so with `needs_images`; the synthetic ones ignore images. A source is conditional
when its samples belong to the batch's classes; otherwise it returns None labels and score models see the null label.

Pure tensor math: the tokenizer is passed in as an `encode` callable, file samples as an already-loaded tensor.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import torch

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class ReferenceSource(Protocol):
    shape: tuple[int, ...]  # one sample's shape, e.g. (C, h, w) or (2,)
    needs_images: bool
    conditional: bool

    def sample(self, n: int, generator: torch.Generator | None = None, images: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...


def _device(generator: torch.Generator | None) -> torch.device:
    """Synthetic samples are drawn on the generator's device (CPU when none is given)."""
    return generator.device if generator is not None else torch.device("cpu")


def _need_images(name: str, images: torch.Tensor | None, n: int) -> torch.Tensor:
    if images is None:
        raise ValueError(f"the {name} reference derives samples from images; pass a batch of images")
    if images.shape[0] != n:
        raise ValueError(f"the {name} reference was asked for {n} samples but given {images.shape[0]} images")
    return images


class TokenizerLatents:
    """Latents of a frozen tokenizer (the SSL reference): the encoder's output on real images, with their labels."""

    needs_images = True
    conditional = True

    def __init__(self, encode: EncodeFn, shape: tuple[int, ...]):
        self.encode = encode
        self.shape = tuple(shape)

    @torch.no_grad()
    def sample(self, n, generator=None, images=None, labels=None):
        return self.encode(_need_images("tokenizer", images, n)).float(), labels


class NoisyTokenizerLatents:
    """Latents of another tokenizer noised to a fixed flow time t: t*z + (1-t)*eps (t=1 clean, t=0 pure noise)."""

    needs_images = True
    conditional = True

    def __init__(self, encode: EncodeFn, shape: tuple[int, ...], t: float):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"noise time t must lie in [0, 1], got {t}")
        self.encode = encode
        self.shape = tuple(shape)
        self.t = t

    @torch.no_grad()
    def sample(self, n, generator=None, images=None, labels=None):
        z = self.encode(_need_images("noisy_tokenizer", images, n)).float()
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return self.t * z + (1.0 - self.t) * eps, labels


class StandardGaussian:
    """N(0, I) in the latent shape."""

    needs_images = False
    conditional = False

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def sample(self, n, generator=None, images=None, labels=None):
        return torch.randn((n, *self.shape), generator=generator, device=_device(generator)), None


class GaussianMixture:
    """Equal-weight mixture of isotropic Gaussians with the given component means (K, *shape) and one std."""

    needs_images = False
    conditional = False

    def __init__(self, means: torch.Tensor, std: float):
        if means.dim() < 2:
            raise ValueError(f"means must have shape (K, *sample_shape), got {tuple(means.shape)}")
        if std <= 0:
            raise ValueError(f"mixture std must be positive, got {std}")
        self.means = means.float()
        self.std = float(std)
        self.shape = tuple(means.shape[1:])

    def sample(self, n, generator=None, images=None, labels=None):
        device = _device(generator)
        self.means = self.means.to(device)
        k = torch.randint(0, self.means.shape[0], (n,), generator=generator, device=device)
        noise = torch.randn((n, *self.shape), generator=generator, device=device)
        return self.means[k] + self.std * noise, None


def ring_means(components: int, radius: float = 2.0) -> torch.Tensor:
    """Means of the classic 2-D toy: `components` points evenly spaced on a circle, shape (K, 2)."""
    angles = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
    return (radius * torch.stack([angles.cos(), angles.sin()], 1)).float()


def random_means(components: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Component means for a latent-shaped mixture: N(0, I) draws from a fixed seed, so every run agrees."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((components, *shape), generator=g)


class FileSamples:
    """Samples given as a tensor (N, *shape), optionally with labels (N,); drawn uniformly with replacement."""

    needs_images = False

    def __init__(self, samples: torch.Tensor, labels: torch.Tensor | None = None):
        if samples.dim() < 2 or samples.shape[0] == 0:
            raise ValueError(f"reference samples must have shape (N, *sample_shape) with N > 0, "
                             f"got {tuple(samples.shape)}")
        if labels is not None and labels.shape != samples.shape[:1]:
            raise ValueError(f"reference labels must have shape ({samples.shape[0]},), got {tuple(labels.shape)}")
        self.samples = samples.float()
        self.labels = labels.long() if labels is not None else None
        self.shape = tuple(samples.shape[1:])
        self.conditional = labels is not None

    def sample(self, n, generator=None, images=None, labels=None):
        device = _device(generator)
        if self.samples.device != device:
            self.samples = self.samples.to(device)
            self.labels = self.labels.to(device) if self.labels is not None else None
        idx = torch.randint(0, self.samples.shape[0], (n,), generator=generator, device=device)
        return self.samples[idx], (self.labels[idx] if self.labels is not None else None)
