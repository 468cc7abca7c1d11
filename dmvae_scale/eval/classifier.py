"""An evaluator classifier: trained on real images only, it says whether class-conditional samples look like their
class (the fraction it labels as the class they were asked for). It is neither a teacher nor the FID network.

A small CNN on grayscale 32 x 32 images in [-1, 1]: on Fashion-MNIST it reaches ~90% on the real test split within a
few epochs on two CPU cores; that accuracy is recorded beside it, so a sample accuracy reads against what the
classifier can do at all.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

IMAGE_SIZE = 32


class EvalClassifier(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.head = nn.Linear(4 * w, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The layer before the logits: the last convolution's channels averaged over space, (N, 4 * width)."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float (N, 1, 32, 32) in [-1, 1] (colour averaged to gray)."""
    x = torch.from_numpy(np.asarray(images)).float()
    if x.ndim == 4:
        x = x.mean(dim=-1)
    if x.ndim != 3:
        raise UserError(f"classifier input must be (N, H, W[, C]) uint8 images, got shape {tuple(images.shape)}")
    x = x.unsqueeze(1) / 127.5 - 1.0
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x


@dataclass
class ClassifierReport:
    train_images: int
    test_images: int
    epochs: int
    test_accuracy: float
    seconds: float
    seed: int

    def line(self) -> str:
        return (f"evaluator classifier: {self.train_images} real training images, {self.epochs} epochs, "
                f"{self.test_accuracy:.1%} on {self.test_images} real test images ({self.seconds:.0f} s)")


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                     test_labels: np.ndarray, *, epochs: int = 3, batch_size: int = 128, seed: int = 0,
                     num_classes: int = 10) -> tuple[EvalClassifier, ClassifierReport]:
    """Train on real images with light augmentation (flips, 2-px shifts); report accuracy on the real test images."""
    began = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = EvalClassifier(num_classes)
    x, y = to_input(train_images), torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    steps = epochs * (len(x) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(1, steps))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb = x[idx]
            flip = torch.rand(len(xb), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(-2, -1))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc = accuracy(model, test_images, test_labels)
    return model, ClassifierReport(len(x), len(test_images), epochs, acc, time.perf_counter() - began, seed)


@torch.no_grad()
def predict(model: EvalClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    x = to_input(images)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def features(model: EvalClassifier, images: np.ndarray, batch_size: int = 256,
             device: Optional[str] = None) -> np.ndarray:
    """The classifier's penultimate activations of uint8 images, (N, 4 * width) float64, batched on `device` (CPU
    when None): the features of its Frechet distance (eval/score.py classifier_fd)."""
    model.eval()
    dev = torch.device(device or "cpu")
    model = model.to(dev)
    x = to_input(images)
    out = [model.penultimate(x[i:i + batch_size].to(dev)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.in_features))


def accuracy(model: EvalClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    if len(images) != len(labels) or len(images) == 0:
        raise UserError(f"classifier accuracy needs as many labels as images (got {len(images)} images, "
                        f"{len(labels)} labels)")
    return float((predict(model, images) == labels).mean())


def save_classifier(model: EvalClassifier, report: ClassifierReport, directory: str | Path) -> None:
    from safetensors.torch import save_file
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "classifier.safetensors"))
    (d / "classifier.json").write_text(json.dumps(asdict(report), indent=2))  # last: marks it complete


def load_classifier(directory: str | Path) -> tuple[EvalClassifier, dict]:
    from safetensors.torch import load_file
    d = Path(directory)
    if not (d / "classifier.json").is_file():
        raise UserError(f"{d}: no classifier.json; train the evaluator classifier first")
    model = EvalClassifier()
    model.load_state_dict(load_file(str(d / "classifier.safetensors")))
    return model.eval(), json.loads((d / "classifier.json").read_text())
