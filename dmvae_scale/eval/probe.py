"""Linear and kNN probes: how linearly separable a representation is and how well its nearest neighbours share a
label, the standard checks of self-supervised features.

Linear: multinomial logistic regression on standardised features (mean/std of the probe's training split), L2 weight decay,
full-batch L-BFGS in float64: deterministic, no learning rate to tune, the same for every representation compared.
kNN: cosine similarity of L2-normalised features, the training split as the memory bank, the k most similar vote
for their label weighted by similarity; test rows go in batches so 10,000 x 10,000 needs one batch x bank at a time.
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


@torch.no_grad()
def knn_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       k: int = 20, batch: int = 1000) -> float:
    """Top-1 accuracy on (test_x, test_y) of a similarity-weighted k-nearest-neighbour vote over (train_x, train_y)."""
    bank = F.normalize(train_x.flatten(1).float(), dim=1)
    k = min(k, bank.shape[0])
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for rows, labels in zip(test_x.flatten(1).float().split(batch), test_y.split(batch)):
        sim, idx = (F.normalize(rows, dim=1) @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(rows), classes).scatter_add_(1, train_y[idx].long(), sim)
        correct += int((votes.argmax(1) == labels).sum())
    return correct / len(test_y)
