"""`dmvae-scale estimate`: memory per GPU, step time, throughput and cost of a generator (LightningDiT) run.

Memory per GPU is model states plus saved activations:
  - model states follow how our engine trains (train/deepspeed_engine.py): fp32 module weights under bf16 autocast
    (DeepSpeed's own bf16 mode is off), DeepSpeed's fp32 partition of the weights for ZeRO >= 1, fp32 gradients,
    AdamW's two fp32 moments, our ZeRO-partitioned fp32 EMA, and autocast's bf16 copies of the weights;
    `deepspeed_mixed_state_bytes` gives the layout DeepSpeed's own estimators assume (bf16 weights + fp32 master),
    which the tests check against `estimate_zero2/3_model_states_mem_needs`;
  - activations are the bytes autograd saves for backward, measured by running the model on the meta device
    (no memory, no compute) under saved-tensor hooks, with attention replaced by a FlashAttention-like op that
    saves q, k, v, the output and the log-sum-exp (no N x N matrix, as on a GPU).
Allocator fragmentation, NCCL buffers and the CUDA context (about 1-3 GiB together) are not included.

Compute time is FLOPs over FLOP/s: analytic training FLOPs per image (models/flops.py) at a stated MFU of the GPU's
dense bf16 peak. The MFU is an input, not a prediction: measure it with a short run (the training log prints it) or
use tools/gpu_throughput.py. Communication time is the bytes DeepSpeed's collectives move per optimiser step over
NVLink and EFA/InfiniBand (scaling/comms.py); the step takes their sum, or their maximum where communication overlaps
compute. `scaling_rows` repeats the step for 1..N nodes at the same global batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..config import DiTConfig, RunConfig, worker_range
from ..errors import UserError
from ..models import dit as dit_module
from ..models.dit import LightningDiT, param_count, resolve_shape
from ..models.flops import ACCELERATORS, dit_flops, peak_bf16_flops, tokenizer_flops
from .comms import (DEFAULT_EFFICIENCY, Network, StepComm, overlapped_by_default, resolve_network, step_comm,
                    step_seconds)

GIB = 1024 ** 3
IMAGENET_TRAIN_IMAGES = 1_281_167
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements), ZeRO-1/2
ACTIVATION_BYTES = 2  # bf16


class EstimateError(UserError):
    """An estimate was asked for with inputs that do not describe a run."""


# ----------------------------------------------------------------------------------------------------------------------
# Model states
# ----------------------------------------------------------------------------------------------------------------------

def param_numels(cfg: DiTConfig) -> list[int]:
    """Elements of every parameter of the model `cfg` describes, in registration order (meta device)."""
    with torch.device("meta"):
        model = LightningDiT(cfg)
    return [p.numel() for p in model.parameters()]


def largest_layer_params(cfg: DiTConfig) -> int:
    """Parameters of the largest single weight matrix (what ZeRO-3 gathers at a time, at least)."""
    shape = resolve_shape(cfg)
    from ..models.layers import swiglu_hidden
    d = shape.hidden_size
    return max(d * 6 * d, d * 2 * swiglu_hidden(d, cfg.mlp_ratio), (cfg.num_classes + 1) * d)


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of each part of the model states."""

    params: float
    grads: float
    optimizer: float  # AdamW moments (+ DeepSpeed's fp32 partition copy of the weights for ZeRO >= 1)
    ema: float
    buffers: float  # ZeRO-2's gradient reduce bucket, ZeRO-3's gathered layer, autocast's bf16 weight copies

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.ema + self.buffers


def model_state_bytes(params: int, zero_stage: int, world: int, largest_layer: int = 0) -> ModelStates:
    """Model-state bytes per GPU of our engine (fp32 weights, bf16 autocast, AdamW, sharded fp32 EMA)."""
    if zero_stage not in (0, 1, 2, 3):
        raise EstimateError(f"zero stage must be 0, 1, 2 or 3, got {zero_stage}")
    if world <= 0:
        raise EstimateError(f"GPU count must be positive, got {world}")
    p, n = float(params), float(world)
    weights = 4 * p if zero_stage < 3 else 4 * p / n
    master = 0.0 if zero_stage == 0 else 4 * p / n  # DeepSpeed clones the fp32 partition it steps
    moments = 8 * p if zero_stage == 0 else 8 * p / n
    grads = 4 * p if zero_stage < 2 else 4 * p / n
    autocast_copies = 2 * p if zero_stage < 3 else 2 * p / n
    if zero_stage == 2:
        buffers = 4 * min(p, DEEPSPEED_REDUCE_BUCKET) + autocast_copies
    elif zero_stage == 3:
        buffers = 2 * 4 * largest_layer + autocast_copies  # a gathered layer and its full gradient
    else:
        buffers = autocast_copies
    return ModelStates(weights, grads, moments + master, 4 * p / n, buffers)


def deepspeed_mixed_state_bytes(params: int, zero_stage: int, world: int, largest_layer: int = 0) -> float:
    """Model-state bytes per GPU in DeepSpeed's mixed-precision layout (16-bit weights and gradients, fp32 master
    weights, gradients and Adam moments), as DeepSpeed's estimators count it (no offload): ZeRO-2 keeps 2 bytes of
    16-bit weights per parameter and partitions 18; ZeRO-3 partitions all 18 and holds the largest layer (4 bytes)."""
    if zero_stage == 2:
        return 2 * params + int(18 * params / world)
    if zero_stage == 3:
        return 4 * largest_layer + int(18 * params / world)
    raise EstimateError(f"DeepSpeed's estimators cover ZeRO-2 and ZeRO-3, not stage {zero_stage}")


# ----------------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------------

class _FlashLikeAttention(torch.autograd.Function):
    """Saves what FlashAttention saves for backward (q, k, v, out, log-sum-exp per row); meta-device only."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only shapes are ever asked of this op
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _flash_like_attention():
    original = dit_module.attention
    dit_module.attention = lambda q, k, v, backend="auto": _FlashLikeAttention.apply(q, k, v)
    try:
        yield
    finally:
        dit_module.attention = original


def _saved_bytes(cfg: DiTConfig, batch: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves in one forward of `cfg` at `batch`, distinct storages, parameters excluded."""
    with torch.device("meta"):
        model = LightningDiT(replace(cfg, grad_checkpointing=False)).to(dtype)
        x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, dtype=dtype)
        t, y = torch.rand(batch), torch.zeros(batch, dtype=torch.long)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with _flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, y)
    return sum(saved.values())


def activation_bytes(cfg: DiTConfig, micro_batch: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes saved for backward per GPU at `micro_batch` images (bf16 activations; RoPE's fp32 math included).
    Under activation checkpointing only each block's input stays, plus one block's activations in its recompute."""
    total = _saved_bytes(cfg, micro_batch, dtype)
    if not cfg.grad_checkpointing:
        return total
    depth = resolve_shape(cfg).depth
    one_block = total - _saved_bytes(replace(cfg, depth=depth - 1), micro_batch, dtype) if depth > 1 else total
    shape = resolve_shape(cfg)
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    block_inputs = depth * micro_batch * tokens * shape.hidden_size * torch.finfo(dtype).bits // 8
    return total - depth * one_block + one_block + block_inputs


# ----------------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    dit: DiTConfig
    zero_stage: int
    micro_batch: int
    grad_accum: int
    num_gpus: int
    gpu: str
    mfu: float
    params: int
    flops_per_image: float  # training FLOPs (forward + backward [+ recompute] [+ tokenizer encode])
    peak_flops: float
    states: ModelStates
    activations: float
    deepspeed_mixed_states: Optional[float]
    comm: StepComm
    network: Network
    overlap: bool
    grad_dtype: str
    numels: tuple[int, ...] = field(repr=False, default=())
    total_images: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.num_gpus

    @property
    def memory_per_gpu(self) -> float:
        return self.states.total + self.activations

    @property
    def compute_s(self) -> float:
        """Seconds of compute per optimiser step (FLOPs at the stated MFU)."""
        return self.global_batch * self.flops_per_image / (self.num_gpus * self.peak_flops * self.mfu)

    @property
    def comm_s(self) -> float:
        return self.comm.seconds

    @property
    def step_s(self) -> float:
        return step_seconds(self.compute_s, self.comm_s, self.overlap)

    @property
    def images_per_s(self) -> float:
        return self.global_batch / self.step_s

    @property
    def wall_s(self) -> Optional[float]:
        return None if self.total_images is None else self.total_images / self.images_per_s

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.wall_s is None else self.wall_s * self.num_gpus / 3600

    def as_dict(self) -> dict:
        return {"size": self.dit.size, "patch": self.dit.patch_size, "params": self.params, "zero": self.zero_stage,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "gpus": self.num_gpus,
                "gpu": self.gpu, "mfu": self.mfu, "global_batch": self.global_batch,
                "train_gflops_per_image": self.flops_per_image / 1e9, "peak_tflops": self.peak_flops / 1e12,
                "mem_params_gib": self.states.params / GIB, "mem_grads_gib": self.states.grads / GIB,
                "mem_optimizer_gib": self.states.optimizer / GIB, "mem_ema_gib": self.states.ema / GIB,
                "mem_buffers_gib": self.states.buffers / GIB, "mem_activations_gib": self.activations / GIB,
                "mem_total_gib": self.memory_per_gpu / GIB,
                "deepspeed_mixed_states_gib": None if self.deepspeed_mixed_states is None
                else self.deepspeed_mixed_states / GIB,
                "compute_s": self.compute_s, "comm_s": self.comm_s, "overlap": self.overlap,
                "grad_dtype": self.grad_dtype, "nodes": self.comm.nodes,
                "network": {"name": self.network.name, "gpus_per_node": self.network.gpus_per_node,
                            "nvlink_gbs": self.network.intra_gbs, "inter_node_gbs": self.network.inter_gbs,
                            "efficiency": self.network.efficiency,
                            "bus_bandwidth_gbs": self.comm.bus_bandwidth / 1e9},
                "comm_payload_gb": self.comm.payload / 1e9, "comm_wire_gb_per_gpu": self.comm.wire / 1e9,
                "collectives": [{"op": c.op, "what": c.what, "payload_gb": c.payload / 1e9,
                                 "wire_gb_per_gpu": c.wire(self.num_gpus) / 1e9} for c in self.comm.collectives],
                "images_per_s": self.images_per_s, "step_s": self.step_s, "total_images": self.total_images,
                "wall_hours": None if self.wall_s is None else self.wall_s / 3600, "gpu_hours": self.gpu_hours}


def resolve_peak(gpu: str, peak_tflops: Optional[float] = None) -> tuple[str, float]:
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise EstimateError(f"--peak-tflops must be positive, got {peak_tflops}")
        return gpu, peak_tflops * 1e12
    found = peak_bf16_flops(gpu)
    if found.flops is None:
        raise EstimateError(f"gpu {gpu!r} is not in the peak table; use one of {', '.join(sorted(ACCELERATORS))} "
                            f"or give --peak-tflops")
    return found.key, found.flops


@dataclass(frozen=True)
class NetworkChoice:
    """How the estimate picks the network and the overlap (CLI flags; None = the defaults)."""

    instance: Optional[str] = None
    gpus_per_node: Optional[int] = None
    intra_gbs: Optional[float] = None
    inter_gbs: Optional[float] = None
    efficiency: float = DEFAULT_EFFICIENCY
    overlap: str = "auto"  # auto (DeepSpeed's default for the stage) | on | off
    grad_dtype: str = "fp32"


def _overlap(choice: NetworkChoice, zero_stage: int) -> bool:
    if choice.overlap not in ("auto", "on", "off"):
        raise EstimateError(f"--overlap must be auto, on or off, got {choice.overlap!r}")
    return overlapped_by_default(zero_stage) if choice.overlap == "auto" else choice.overlap == "on"


def estimate(dit: DiTConfig, *, zero_stage: int, micro_batch: int, num_gpus: int, gpu: str, mfu: float,
             grad_accum: int = 1, total_images: Optional[int] = None, peak_tflops: Optional[float] = None,
             extra_flops_per_image: float = 0.0, notes: Optional[list[str]] = None,
             network: Optional[NetworkChoice] = None) -> Estimate:
    if micro_batch <= 0 or grad_accum <= 0 or num_gpus <= 0:
        raise EstimateError(f"micro-batch, grad-accum and GPU count must be positive, got {micro_batch}, "
                            f"{grad_accum}, {num_gpus}")
    if not 0 < mfu <= 1:
        raise EstimateError(f"--mfu is a fraction of the peak in (0, 1], got {mfu}")
    key, peak = resolve_peak(gpu, peak_tflops)
    choice = network or NetworkChoice()
    net = resolve_network(key, choice.instance, gpus_per_node=choice.gpus_per_node, intra_gbs=choice.intra_gbs,
                          inter_gbs=choice.inter_gbs, efficiency=choice.efficiency)
    numels = param_numels(dit)
    params = sum(numels)
    layer = largest_layer_params(dit)
    mixed = deepspeed_mixed_state_bytes(params, zero_stage, num_gpus, layer) if zero_stage in (2, 3) else None
    comm = step_comm(numels, zero_stage, num_gpus, net, grad_accum=grad_accum, grad_dtype=choice.grad_dtype)
    return Estimate(dit, zero_stage, micro_batch, grad_accum, num_gpus, key, mfu, params,
                    dit_flops(dit).train + extra_flops_per_image, peak,
                    model_state_bytes(params, zero_stage, num_gpus, layer), activation_bytes(dit, micro_batch), mixed,
                    comm, net, _overlap(choice, zero_stage), choice.grad_dtype, tuple(numels), total_images,
                    list(notes or []))


@dataclass(frozen=True)
class ScalingRow:
    nodes: int
    gpus: int
    micro_batch: Optional[int]  # None: the global batch does not split over these GPUs
    compute_s: float = 0.0
    comm_s: float = 0.0
    step_s: float = 0.0
    images_per_s: float = 0.0
    efficiency: Optional[float] = None  # images/s per GPU against one node's


def scaling_rows(e: Estimate, max_nodes: int) -> list[ScalingRow]:
    """The step of `e` on 1, 2, 4, ... `max_nodes` nodes of its network at the same global batch (strong scaling:
    the micro-batch shrinks, compute per GPU falls as 1/GPUs at the same MFU, communication per GPU does not)."""
    if max_nodes <= 0:
        raise EstimateError(f"--max-nodes must be a positive number of nodes, got {max_nodes}")
    counts = sorted({2 ** i for i in range(max_nodes.bit_length()) if 2 ** i <= max_nodes} | {max_nodes})
    per_node = e.network.gpus_per_node
    rows: list[ScalingRow] = []
    for nodes in counts:
        gpus = nodes * per_node
        if e.global_batch % (gpus * e.grad_accum):
            rows.append(ScalingRow(nodes, gpus, None))
            continue
        compute = e.global_batch * e.flops_per_image / (gpus * e.peak_flops * e.mfu)
        comm = step_comm(e.numels, e.zero_stage, gpus, e.network, grad_accum=e.grad_accum,
                         grad_dtype=e.grad_dtype).seconds
        step = step_seconds(compute, comm, e.overlap)
        rows.append(ScalingRow(nodes, gpus, e.global_batch // (gpus * e.grad_accum), compute, comm, step,
                               e.global_batch / step))
    base = rows[0] if rows[0].micro_batch is not None else None
    return [r if base is None or r.micro_batch is None
            else replace(r, efficiency=(r.images_per_s / r.gpus) / (base.images_per_s / base.gpus)) for r in rows]


def format_scaling(e: Estimate, rows: list[ScalingRow]) -> str:
    lines = [f"scaling at global batch {e.global_batch} on {e.network.name}, {e.network.gpus_per_node} GPUs per node, "
             f"{'overlapped' if e.overlap else 'not overlapped'}",
             f"  {'nodes':>5} {'GPUs':>5} {'micro':>5} {'compute ms':>10} {'comm ms':>8} {'step ms':>8} "
             f"{'images/s':>10} {'efficiency':>10}"]
    for r in rows:
        if r.micro_batch is None:
            lines.append(f"  {r.nodes:>5} {r.gpus:>5}   global batch {e.global_batch} does not split over "
                         f"{r.gpus} GPUs x grad_accum {e.grad_accum}")
            continue
        eff = "-" if r.efficiency is None else f"{r.efficiency:.0%}"
        lines.append(f"  {r.nodes:>5} {r.gpus:>5} {r.micro_batch:>5} {r.compute_s * 1e3:>10.1f} {r.comm_s * 1e3:>8.1f} "
                     f"{r.step_s * 1e3:>8.1f} {r.images_per_s:>10,.0f} {eff:>10}")
    return "\n".join(lines)


def estimate_run(cfg: RunConfig, *, num_gpus: Optional[int] = None, gpu: str = "H200", mfu: float = 0.4,
                 epochs: Optional[float] = None, dataset_images: Optional[int] = None,
                 peak_tflops: Optional[float] = None, network: Optional[NetworkChoice] = None) -> Estimate:
    """The estimate of a generator/reference run config (its score model, batch, ZeRO stage, total images), with
    the GPU count and length optionally replaced (--gpus, --epochs)."""
    if cfg.stage not in ("generator", "reference"):
        raise EstimateError(f"estimate covers the DiT stages (generator, reference); {cfg.stage!r} trains other "
                            "models")
    gpus = num_gpus or worker_range(cfg)[1]  # an elastic run: planned at its max
    accum = cfg.distributed.grad_accum
    if cfg.batch_size % (gpus * accum):
        raise EstimateError(f"batch_size={cfg.batch_size} does not split over {gpus} GPUs x grad_accum={accum}; "
                            "choose a GPU count that divides it")
    notes = []
    total = cfg.total_images
    if epochs is not None:
        if dataset_images is None:
            dataset_images = IMAGENET_TRAIN_IMAGES
            notes.append(f"an epoch is {IMAGENET_TRAIN_IMAGES:,} images (ImageNet-1k train; --dataset-images to "
                         "change)")
        total = int(round(epochs * dataset_images))
    extra = 0.0
    if cfg.stage == "generator" and not cfg.data.latents:
        tok = tokenizer_flops(cfg.tokenizer)
        extra = tok.encoder + tok.bottleneck
        notes.append("latents are encoded every step (no data.latents): the encoder's forward is counted")
    return estimate(cfg.score, zero_stage=cfg.distributed.zero_stage, micro_batch=cfg.batch_size // (gpus * accum),
                    grad_accum=accum, num_gpus=gpus, gpu=gpu, mfu=mfu, total_images=total, peak_tflops=peak_tflops,
                    extra_flops_per_image=extra, notes=notes, network=network)


def _duration(seconds: float) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{int(days)}d {rest / 3600:.1f}h" if days else f"{seconds / 3600:.2f}h"


def format_estimate(e: Estimate) -> str:
    d = e.dit
    name = d.size if d.depth is None else f"custom {resolve_shape(d).depth}x{resolve_shape(d).hidden_size}"
    lines = [f"LightningDiT-{name}/{d.patch_size} on {d.input_size}x{d.input_size}x{d.in_channels} latents: "
             f"{e.params / 1e6:.1f}M parameters, {e.flops_per_image / 1e9:.1f} GFLOPs per training image",
             f"{e.num_gpus} x {e.gpu} (dense bf16 peak {e.peak_flops / 1e12:.0f} TFLOP/s), ZeRO-{e.zero_stage}, "
             f"micro-batch {e.micro_batch} x grad_accum {e.grad_accum} = global batch {e.global_batch}",
             "", "memory per GPU (GiB)"]
    s = e.states
    for label, value in [("parameters (fp32)", s.params), ("gradients (fp32)", s.grads),
                         ("optimizer (AdamW moments + fp32 partition)", s.optimizer), ("EMA (fp32, sharded)", s.ema),
                         ("buffers (reduce bucket / gathered layer / bf16 casts)", s.buffers),
                         (f"activations (micro-batch {e.micro_batch})", e.activations)]:
        lines.append(f"  {label:<55}{value / GIB:>9.2f}")
    lines.append(f"  {'total':<55}{e.memory_per_gpu / GIB:>9.2f}")
    hbm = ACCELERATORS[e.gpu].memory_gib if e.gpu in ACCELERATORS else None
    if hbm:
        verdict = "fits" if e.memory_per_gpu / GIB < 0.9 * hbm else "does NOT fit (keep 10% for the allocator)"
        lines.append(f"  {e.gpu} has {hbm:.0f} GB: {verdict}")
    if e.deepspeed_mixed_states is not None:
        lines.append(f"  DeepSpeed's estimator (bf16 weights + fp32 master layout): model states "
                     f"{e.deepspeed_mixed_states / GIB:.2f} GiB vs ours {s.total / GIB:.2f} GiB")
    lines += ["", f"communication per optimiser step per GPU ({e.grad_dtype} gradients, fp32 weights, "
                  f"{e.comm.world} ranks on {e.comm.nodes} node{'s' if e.comm.nodes > 1 else ''}; payload -> ring "
                  "wire bytes)"]
    for c in e.comm.collectives:
        lines.append(f"  {c.op + ' ' + c.what:<55}{c.payload / 1e9:>8.2f} GB -> {c.wire(e.num_gpus) / 1e9:.2f} GB")
    if not e.comm.collectives:
        lines.append("  none (one GPU)")
    lines += [f"  bus bandwidth {e.comm.bus_bandwidth / 1e9:.0f} GB/s ({e.network.name}: NVLink "
              f"{e.network.intra_gbs:.0f} GB/s per GPU, {e.network.inter_gbs:.0f} GB/s per node across, at "
              f"{e.network.efficiency:.0%})",
              "", f"compute {e.compute_s * 1e3:.1f} ms at {e.mfu:.0%} MFU, communication {e.comm_s * 1e3:.1f} ms "
              f"({'overlapped: the larger' if e.overlap else 'not overlapped: the sum'}): "
              f"{e.step_s * 1e3:.1f} ms per step, {e.images_per_s:,.0f} images/s"]
    if e.total_images is not None:
        lines.append(f"{e.total_images:,} images: {_duration(e.wall_s)} wall, {e.gpu_hours:,.0f} GPU-hours")
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)
