"""Typed run configuration: dataclasses, YAML loading, dotted overrides, strict validation.

One `RunConfig` describes a run. It is plain data: no component reads a global config, every one is handed the
section it needs. Loading is strict: an unknown key, a value of the wrong type or a missing file is a `ConfigError`
whose one-line message names the key and, for typos, the nearest valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .log import say
from .errors import UserError


def _yaml():
    """PyYAML, imported where a file or an override is parsed: the model code that imports these dataclasses (the
    DiT's config) must import on a bare GPU machine that has torch and nothing else (tools/gpu_check.py)."""
    import yaml
    return yaml


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; its message is one line naming the key."""


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------

STAGES = ("teacher", "tokenizer", "reference", "dmd", "decoder", "generator")


@dataclass
class DiTConfig:
    """A LightningDiT. `size` picks (depth, width, heads) from the family table unless they are given explicitly."""

    size: str = "S"
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: int = 1
    input_size: int = 16  # latent grid side (tokens); image_size / tokenizer downsampling
    in_channels: int = 32
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    qk_norm: bool = True
    rope: bool = True
    grad_checkpointing: bool = False
    attention: Literal["auto", "sdpa", "flash", "math"] = "auto"


@dataclass(frozen=True)
class DiTShape:
    depth: int
    hidden_size: int
    num_heads: int


# (depth, width, heads). S..XL are the DiT/LightningDiT family; XXL and 3B continue it for scaling studies
# (head_dim 128; about 1.54B and 3.04B parameters at patch 1 on 16x16x32 latents, see `dmvae-scale models`).
DIT_SIZES: dict[str, DiTShape] = {
    "S": DiTShape(12, 384, 6),
    "B": DiTShape(12, 768, 12),
    "L": DiTShape(24, 1024, 16),
    "XL": DiTShape(28, 1152, 16),
    "XXL": DiTShape(36, 1536, 12),
    "3B": DiTShape(40, 2048, 16),
}


def resolve_shape(cfg: DiTConfig, section: str = "") -> DiTShape:
    """(depth, width, heads) from cfg.size, each overridden by cfg.depth / hidden_size / num_heads when given; a
    shape the model cannot be built with is a ConfigError naming the key (prefixed with `section`, e.g. "score.")."""
    explicit = (cfg.depth, cfg.hidden_size, cfg.num_heads)
    if cfg.size in DIT_SIZES:
        base = DIT_SIZES[cfg.size]
    elif None in explicit:
        raise ConfigError(f"{section}size: unknown DiT size {cfg.size!r}; valid sizes: {', '.join(DIT_SIZES)} "
                          "(or give depth, hidden_size and num_heads all explicitly)")
    else:
        base = DiTShape(*explicit)
    shape = DiTShape(cfg.depth or base.depth, cfg.hidden_size or base.hidden_size, cfg.num_heads or base.num_heads)
    if min(shape.depth, shape.hidden_size, shape.num_heads) <= 0:
        raise ConfigError(f"{section}depth/hidden_size/num_heads: must be positive, got {shape.depth}, "
                          f"{shape.hidden_size}, {shape.num_heads}")
    if shape.hidden_size % shape.num_heads:
        raise ConfigError(f"{section}hidden_size: {shape.hidden_size} is not divisible by "
                          f"{section}num_heads={shape.num_heads}")
    if shape.hidden_size % 4:
        raise ConfigError(f"{section}hidden_size: the 2-D sin-cos position embedding needs a multiple of 4, "
                          f"got {shape.hidden_size}")
    head_dim = shape.hidden_size // shape.num_heads
    if cfg.rope and head_dim % 4:
        raise ConfigError(f"{section}hidden_size/{section}num_heads: 2-D rotary embedding needs a head dimension "
                          f"divisible by 4, got {shape.hidden_size}/{shape.num_heads}={head_dim}")
    if cfg.patch_size <= 0 or cfg.input_size % cfg.patch_size:
        raise ConfigError(f"{section}input_size: {cfg.input_size} is not a multiple of "
                          f"{section}patch_size={cfg.patch_size}")
    return shape


@dataclass
class EncoderConfig:
    """The SSL vision transformer in front of the bottleneck (DINOv2-compatible)."""

    arch: Literal["vit_s", "vit_b", "vit_l", "vit_g", "vit_tiny"] = "vit_l"
    patch_size: int = 16
    weights: Optional[str] = None  # path to an official dinov2_vit*14_pretrain.pth
    sha256: Optional[str] = None
    frozen: bool = True  # stage 1: frozen; stage 3 unfreezes it


@dataclass
class DecoderConfig:
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 3
    mid_attention: bool = True


@dataclass
class TokenizerConfig:
    # dmvae: frozen/trainable SSL ViT + bottleneck, deterministic; kl_vae: the SD-VAE-style baseline (models/kl_vae.py):
    # trainable conv encoder (decoder's mirror, downsampling by encoder.patch_size), diagonal Gaussian posterior.
    # Read by the tokenizer stage; later stages build the kind their inputs.tokenizer artifact holds.
    kind: Literal["dmvae", "kl_vae"] = "dmvae"
    image_size: int = 256
    in_channels: int = 3
    latent_channels: int = 32
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class DiscriminatorConfig:
    base_channels: int = 64
    num_layers: int = 3
    diffaug: bool = True
    consistency_weight: float = 1.0
    weight_decay: Optional[float] = None  # the discriminator's own AdamW weight decay; None: optim.weight_decay


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_weights: Optional[str] = None  # torchvision VGG16 state dict for LPIPS; needed when perceptual_weight > 0
    perceptual_sha256: Optional[str] = None
    gan_weight: float = 0.5
    gan_start_step: int = 5000
    adaptive_weight_max: float = 1e4
    kl_weight: float = 0.0  # tokenizer.kind=kl_vae: weight of the per-element mean KL(q(z|x) || N(0, I))


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # built-in set name, an ImageNet-style folder, or shard dir / s3:// URL
    split: str = "train"
    image_size: int = 256
    random_crop: bool = False
    hflip: bool = True
    num_workers: int = 0  # DataLoader worker processes per training worker: decode + resize off the training thread
    # Page-locked host batches, so that non_blocking copies to the GPU overlap compute; auto: on with use_gpu
    pin_memory: Literal["auto", True, False] = "auto"
    # Streaming's local shard cache bound per node ("20gb", bytes, or null: unbounded; remote datasets only)
    cache_limit: Optional[str | int] = "20gb"
    predownload: Optional[int] = None  # samples each DataLoader worker downloads ahead (null: Streaming's default)
    limit: Optional[int] = None  # use only the first N samples (demo / tests)
    stats_images: int = 4096  # images (a seeded random class-covering sample, unflipped) for the latent mean/scale
    latents: Optional[str] = None  # cached latent shards for the generator stage


@dataclass
class DMConfig:
    """Stage 3: distribution-matching joint training (docs/method.md)."""

    tokenizer_every: int = 5  # k: tokenizer + discriminator step every k-th iteration
    lambda_dm: float = 10.0
    cfg_scale: float = 5.0
    t_min: float = 0.0
    t_max: float = 1.0
    t_anneal_steps: int = 0  # 0: fixed range; else narrow [t_min, t_max] toward t_anneal_min_final over these steps
    t_anneal_min_final: float = 0.5
    # An EMA of the tokenizer (optim.ema_decay) beside its raw weights in the dmd artifact. Off: the official DMD keeps
    # none and hands the raw weights on; an EMA that moves only on the tokenizer's steps (every k-th) would keep most
    # of the stage-1 weights and hide what distribution matching did (issue 23).
    tokenizer_ema: bool = False


@dataclass
class ReferenceConfig:
    """Where the reference distribution's samples come from (stage 2), docs/method.md (stage 2)."""

    kind: Literal["tokenizer", "gaussian", "gmm", "noisy_tokenizer", "file"] = "tokenizer"
    gmm_components: int = 8
    gmm_std: float = 0.1
    noise_t: float = 0.5
    path: Optional[str] = None


@dataclass
class SamplerConfig:
    method: Literal["ode_euler", "ode_heun", "sde_euler_maruyama"] = "sde_euler_maruyama"
    steps: int = 250
    cfg_scale: float = 1.0
    guidance_interval: Optional[tuple[float, float]] = None  # apply CFG only for t in [lo, hi]
    seed: int = 0
    time_shift: float = 1.0  # ode_* samplers: noise level s -> shift*s/(1+(shift-1)*s); 1 = uniform steps


@dataclass
class TeacherConfig:
    name: Literal["dinov2", "inception", "random_vit", "ssl"] = "dinov2"
    artifact: Optional[str] = None  # ssl: the `teacher` stage's artifact whose network is the encoder
    block: str = "mixed_7"  # inception: the block whose features are pooled to the latent grid
    input_size: int = 299  # inception: input resolution
    chunk: int = 0  # images per teacher forward (fixed, padded: bit-exact features); 0 = the per-worker micro-batch
    remote: bool = False
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    replicas: int = 1


@dataclass
class DistributedConfig:
    # An int: that many workers, always. A list [min, max]: elastic (Ray Train's elastic scaling): the run goes on
    # with fewer workers after a node loss (never below min) and grows back up to max when nodes join; the global
    # batch stays batch_size at any world size (worker_range, batch_split).
    num_workers: int | list[int] = 1
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # fp16 would need per-engine loss scaling: not offered
    # torch.compile of each model's repeated units (models/compile.py); auto: on for CUDA below ZeRO-3, off on CPU
    compile: Literal["auto", True, False] = "auto"
    grad_accum: int = 1
    address: Optional[str] = None
    max_failures: int = 2  # Ray Train restarts of the worker group after a crash (user errors are never retried)
    # Elastic runs: seconds between Ray Train's looks for room to grow a running group back towards max. A resize
    # restarts the group from the latest checkpoint (work since it is done again), so keep it well above the
    # checkpoint interval's duration.
    resize_check_s: float = 60.0
    # Seconds a collective may wait before the worker names it (rank, operation) and fails, so that Ray Train restarts
    # the group from the last checkpoint (train/watchdog.py). Host-side waits between collectives (rank 0 fetching a
    # large checkpoint from object storage, or converting it to a universal checkpoint) count against it.
    timeout_s: int = 1800
    # CPUs Ray reserves for each training worker: the worker itself plus its data.num_workers DataLoader processes
    cpus_per_worker: float = 1.0


@dataclass
class InputsConfig:
    """Artifacts of earlier stages that this stage consumes; every one given must be used or the run is refused."""

    tokenizer: Optional[str] = None
    tokenizer_weights: Literal["ema", "raw"] = "ema"
    real_score: Optional[str] = None  # the reference stage's artifact: the frozen real score model of stage 3
    generator: Optional[str] = None
    # Pins: the content hash (artifact.json's content_hash, 64 hex digits) the artifact of inputs.<key> must have;
    # an artifact with another is refused, naming the key and both hashes.
    tokenizer_sha256: Optional[str] = None
    real_score_sha256: Optional[str] = None
    generator_sha256: Optional[str] = None


@dataclass
class SSLConfig:
    """The `teacher` stage: VICReg self-supervised training of the tokenizer's encoder network (docs/method.md)."""

    objective: Literal["vicreg", "simclr"] = "vicreg"
    expander_dim: int = 512
    crop_min: float = 0.25  # smallest random-resized-crop area, as a fraction of the image
    temperature: float = 0.2  # simclr only: the NT-Xent softmax temperature
    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0


@dataclass
class RunConfig:
    stage: Literal["teacher", "tokenizer", "reference", "dmd", "decoder", "generator"] = "tokenizer"
    name: str = "run"
    run_dir: str = "runs/run"
    seed: int = 0
    batch_size: int = 256  # global batch
    total_images: int = 1_000_000
    log_every_images: int = 10_000
    log_images_every_images: int = 0  # a TensorBoard grid of reconstructions this often (0: never)
    ckpt_every_images: int = 100_000
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 10
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    score: DiTConfig = field(default_factory=DiTConfig)  # reference / fake score model, and the generator
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dm: DMConfig = field(default_factory=DMConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)


# ----------------------------------------------------------------------------------------------------------------------
# Strict conversion from plain data
# ----------------------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        none = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_type_name(a) for a in args) + none
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; users write it that way
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else \
        f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(cls, str(key), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-data form (tuples as lists) suitable for YAML/JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as a YAML scalar / flow list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value (e.g. score.depth=12)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    yaml = _yaml()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], cls: type = None) -> dict:
    """Apply dotted overrides to plain data; key paths are checked against `cls` so typos name the nearest key."""
    cls = cls or RunConfig
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, prefix = data, cls, ""
        for i, part in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in fields:
                raise _unknown_key(node_cls, part, prefix)
            if i == len(path) - 1:
                node[part] = value
            else:
                sub_cls = typing.get_type_hints(node_cls)[part]
                if not dataclasses.is_dataclass(sub_cls):
                    raise ConfigError(f"override '{text}': '{prefix}{part}' is not a section")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override '{text}': '{prefix}{part}' is not a mapping in the file")
                node_cls, prefix = sub_cls, prefix + part + "."
    return data


def _yaml_error(path: Path, exc: Exception) -> str:
    """One line: file, line and column (1-based, where the parser noticed) and what the parser says."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(x for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or \
        str(exc).splitlines()[0]
    return f"{where}: not valid YAML: {what}; fix the file there"


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    yaml = _yaml()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(p, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = None) -> Any:
    """Load a YAML file (optional), apply dotted overrides, validate strictly, return the typed config."""
    cls = cls or RunConfig
    data = read_yaml(path) if path is not None else {}
    if cls is RunConfig:
        _renamed_keys(data, path)
    data = apply_overrides(data, list(overrides), cls)
    cfg = from_dict(cls, data)
    if isinstance(cfg, RunConfig):
        validate(cfg)
    return cfg


# Keys renamed in a file: the config.yaml of an artifact or checkpoint written before the rename still loads.
RENAMED = {("inputs", "reference"): "real_score"}


def _renamed_keys(data: dict, path) -> None:
    for (section, old), new in RENAMED.items():
        part = data.get(section)
        if isinstance(part, dict) and old in part:
            if new in part:
                raise ConfigError(f"{path}: both {section}.{old} (the old name) and {section}.{new} are set; keep "
                                  f"{section}.{new}")
            part[new] = part.pop(old)
            say("config", f"{path}: {section}.{old} is now called {section}.{new}", err=True)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def is_elastic(cfg: RunConfig) -> bool:
    """distributed.num_workers is a [min, max] range (Ray Train's elastic scaling)."""
    return isinstance(cfg.distributed.num_workers, (list, tuple))


def worker_range(cfg: RunConfig) -> tuple[int, int]:
    """(min, max) workers: (n, n) for a fixed distributed.num_workers=n. Planning (the launcher's choice, CPUs
    reserved, estimates, the teacher's chunk) uses max; the run itself uses the world size it was given."""
    n = cfg.distributed.num_workers
    if not isinstance(n, (list, tuple)):
        _need(n > 0, f"distributed.num_workers: must be positive, got {n}")
        return int(n), int(n)
    _need(len(n) == 2, f"distributed.num_workers: a fixed count or a list [min, max] of two counts, got {list(n)}")
    low, high = int(n[0]), int(n[1])
    _need(1 <= low <= high, f"distributed.num_workers: need 1 <= min <= max in [min, max], got {list(n)}")
    return low, high


def batch_split(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro-batch per worker, gradient-accumulation steps) at world size `world`, so that every optimiser step
    takes the global batch_size = world x micro x accumulation at any world size. At the range's max (or a fixed
    num_workers) it is (batch_size / (max x grad_accum), grad_accum); at a smaller world the micro-batch stays at
    most that size (what a worker's memory was planned for) and the accumulation makes up the difference."""
    _, high = worker_range(cfg)
    planned = cfg.batch_size // (high * cfg.distributed.grad_accum)
    if world < 1 or cfg.batch_size % world or planned < 1:
        raise ConfigError(f"batch_size: {cfg.batch_size} cannot be split over {world} workers x "
                          f"distributed.grad_accum={cfg.distributed.grad_accum}; make it a multiple of both")
    per_worker = cfg.batch_size // world
    micro = max(d for d in range(1, min(planned, per_worker) + 1) if per_worker % d == 0)
    return micro, per_worker // micro


def _multiple_of_all(low: int, high: int, grad_accum: int, near: int) -> int:
    """The smallest multiple of every world size in [low, high] (and of high x grad_accum) at or above `near`."""
    import math
    step = math.lcm(*range(low, high + 1), high * grad_accum)
    return max(step, -(-near // step) * step)


def _validate_optim(cfg: RunConfig) -> None:
    """AdamW's ranges: a negative learning rate or a beta of 1 trains nothing (or diverges) without an error."""
    o = cfg.optim
    _need(o.lr > 0, f"optim.lr: must be > 0 (AdamW's learning rate, e.g. 1e-4), got {o.lr}")
    _need(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
          f"optim.betas: two numbers in [0, 1), e.g. [0.9, 0.95], got {list(o.betas)}")
    _need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0 (0: none), got {o.weight_decay}")
    _need(o.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0: no clipping), got {o.grad_clip}")
    wd = cfg.discriminator.weight_decay
    _need(wd is None or wd >= 0, f"discriminator.weight_decay: must be >= 0 (or null: optim.weight_decay), got {wd}")


def _validate_data_loading(cfg: RunConfig) -> None:
    d, dist = cfg.data, cfg.distributed
    _need(isinstance(d.num_workers, int) and d.num_workers >= 0,
          f"data.num_workers: must be an integer >= 0 (0: load in the training process), got {d.num_workers}")
    _need(d.pin_memory in ("auto", True, False), f"data.pin_memory: must be auto, true or false, got {d.pin_memory}")
    _need(d.predownload is None or (isinstance(d.predownload, int) and d.predownload > 0),
          f"data.predownload: must be a positive number of samples (or null: Streaming's default), got {d.predownload}")
    _need(d.cache_limit is None or cache_limit_bytes(d.cache_limit) > 0,
          f"data.cache_limit: must be a size such as 20gb or 500mb (or null: unbounded), got {d.cache_limit}")
    _need(dist.cpus_per_worker > 0, f"distributed.cpus_per_worker: must be a positive number of CPUs, got "
                                    f"{dist.cpus_per_worker}")


_SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def cache_limit_bytes(value: str | int) -> int:
    """data.cache_limit in bytes: an int, or a number with a unit b/kb/mb/gb/tb (binary); -1 when unreadable."""
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?b)\s*", str(value).lower())
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)]) if m else -1


def pin_memory(cfg: RunConfig) -> bool:
    """data.pin_memory resolved: auto pins when the workers train on GPUs."""
    return bool(cfg.distributed.use_gpu) if cfg.data.pin_memory == "auto" else bool(cfg.data.pin_memory)


def validate(cfg: RunConfig) -> None:
    """Every check of a config that needs no I/O: ranges, and fields that must agree with each other. It runs where
    the config is loaded (`config show`, `submit`, `train`), so a bad config fails on the user's machine before a
    cluster grants resources; each message names the key and what would be right."""
    d, dist, dm = cfg.data, cfg.distributed, cfg.dm
    for key in ("batch_size", "total_images", "log_every_images", "keep_checkpoints"):
        _need(getattr(cfg, key) > 0, f"{key}: must be positive, got {getattr(cfg, key)}")
    _need(cfg.ckpt_every_images >= 0, f"ckpt_every_images: must be >= 0 (0: only at the end and on a stop), got "
                                      f"{cfg.ckpt_every_images}")
    _need(cfg.log_images_every_images >= 0, f"log_images_every_images: must be >= 0 (0: never), got "
                                            f"{cfg.log_images_every_images}")
    _need(cfg.max_nonfinite_steps >= 0, f"max_nonfinite_steps: must be >= 0, got {cfg.max_nonfinite_steps}")
    low, high = worker_range(cfg)  # refuses a malformed num_workers
    _need(dist.grad_accum > 0, f"distributed.grad_accum: must be positive, got {dist.grad_accum}")
    _need(dist.max_failures >= 0, f"distributed.max_failures: must be >= 0, got {dist.max_failures}")
    _need(dist.resize_check_s > 0, f"distributed.resize_check_s: must be a positive number of seconds, got "
                                   f"{dist.resize_check_s}")
    uneven = [w for w in range(low, high + 1) if cfg.batch_size % w] if is_elastic(cfg) else []
    _need(not uneven, f"batch_size: {cfg.batch_size} is not divisible by world size {', '.join(map(str, uneven))} "
                      f"of distributed.num_workers={[low, high]}; every world size in the range must divide the "
                      f"global batch: use batch_size={_multiple_of_all(low, high, dist.grad_accum, cfg.batch_size)} "
                      f"or narrow the range")
    _need(cfg.batch_size % (high * dist.grad_accum) == 0,
          f"batch_size: {cfg.batch_size} is not divisible by distributed.num_workers x distributed.grad_accum "
          f"= {high * dist.grad_accum}" + (" (num_workers: the range's max)" if is_elastic(cfg) else ""))
    _validate_optim(cfg)
    _need(0.0 <= cfg.optim.ema_decay < 1.0, f"optim.ema_decay: must be in [0, 1), got {cfg.optim.ema_decay}")
    _need(cfg.optim.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}")
    enc_patch = cfg.tokenizer.encoder.patch_size
    _need(cfg.tokenizer.image_size % enc_patch == 0,
          f"tokenizer.image_size: {cfg.tokenizer.image_size} is not a multiple of tokenizer.encoder.patch_size="
          f"{enc_patch}")
    _need(d.image_size == cfg.tokenizer.image_size,
          f"data.image_size={d.image_size} differs from tokenizer.image_size={cfg.tokenizer.image_size}; the "
          f"tokenizer accepts only its own size: set data.image_size={cfg.tokenizer.image_size}")
    resolve_shape(cfg.score, "score.")  # the DiT's shape arithmetic (every stage has a score/generator section)
    _need(0.0 <= dm.t_min < dm.t_max <= 1.0,
          f"dm.t_min/dm.t_max: need 0 <= t_min < t_max <= 1, got {dm.t_min}, {dm.t_max}")
    _need(dm.tokenizer_every >= 1, f"dm.tokenizer_every: must be >= 1, got {dm.tokenizer_every}")
    _need(dm.t_anneal_steps <= 0 or dm.t_min <= dm.t_anneal_min_final < dm.t_max,
          f"dm.t_anneal_min_final={dm.t_anneal_min_final} must lie in [dm.t_min={dm.t_min}, dm.t_max={dm.t_max})")
    gi = cfg.sampler.guidance_interval
    _need(gi is None or 0.0 <= gi[0] < gi[1] <= 1.0,
          f"sampler.guidance_interval: need 0 <= lo < hi <= 1, got {list(gi) if gi else gi}")
    _validate_data_loading(cfg)
    _need(d.stats_images > 0, f"data.stats_images: must be positive, got {d.stats_images}")
    _need(dist.timeout_s > 0, f"distributed.timeout_s: must be a positive number of seconds, got {dist.timeout_s}")
    _need(cfg.sampler.steps > 0, f"sampler.steps: must be positive, got {cfg.sampler.steps}")
    _need(cfg.teacher.replicas >= 1, f"teacher.replicas: must be at least 1, got {cfg.teacher.replicas}")
    _need(cfg.teacher.name != "inception",
          "teacher.name: 'inception' serves features only (the teacher service and feature path); a tokenizer's "
          "encoder is a ViT and cannot be the Inception network, so the training stages refuse it; use "
          "teacher.name=dinov2 (or random_vit for plumbing)")
    if cfg.stage in ("tokenizer", "dmd", "decoder"):  # the stages with a discriminator
        _need(cfg.discriminator.consistency_weight <= 0 or cfg.discriminator.diffaug,
              "discriminator.consistency_weight > 0 needs discriminator.diffaug=true (the term compares augmented "
              "and plain logits); set one of the two")
    if cfg.stage == "decoder":
        _need(cfg.tokenizer.encoder.frozen, "tokenizer.encoder.frozen: the decoder stage keeps encoder and "
                                            "bottleneck frozen (the latents must not change); set it true")
    if cfg.reference.kind == "gmm":
        _need(cfg.reference.gmm_components >= 1 and cfg.reference.gmm_std > 0,
              f"reference.gmm_components/gmm_std: need >= 1 and > 0, got {cfg.reference.gmm_components}, "
              f"{cfg.reference.gmm_std}")
    if not cfg.ssl.temperature > 0:
        raise ConfigError(f"ssl.temperature: must be > 0, got {cfg.ssl.temperature}")
    if cfg.ssl.expander_dim < 1 or not 0 < cfg.ssl.crop_min <= 1:
        raise ConfigError(f"ssl: need expander_dim >= 1 and 0 < crop_min <= 1, got {cfg.ssl.expander_dim}, "
                          f"{cfg.ssl.crop_min}")
    if cfg.loss.kl_weight < 0:
        raise ConfigError(f"loss.kl_weight: must be >= 0, got {cfg.loss.kl_weight}")
    if cfg.stage == "dmd" and cfg.tokenizer.kind == "kl_vae":
        raise ConfigError("tokenizer.kind=kl_vae: the KL-VAE baseline has no distribution-matching stage; its chain is "
                          "tokenizer -> decoder -> generator")
    if cfg.loss.kl_weight > 0 and cfg.tokenizer.kind != "kl_vae":
        raise ConfigError(f"loss.kl_weight={cfg.loss.kl_weight} applies to tokenizer.kind=kl_vae only; this run's "
                          f"tokenizer is '{cfg.tokenizer.kind}' (deterministic, no KL): set loss.kl_weight=0")
    _validate_inputs(cfg)
    validate_teacher(cfg)
    if cfg.stage == "tokenizer" and cfg.tokenizer.kind == "kl_vae":
        _need(not cfg.tokenizer.encoder.frozen,
              "tokenizer.encoder.frozen: the KL-VAE baseline trains its encoder from scratch; set it false")
    if cfg.data.latents is not None:
        _need(cfg.stage == "generator" or (cfg.stage == "reference" and cfg.reference.kind == "tokenizer"),
              f"data.latents: stage '{cfg.stage}'"
              f"{f' with reference.kind={cfg.reference.kind}' if cfg.stage == 'reference' else ''} does not train "
              f"on a tokenizer's cached latents; remove data.latents")
    _need(cfg.teacher.chunk >= 0, f"teacher.chunk: must be >= 0 (0: the per-worker micro-batch), got "
                                  f"{cfg.teacher.chunk}")
    if not cfg.sampler.time_shift > 0:
        raise ConfigError(f"sampler.time_shift: must be > 0, got {cfg.sampler.time_shift}")
    if cfg.sampler.time_shift != 1.0 and not cfg.sampler.method.startswith("ode_"):
        raise ConfigError(f"sampler.time_shift={cfg.sampler.time_shift} applies to the ode_* samplers only; "
                          f"set sampler.time_shift=1.0 or sampler.method=ode_euler / ode_heun")


# ----------------------------------------------------------------------------------------------------------------------
# What a stage reads: every input given must be used, and every input a stage needs must be given
# ----------------------------------------------------------------------------------------------------------------------

INPUT_KEYS = ("inputs.tokenizer", "inputs.real_score", "inputs.generator", "reference.path",
              "tokenizer.encoder.weights", "teacher.artifact")
_PRODUCER = {"inputs.tokenizer": "a tokenizer-producing stage (tokenizer, dmd or decoder)",
             "inputs.real_score": "the reference stage (its real_score)", "inputs.generator": "a generator stage",
             "reference.path": "a file of reference samples (.pt, .npy, .npz or .safetensors)",
             "teacher.artifact": "a `teacher` stage"}


def _input_value(cfg: RunConfig, key: str) -> Any:
    section, name = key.rsplit(".", 1)
    node: Any = cfg
    for part in section.split("."):
        node = getattr(node, part)
    return getattr(node, name)


def inputs_used(cfg: RunConfig) -> set[str]:
    """The input keys (INPUT_KEYS) this run's stage reads."""
    if cfg.stage == "teacher":
        return set()
    if cfg.stage == "tokenizer":
        if cfg.tokenizer.kind == "kl_vae":
            return set()
        return {"tokenizer.encoder.weights"} if cfg.teacher.name == "dinov2" else \
            {"teacher.artifact"} if cfg.teacher.name == "ssl" else set()
    if cfg.stage == "reference":
        used = {"inputs.tokenizer"} if cfg.reference.kind in ("tokenizer", "noisy_tokenizer") else set()
        return used | ({"reference.path"} if cfg.reference.kind == "file" else set())
    if cfg.stage == "dmd":
        return {"inputs.tokenizer", "inputs.real_score"}
    return {"inputs.tokenizer"}  # decoder, generator


PINNED_INPUTS = ("tokenizer", "real_score", "generator")


def _validate_pins(cfg: RunConfig) -> None:
    for role in PINNED_INPUTS:
        pin = getattr(cfg.inputs, f"{role}_sha256")
        if pin is None:
            continue
        if not isinstance(pin, str) or not re.fullmatch(r"[0-9a-f]{64}", pin):
            raise ConfigError(f"inputs.{role}_sha256: must be an artifact's content hash (64 lowercase hex digits, "
                              f"its artifact.json's content_hash), got {pin!r}")
        if getattr(cfg.inputs, role) is None:
            raise ConfigError(f"inputs.{role}_sha256: pins inputs.{role}, which is not given; give it or remove "
                              f"the pin")


def pinned_input(key: str, pin: Optional[str], found: str, path: str) -> None:
    """Refuse an upstream artifact whose content hash is not the one its pin (inputs.<key>_sha256) names."""
    if pin is not None and found != pin:
        raise ConfigError(f"{key}_sha256: expects content hash {pin}, but {path} has {found}; refusing it (another "
                          f"artifact than the one pinned, or a changed one)")


def _validate_inputs(cfg: RunConfig) -> None:
    """Every input given must be used: name the first one this stage would ignore."""
    _validate_pins(cfg)
    used = inputs_used(cfg)
    for key in INPUT_KEYS:
        value = _input_value(cfg, key)
        if value is not None and key not in used:
            why = ""
            if key == "tokenizer.encoder.weights":
                why = " (the tokenizer's weights come from inputs.tokenizer)" if cfg.stage != "tokenizer" else \
                    " (only teacher.name=dinov2 reads a weights file)" if cfg.tokenizer.kind == "dmvae" else \
                    " (the KL-VAE baseline trains its encoder from scratch)"
            elif key == "teacher.artifact" and cfg.stage == "tokenizer":
                why = " (only teacher.name=ssl reads a teacher stage's artifact)"
            raise ConfigError(f"{key}: stage '{cfg.stage}' does not use it{why}; remove it (got {value!r})")


def check_stage_inputs(cfg: RunConfig) -> None:
    """Both input rules: none given that the stage ignores, none missing that it needs."""
    _validate_inputs(cfg)
    require_inputs(cfg)


def require_inputs(cfg: RunConfig) -> None:
    """Every input this stage needs is given (checked where a run starts or is submitted; `config show` of a stage
    file whose inputs a pipeline fills in still works)."""
    for key in sorted(inputs_used(cfg)):
        if key.startswith("inputs.") and _input_value(cfg, key) is None:
            raise ConfigError(f"{key}: stage '{cfg.stage}' needs it: the artifact of {_PRODUCER[key]}")
        if key == "reference.path" and cfg.reference.path is None:
            raise ConfigError(f"reference.path: reference.kind=file needs it: {_PRODUCER[key]}")
    validate_teacher(cfg, complete=True)


VIT_ARCHS_WITH_DINOV2 = ("vit_s", "vit_b", "vit_l", "vit_g")


def validate_teacher(cfg: RunConfig, complete: bool = False) -> None:
    """The teacher a tokenizer stage builds its frozen encoder from (the other stages take theirs from
    inputs.tokenizer). `complete`: its weight source must also be given (where a run starts or is submitted)."""
    if cfg.stage != "tokenizer" or cfg.tokenizer.kind != "dmvae":
        return
    enc, name = cfg.tokenizer.encoder, cfg.teacher.name
    if name == "dinov2":
        _need(enc.arch in VIT_ARCHS_WITH_DINOV2,
              f"tokenizer.encoder.arch: '{enc.arch}' has no official DINOv2 weights; use vit_s, vit_b, vit_l or "
              f"vit_g, or set teacher.name=random_vit for a random plumbing encoder")
        if complete:
            _need(bool(enc.weights), "tokenizer.encoder.weights: teacher.name=dinov2 needs the path of an official "
                                     "dinov2_vit*14_pretrain.pth (or set teacher.name=random_vit / ssl)")
            _need(bool(enc.sha256), f"tokenizer.encoder.sha256: required with teacher.name=dinov2 so a wrong or "
                                    f"corrupt weights file is refused; compute it with `sha256sum {enc.weights}`")
    if name == "ssl" and complete:
        _need(bool(cfg.teacher.artifact), "teacher.artifact: teacher.name=ssl needs the artifact of a `teacher` "
                                          "stage (e.g. runs/demo/teacher/artifact)")


def dump_yaml(cfg: Any) -> str:
    return _yaml().safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Any) -> str:
    """Content hash of the resolved config (stable across runs and machines)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def save_resolved(cfg: Any, directory: str | Path) -> Path:
    """Write the resolved config beside a run's outputs (`config.yaml`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / "config.yaml"
    out.write_text(dump_yaml(cfg))
    return out
