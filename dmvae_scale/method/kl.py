"""The KL term of the KL-VAE baseline (docs/method.md, "The KL-VAE baseline"). Pure tensor math."""
from __future__ import annotations

import torch


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged over all elements (float32):
    0.5 * mean(mean^2 + exp(logvar) - 1 - logvar). Zero exactly when the posterior is the prior."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
