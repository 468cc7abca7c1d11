"""Small stages and data for the engine tests (no tests here): a GAN-like two-engine stage with a frozen teacher.

The student regresses the frozen teacher's outputs and is pushed by a critic (GAN-like: the critic's parameters take
no gradient from the student's loss); the critic steps every second iteration. Everything is deterministic given
the seed and the batch, so a DeepSpeed run and a single-process run of the same seed can be compared number by
number. Batches carry the sample index as "label"; the stage reports index moments so tests can check data order.
"""
from __future__ import annotations

import functools
import os
import signal
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dmvae_scale.config import RunConfig, load_config
from dmvae_scale.train.api import ModelSpec, StepOutput
from dmvae_scale.train.batches import stream_batches
from dmvae_scale.train.loop import train_loop
from dmvae_scale.train.stages import no_param_grads
from plain_engine import EMA, PlainEngine

DIM = 8


class VectorData(Dataset):
    """N fixed Gaussian vectors; item i is {"image": x_i, "label": i}."""

    def __init__(self, n: int = 96, seed: int = 123):
        self.x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": torch.tensor(i)}

    def set_epoch(self, epoch: int) -> None:
        pass


def vector_data(cfg: RunConfig) -> VectorData:
    return VectorData()


def mlp(i: int, h: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, o))


class ToyGANStage:
    name = "toy"

    def __init__(self, cfg: RunConfig, rank: int = 0, nan_from_step: int | None = None, nan_rank: int | None = None,
                 kill_at_step: int | None = None, kill_rank: int = 1, kill_marker: str | None = None,
                 sleep_s: float = 0.0, hidden: int = 32):
        self.cfg, self.rank = cfg, rank
        self.teacher = mlp(DIM, 16, 1)
        self.student = mlp(DIM, hidden, 1)
        self.critic = mlp(1 + DIM, 16, 1)
        self._models = {"student": ModelSpec(self.student, True, cfg.optim, ema=True),
                        "critic": ModelSpec(self.critic, True, cfg.optim),
                        "teacher": ModelSpec(self.teacher, False)}
        self.nan_from_step, self.nan_rank = nan_from_step, nan_rank
        self.kill_at_step, self.kill_rank, self.kill_marker = kill_at_step, kill_rank, kill_marker
        self.sleep_s = sleep_s

    def models(self):
        return self._models

    def step(self, batch, step, engines):
        if self.kill_at_step is not None and step == self.kill_at_step and self.rank == self.kill_rank \
                and not os.path.exists(self.kill_marker):
            open(self.kill_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # a worker process dies mid-run
        if self.sleep_s:
            time.sleep(self.sleep_s)
        x = batch["image"]
        with torch.no_grad():
            y = self.teacher(x)
        student, critic = engines["student"], engines["critic"]
        pred = student(x)
        with no_param_grads(critic.module):
            adv = F.softplus(-critic(torch.cat([pred, x], 1))).mean()
        loss = F.mse_loss(pred, y) + 0.1 * adv
        if self.nan_from_step is not None and step >= self.nan_from_step and self.nan_rank in (None, self.rank):
            loss = loss * float("nan")
        student.backward(loss)
        student.step()
        metrics = {"loss": loss.detach()}
        if step % 2 == 1:
            real = critic(torch.cat([y, x], 1))
            fake = critic(torch.cat([pred.detach(), x], 1))
            closs = F.softplus(-real).mean() + F.softplus(fake).mean()
            critic.backward(closs)
            critic.step()
            metrics["critic_loss"] = closs.detach()
        ids = batch["label"].double()
        metrics.update(ids=ids.mean(), ids_sq=(ids ** 2).mean())
        return StepOutput(metrics, images=len(x))

    def artifact(self):
        return {"models": ["student", "critic"], "latent": None, "upstream": {}, "extra": {}}


def toy_stage(cfg: RunConfig, rank: int = 0, **kwargs) -> ToyGANStage:
    return ToyGANStage(cfg, rank, **kwargs)


def toy_factory(**kwargs):
    return functools.partial(toy_stage, **kwargs)


def toy_config(run_dir, *overrides: str) -> RunConfig:
    return load_config(None, [f"run_dir={run_dir}", "batch_size=8", "total_images=96", "log_every_images=8",
                              "ckpt_every_images=32", "distributed.num_workers=2", "distributed.zero_stage=2",
                              "optim.lr=0.01", "optim.warmup_steps=3", "optim.ema_decay=0.8",
                              "optim.weight_decay=0.01", "optim.grad_clip=0.5", *overrides])


def single_process_run(cfg: RunConfig):
    """The same stage, seed and global batches in this process with PlainEngines: the reference trajectory.
    Returns (history by images, {model: weights}, {model: EMA weights})."""
    torch.manual_seed(cfg.seed)
    stage = toy_stage(cfg)
    engines = {n: PlainEngine(s.module, s.optim) for n, s in stage.models().items() if s.trainable}
    emas = {n: EMA(engines[n].module, cfg.optim.ema_decay) for n, s in stage.models().items() if s.ema}
    summary, loop = train_loop(stage, engines, stream_batches(VectorData(), cfg.batch_size, cfg.seed), cfg,
                               emas=emas, progress=False)
    weights = {n: {k: v.clone() for k, v in e.module.state_dict().items()} for n, e in engines.items()}
    ema = {n: e.module_state_dict(engines[n].module) for n, e in loop.emas.items()}
    return {int(h["images"]): h for h in summary.history}, weights, ema
