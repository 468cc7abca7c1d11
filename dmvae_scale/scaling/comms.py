"""Communication of one optimiser step: the collectives DeepSpeed runs for our engine, their bytes, and their time.

What each ZeRO stage moves per optimiser step (P parameters, g bytes per gradient element (4 fp32, 2 bf16 through
DeepSpeed's `communication_data_type`), 4 bytes per weight: our engine keeps fp32 module weights, DeepSpeed's bf16
mode is off; A micro-batches per step). "Payload" is the full buffer of a collective (the tensor all-reduced, the
output of an all-gather, the input of a reduce-scatter); that is what a test can measure on gloo.

  stage 0  all-reduce of the gradients, once per step (DeepSpeed's engine, after the last micro-batch):   g P
  stage 1  the same all-reduce, once per step, then an all-gather of the updated fp32 weight partitions:
           g P + 4 P'                                                  (P' = P padded to a multiple of 2 N)
  stage 2  as stage 1, but the gradients are reduced in every micro-batch's backward:             A g P + 4 P'
  stage 3  per micro-batch: a forward all-gather of every partitioned weight, a backward re-gather of the
           weights released after their forward use, a reduce-scatter of the gradients; per step: an
           all-gather of the persistent (small, never released) weights after the optimiser step:
           A (4 P_part + 4 P_regather + g P_pad) + 4 P_persist

Why stages 1 and 2 all-reduce instead of reduce-scattering: the ZeRO paper's stage 2 reduce-scatters the gradients
and all-gathers the weights (2 P on the wire, as plain data parallelism), but DeepSpeed (0.19) reduces each gradient
bucket with an all-reduce and keeps its partition (`use_multi_rank_bucket_allreduce`, on by default); our engine
takes that default. Stage 3 follows the paper (3 P on the wire at most, 1.5x data parallelism) except that DeepSpeed
keeps a weight gathered between its forward and backward use when the use comes back within
`stage3_max_reuse_distance` elements of the trace (or within a prefetch bucket), so small models gather once. We
count the trace distance between a weight's forward use and its backward use as 2 x the elements registered after it
(the rest of the forward, then the backward back to it) and re-gather a weight when that is at least the larger of
the reuse distance and the prefetch bucket. Weights below `stage3_param_persistence_threshold` elements stay whole on
every rank. Stage 3 pads every tensor to a multiple of N; stage 1/2 pad the flat weight group to a multiple of 2 N.

Wire bytes per rank (ring algorithms, the bandwidth-optimal schedule NCCL runs for large messages): all-reduce of S
bytes sends 2 (N-1)/N S (a reduce-scatter then an all-gather), reduce-scatter and all-gather of S send (N-1)/N S.

Time: wire bytes over the bus bandwidth. Within a node every GPU sends over NVLink; a ring that spans nodes also
crosses each node boundary, and with NCCL's channels spread over all the node's NICs the traffic crossing a node is
one GPU's traffic, so the slowest link bounds it: bus bandwidth = min(NVLink per GPU, the node's NICs together) at
the stated efficiency (nccl-tests bus bandwidth is typically 70-90% of the link peak). Latency terms are left out
(gradient buckets and per-layer gathers are tens of MB). Overlapped with compute, the step takes max(compute,
communication); not, their sum. DeepSpeed overlaps by default only at stage 3 (`overlap_comm`), and our engine takes
the default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError

# DeepSpeed's defaults (0.19), which our engine's DeepSpeed config leaves in place (train/deepspeed_engine.py).
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold (elements)
MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance (elements)
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size (elements)
ALIGNMENT = 2  # stage 1/2: nccl_start_alignment_factor; the flat group is padded to a multiple of 2 N
WEIGHT_BYTES = 4  # fp32 module weights
GRAD_BYTES = {"fp32": 4, "bf16": 2}
DEFAULT_EFFICIENCY = 0.8
GB = 1e9


class CommError(UserError):
    """A communication estimate was asked for with a network or dtype that does not describe one."""


@dataclass(frozen=True)
class Collective:
    """One kind of collective in an optimiser step: its payload summed over the step (bytes)."""

    op: str  # all_reduce | all_gather | reduce_scatter
    what: str
    payload: int

    def wire(self, world: int) -> float:
        """Bytes each rank sends for this payload under a ring algorithm."""
        if world <= 1:
            return 0.0
        factor = 2 * (world - 1) / world if self.op == "all_reduce" else (world - 1) / world
        return factor * self.payload


def _padded(numel: int, multiple: int) -> int:
    return math.ceil(numel / multiple) * multiple


def regathered(numels: Sequence[int], persistent: Sequence[bool], window: int) -> int:
    """Elements ZeRO-3 gathers again in backward: partitioned weights (in registration order, which is the forward
    order of our models) whose trace distance to their backward use, 2 x the elements after them, is >= `window`."""
    total, seen, count = sum(numels), 0, 0
    for n, keep in zip(numels, persistent):
        seen += n
        if not keep and 2 * (total - seen) >= window:
            count += n
    return count


def step_collectives(numels: Sequence[int], zero_stage: int, world: int, *, grad_accum: int = 1,
                     grad_dtype: str = "fp32", persistence_threshold: int = PERSISTENCE_THRESHOLD,
                     max_reuse_distance: int = MAX_REUSE_DISTANCE,
                     prefetch_bucket: int = PREFETCH_BUCKET) -> list[Collective]:
    """The collectives of one optimiser step for a model whose parameters have `numels` elements (registration
    order), at ZeRO `zero_stage` over `world` data-parallel ranks. Scalar collectives (the gradient norm) are left
    out. See the module docstring for the formulas."""
    if zero_stage not in (0, 1, 2, 3):
        raise CommError(f"zero stage must be 0, 1, 2 or 3, got {zero_stage}")
    if grad_dtype not in GRAD_BYTES:
        raise CommError(f"--grad-dtype must be one of {', '.join(GRAD_BYTES)}, got {grad_dtype!r}")
    if world <= 0 or grad_accum <= 0:
        raise CommError(f"world size and grad_accum must be positive, got {world} and {grad_accum}")
    if world == 1:
        return []
    g, p = GRAD_BYTES[grad_dtype], sum(numels)
    if zero_stage == 0:
        return [Collective("all_reduce", "gradients", g * p)]
    if zero_stage in (1, 2):
        reductions = 1 if zero_stage == 1 else grad_accum
        return [Collective("all_reduce", "gradients", reductions * g * p),
                Collective("all_gather", "updated weights", WEIGHT_BYTES * _padded(p, ALIGNMENT * world))]
    persistent = [n < persistence_threshold for n in numels]
    padded = [_padded(n, world) for n in numels]
    partitioned = sum(n for n, keep in zip(padded, persistent) if not keep)
    again = regathered(padded, persistent, max(max_reuse_distance, prefetch_bucket))
    found = [Collective("all_gather", "forward weight gathers", grad_accum * WEIGHT_BYTES * partitioned),
             Collective("all_gather", "backward re-gathers", grad_accum * WEIGHT_BYTES * again),
             Collective("reduce_scatter", "gradients", grad_accum * g * sum(padded)),
             Collective("all_gather", "persistent weights after the step",
                        WEIGHT_BYTES * sum(n for n, keep in zip(padded, persistent) if keep))]
    return [c for c in found if c.payload]


def payload_by_op(collectives: Sequence[Collective]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in collectives:
        out[c.op] = out.get(c.op, 0) + c.payload
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """Links of a GPU cluster: NVLink per GPU and the node's NICs together, GB/s in one direction, at link peak."""

    name: str
    gpus_per_node: int
    intra_gbs: float  # NVLink (NVSwitch) per GPU
    inter_gbs: float  # EFA / InfiniBand, all NICs of a node
    efficiency: float = DEFAULT_EFFICIENCY

    def bus_bandwidth(self, nodes: int) -> float:
        """Bytes/s a ring over `nodes` nodes sustains per GPU: NVLink within one node, the slowest link across."""
        peak = self.intra_gbs if nodes <= 1 else min(self.intra_gbs, self.inter_gbs)
        return peak * GB * self.efficiency


# Datasheet figures. NVLink: 900 GB/s both ways per H100/H200 (450 one way), 600 per A100, 1800 per B200.
# Inter-node: p4d/p4de 4 x 100 Gb/s EFA; p5/p5e/p5en/p6-b200 3200 Gb/s EFA; DGX H100/H200 8 x 400 Gb/s NDR
# InfiniBand; DGX A100 8 x 200 Gb/s HDR.
INSTANCES: dict[str, tuple[str, Network]] = {
    "p4d.24xlarge": ("A100", Network("p4d.24xlarge (EFA)", 8, 300.0, 50.0)),
    "p4de.24xlarge": ("A100", Network("p4de.24xlarge (EFA)", 8, 300.0, 50.0)),
    "p5.48xlarge": ("H100", Network("p5.48xlarge (EFA)", 8, 450.0, 400.0)),
    "p5e.48xlarge": ("H200", Network("p5e.48xlarge (EFA)", 8, 450.0, 400.0)),
    "p5en.48xlarge": ("H200", Network("p5en.48xlarge (EFA)", 8, 450.0, 400.0)),
    "p6-b200.48xlarge": ("B200", Network("p6-b200.48xlarge (EFA)", 8, 900.0, 400.0)),
    "dgx-a100": ("A100", Network("DGX A100 (HDR InfiniBand)", 8, 300.0, 200.0)),
    "dgx-h100": ("H100", Network("DGX H100 (NDR InfiniBand)", 8, 450.0, 400.0)),
    "dgx-h200": ("H200", Network("DGX H200 (NDR InfiniBand)", 8, 450.0, 400.0)),
}
# The instance a GPU type gets when none is named (the ACCELERATORS key the estimate resolved).
DEFAULT_INSTANCE = {"A100": "p4d.24xlarge", "A100-SXM4-40GB": "p4d.24xlarge", "H100": "p5.48xlarge",
                    "H200": "p5en.48xlarge", "B200": "p6-b200.48xlarge"}


def resolve_network(gpu: str, instance: Optional[str] = None, *, gpus_per_node: Optional[int] = None,
                    intra_gbs: Optional[float] = None, inter_gbs: Optional[float] = None,
                    efficiency: float = DEFAULT_EFFICIENCY) -> Network:
    """The network of `instance` (or of the GPU type's usual instance), with any figure overridden."""
    for flag, value in (("--gpus-per-node", gpus_per_node), ("--intra-gbs", intra_gbs), ("--inter-gbs", inter_gbs)):
        if value is not None and value <= 0:
            raise CommError(f"{flag} must be positive, got {value}")
    if not 0 < efficiency <= 1:
        raise CommError(f"--comm-efficiency is a fraction of the link peak in (0, 1], got {efficiency}")
    if instance is not None and instance not in INSTANCES:
        raise CommError(f"instance {instance!r} is not in the network table; use one of {', '.join(INSTANCES)} "
                        "or give --intra-gbs and --inter-gbs")
    if instance is not None and not gpu.startswith(INSTANCES[instance][0]):
        raise CommError(f"instance {instance} has {INSTANCES[instance][0]} GPUs, not {gpu}; give --gpu "
                        f"{INSTANCES[instance][0]}, or --intra-gbs and --inter-gbs for another network")
    key = instance or DEFAULT_INSTANCE.get(gpu)
    if key is None:
        if intra_gbs is None or inter_gbs is None:
            raise CommError(f"no network defaults for gpu {gpu!r}; give --instance ({', '.join(INSTANCES)}) or "
                            "--intra-gbs and --inter-gbs")
        base = Network("custom", gpus_per_node or 8, intra_gbs, inter_gbs)
    else:
        base = INSTANCES[key][1]
    custom = any(v is not None for v in (gpus_per_node, intra_gbs, inter_gbs))
    return Network(base.name + (" with overrides" if custom and key else ""), gpus_per_node or base.gpus_per_node,
                   intra_gbs or base.intra_gbs, inter_gbs or base.inter_gbs, efficiency)


def nodes_for(gpus: int, network: Network) -> int:
    """Nodes a run of `gpus` GPUs fills (one partly filled node below a node's worth)."""
    if gpus <= network.gpus_per_node:
        return 1
    if gpus % network.gpus_per_node:
        raise CommError(f"{gpus} GPUs do not fill whole nodes of {network.gpus_per_node}; choose a multiple or "
                        "give --gpus-per-node")
    return gpus // network.gpus_per_node


@dataclass(frozen=True)
class StepComm:
    """Communication of one optimiser step per GPU."""

    collectives: list[Collective]
    world: int
    nodes: int
    bus_bandwidth: float  # bytes/s

    @property
    def payload(self) -> int:
        return sum(c.payload for c in self.collectives)

    @property
    def wire(self) -> float:
        return sum(c.wire(self.world) for c in self.collectives)

    @property
    def seconds(self) -> float:
        return self.wire / self.bus_bandwidth if self.wire else 0.0


def step_comm(numels: Sequence[int], zero_stage: int, world: int, network: Network, *, grad_accum: int = 1,
              grad_dtype: str = "fp32") -> StepComm:
    nodes = nodes_for(world, network)
    return StepComm(step_collectives(numels, zero_stage, world, grad_accum=grad_accum, grad_dtype=grad_dtype),
                    world, nodes, network.bus_bandwidth(nodes))


def overlapped_by_default(zero_stage: int) -> bool:
    """DeepSpeed's `overlap_comm` default: on at stage 3 only."""
    return zero_stage == 3


def step_seconds(compute_s: float, comm_s: float, overlap: bool) -> float:
    return max(compute_s, comm_s) if overlap else compute_s + comm_s
