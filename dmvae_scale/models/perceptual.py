"""LPIPS (Zhang et al. 2018, v0.1, VGG16 trunk): the tokenizer's perceptual loss.

distance(x, y) = sum over the five taps l of mean over positions of  w_l . (u_l(x) - u_l(y))^2,
where u_l is the VGG16 feature map at relu1_2 .. relu5_3 unit-normalised over channels at each position, and w_l are
LPIPS's learned non-negative per-channel weights (its "linear heads", calibrated on human judgements). Inputs in
[-1, 1] get LPIPS's own scaling layer. One value per image pair; 0 for identical images.

Where the weights come from; nothing is ever downloaded:
  - the linear heads: the file `weights/v0.1/vgg.pth` that PyPI `lpips` 0.1.4 ships inside its wheel (read from the
    installed package; the package's model code is not used);
  - the VGG16 trunk: `loss.perceptual_weights`, a torchvision-format VGG16 state dict the user names (e.g.
    `vgg16-397923af.pth`), sha256-checked against `loss.perceptual_sha256` when given. Its `classifier.*` entries are
    ignored; every `features.*` entry must be present.
The FID network (TF-Inception) is refused as a trunk: a decoder trained against the metric's own features would make
the metric meaningless. Without a VGG16 file there is no perceptual loss: set loss.perceptual_weight=0.
"""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..config import LossConfig
from .bundled_inception import BUNDLED_INCEPTION_SHA256
from .vit import WeightsFileError, sha256_of_file, verify_sha256

VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2 .. relu5_3 in torchvision's vgg16().features
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAP_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's scaling layer for inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)


def lpips_heads_path() -> Path:
    """The learned linear heads shipped by the `lpips` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth" if (
        spec and spec.submodule_search_locations) else None
    if path is None or not path.is_file():
        raise WeightsFileError("the perceptual loss needs LPIPS's learned linear heads from the `lpips` package: "
                               "pip install lpips==0.1.4 (it ships weights/v0.1/vgg.pth), or set "
                               "loss.perceptual_weight=0")
    return path


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


def _refuse_fid_network(path: Path) -> None:
    """The FID Inception (any TorchScript archive, or the bundled file by hash) is never a perceptual net."""
    is_fid = sha256_of_file(path) == BUNDLED_INCEPTION_SHA256
    if not is_fid and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_fid = any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())  # TorchScript layout
    if is_fid:
        raise WeightsFileError(
            f"loss.perceptual_weights {path} is a TorchScript network such as the FID Inception (TF-Inception "
            f"2015-12-05), which computes the evaluation metric: training the decoder against it would game the "
            f"metric. Name a torchvision VGG16 state dict (vgg16-397923af.pth), or set loss.perceptual_weight=0")


def load_vgg16_features(path: Path) -> nn.Sequential:
    stack = _vgg16_feature_stack()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsFileError(f"loss.perceptual_weights {path}: not a readable torch state dict ({exc})") from None
    wanted = {f"features.{k}" for k in stack.state_dict()}
    given = {k for k in state if k.startswith("features.")} if isinstance(state, dict) else set()
    if wanted - given or given - wanted:
        raise WeightsFileError(
            f"loss.perceptual_weights {path} is not a torchvision VGG16 state dict: missing keys "
            f"{sorted(wanted - given)[:8]}, unexpected keys {sorted(given - wanted)[:8]}")
    stack.load_state_dict({k[len("features."):]: state[k] for k in wanted}, strict=True)
    return stack


def load_lpips_heads(path: Path) -> list[torch.Tensor]:
    """The five (C,) non-negative channel weights of LPIPS v0.1 for VGG16."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = []
    for i, c in enumerate(TAP_CHANNELS):
        w = state.get(f"lin{i}.model.1.weight")
        if w is None or tuple(w.shape) != (1, c, 1, 1):
            raise WeightsFileError(f"{path}: not LPIPS v0.1 VGG heads (lin{i}.model.1.weight of shape (1, {c}, 1, 1) "
                                   f"missing); reinstall lpips==0.1.4")
        heads.append(w.reshape(c).float())
    return heads


class PerceptualDistance(nn.Module):
    """Frozen LPIPS-VGG; `forward(x, y)` with images in [-1, 1] returns (B,) distances, differentiable in x and y."""

    backbone_name = "lpips-vgg16-v0.1"

    def __init__(self, weights: str | Path | None = None, sha256: str | None = None):
        super().__init__()
        if not weights:
            raise WeightsFileError(
                "loss.perceptual_weights is not set: LPIPS needs a torchvision VGG16 state dict "
                "(vgg16-397923af.pth) named there; nothing is downloaded and the FID network is never a "
                "substitute. Set loss.perceptual_weights=PATH, or loss.perceptual_weight=0 for no perceptual loss")
        path = Path(weights)
        if not path.is_file():
            raise WeightsFileError(f"loss.perceptual_weights: file not found: {path} (expected a torchvision VGG16 "
                                   f"state dict, e.g. vgg16-397923af.pth)")
        verify_sha256(path, sha256, "loss.perceptual_weights file")
        _refuse_fid_network(path)
        self.features = load_vgg16_features(path)
        for i, w in enumerate(load_lpips_heads(lpips_heads_path())):
            self.register_buffer(f"head{i}", w.view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualDistance":
        return super().train(False)  # always inference behaviour

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
                if len(out) == len(VGG16_TAPS):
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"perceptual distance needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        feats = self.taps(torch.cat([x, y]))
        total = x.new_zeros(len(x))
        for i, f in enumerate(feats):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (f[: len(x)] - f[len(x):]).pow(2)
            total = total + (diff * getattr(self, f"head{i}").to(diff.dtype)).sum(1).mean(dim=(1, 2))
        return total


def build_perceptual(cfg: LossConfig) -> PerceptualDistance:
    return PerceptualDistance(cfg.perceptual_weights, cfg.perceptual_sha256)
