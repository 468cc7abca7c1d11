"""The contract between a stage (what to train) and whatever drives it (one process, or DeepSpeed workers).

A stage never builds optimisers or touches distribution. It declares its models; the worker wraps every trainable one
in an engine with the DeepSpeed engine's calling convention (`engine(x)`, `engine.backward(loss)`, `engine.step()`,
`engine.module`), and calls `stage.step(batch, step_index, engines)`. A launcher hands each worker a `WorkerJob` and
gets a `WorkerResult` back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

# The batch keys are part of the contract; they live on the bottom floor so data/ and distributed/ share them.
from ..batch_keys import FEATURES_KEY, IMAGE_KEY, LABEL_KEY, LATENT_KEY  # noqa: F401
from ..config import OptimConfig, RunConfig


@dataclass
class ModelSpec:
    """One model of a stage. Trainable ones get an engine (optimiser, schedule, clipping, EMA)."""

    module: nn.Module
    trainable: bool
    optim: OptimConfig | None = None  # required when trainable
    ema: bool = False


@dataclass
class StepOutput:
    """What one step reports. Values stay tensors (no host sync); the driver reduces them at its log interval."""

    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    images: int = 0  # images consumed by this step on this worker


class Engine(Protocol):
    module: nn.Module

    def __call__(self, *args, **kwargs) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


class Stage(Protocol):
    name: str

    def models(self) -> dict[str, ModelSpec]:
        """Every model of the stage, by name (e.g. tokenizer, fake_score, discriminator, real_score)."""

    def step(self, batch: dict[str, torch.Tensor], step: int, engines: dict[str, Engine]) -> StepOutput:
        """One training iteration on this worker's batch. Calls engine.backward/step for the models it updates."""

    def artifact(self) -> dict[str, Any]:
        """What the stage hands to the next one: {"models": names whose weights (and EMA) are saved, "latent":
        LatentSpec or None, "upstream": {role: artifact id}, "extra": {...}} (train/stages.save_stage_artifact)."""

    def needs_prepare(self) -> bool:
        """Whether prepare() has work to do (measuring latent statistics) before the first step."""

    def prepare(self, batches: Any) -> None:
        """Work before training on an iterable of batches that must be the same on every rank."""

    def state_dict(self) -> dict:
        """The stage's own state beyond model weights (e.g. measured latent statistics), for checkpoints."""

    def load_state_dict(self, state: dict) -> None: ...


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclass
class WorkerJob:
    """Everything a worker needs; picklable (it travels to Ray workers).

    stage_factory(cfg, rank) -> Stage and dataset_factory(cfg) -> map-style dataset with set_epoch() replace the
    real ones (train.stages.build_stage; the data reader) where a caller brings its own (tests, benchmarks)."""

    cfg: RunConfig
    stage_factory: Optional[Callable] = None
    dataset_factory: Optional[Callable] = None
    shard_frozen_above_bytes: Optional[int] = None
    control: Any = None  # a Ray actor handle with .requests() -> (stop, preemption notice); set by the Ray launcher
    wandb_project: Optional[str] = None  # log to Weights & Biases too (the launcher takes it from WANDB_PROJECT)
    progress: bool = True  # a progress bar in this process (never under Ray: one log line per interval instead)


@dataclass
class WorkerResult:
    status: str  # "done" | "stopped" | "diverged" | "refused" | "error"
    message: str = ""
    images_seen: int = 0
    steps: int = 0
    skipped_steps: int = 0
    checkpoint: str = ""
    artifact: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
