"""GAN losses of the tokenizer stages: hinge losses and the adaptive weight (the consistency term is in
models/discriminator.py beside the augmentation it needs).

Pure tensor math. The adaptive weight balances the GAN term against reconstruction at the decoder's last layer
(docs/method.md, stage 1): w = ||grad L_rec|| / (||grad L_gan|| + 1e-6), clamped to [0, max_weight], detached.
"""
from __future__ import annotations

import torch


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (decoder) side of the hinge GAN: -mean(D(fake))."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float) -> torch.Tensor:
    """||d rec_loss / d last_layer|| / (||d gan_loss / d last_layer|| + 1e-6), clamped to [0, max_weight].

    Both losses must still hold their graphs (they are retained for the real backward that follows).
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-6)
    return weight.clamp(0.0, max_weight).detach()
