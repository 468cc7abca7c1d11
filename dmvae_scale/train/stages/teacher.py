"""The optional teacher stage: self-supervised (VICReg) training of the tokenizer's encoder network."""
from __future__ import annotations

import torch

from ...config import RunConfig, check_stage_inputs
from ...method.ssl import ViewAugment, info_nce_loss, vicreg_loss
from ...models.ssl import SSLEncoder
from ..api import ModelSpec, StepOutput
from .common import _StageBase, stage_teacher_spec


class TeacherStage(_StageBase):
    """Stage 0 (teacher): train the tokenizer's encoder network self-supervised (VICReg) on the images, where no SSL
    weights can be had. Geometry from the tokenizer section (encoder arch and patch size, image size), so the
    artifact's network is the `ssl` registry teacher and loads into a tokenizer's encoder as it is."""

    export = ("teacher",)

    def __init__(self, cfg: RunConfig, rank: int = 0):
        super().__init__(cfg, rank)
        self.name = cfg.stage
        check_stage_inputs(cfg)
        self.teacher_spec = stage_teacher_spec(cfg)  # None; refuses teacher.remote
        enc = cfg.tokenizer.encoder
        self.network = SSLEncoder(enc.arch, cfg.tokenizer.image_size, enc.patch_size, cfg.ssl.expander_dim)
        self.augment = ViewAugment(scale=(cfg.ssl.crop_min, 1.0))
        self._models = {"teacher": ModelSpec(self.network, True, cfg.optim, ema=True)}

    def step(self, batch, step, engines):
        x = batch["image"]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        _, g = self._rng(step, x)
        views = torch.cat([self.augment(x, g), self.augment(x, g)])
        net, s = engines["teacher"], self.cfg.ssl
        with self.autocast():
            z1, z2 = net(views).chunk(2)
        if s.objective == "simclr":
            loss, terms = info_nce_loss(z1, z2, s.temperature)
        else:
            loss, terms = vicreg_loss(z1, z2, s.invariance_weight, s.variance_weight, s.covariance_weight)
        net.backward(loss)
        net.step()
        return StepOutput({"loss": loss.detach(), **terms}, images=len(x))
