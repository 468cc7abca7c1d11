"""Linear probe: how linearly separable a representation is, the standard check of self-supervised features.

Multinomial logistic regression on standardised features (mean/std of the probe's training split), L2 weight decay,
full-batch L-BFGS in float64: deterministic, no learning rate to tune, the same for every representation compared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          weight_decay: float = 1e-4, max_iter: int = 300) -> float:
    """Top-1 accuracy on (test_x, test_y) of a linear classifier fit on (train_x, train_y); x: (N, D) features."""
    train_x, test_x = train_x.flatten(1).double(), test_x.flatten(1).double()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((test_x @ weight + bias).argmax(1) == test_y).double().mean())
