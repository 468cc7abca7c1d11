"""The plain single-process reference the tests (and tools/bench_engine.py) compare the DeepSpeed worker against:
a torch model + AdamW with the engine calling convention, and a plain EMA. Not part of the library: every run of
dmvae-scale goes through the DeepSpeed worker."""
from __future__ import annotations

import torch
from torch import nn

from dmvae_scale.config import OptimConfig
from dmvae_scale.train.api import warmup_lambda


class PlainEngine:
    """AdamW + linear warm-up + global-norm clipping around a module, with DeepSpeed's engine calling convention."""

    def __init__(self, module: nn.Module, optim: OptimConfig):
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(optim.warmup_steps))
        self.grad_clip = optim.grad_clip
        self.global_steps = 0
        self.last_grad_norm = torch.tensor(0.0)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip and self.grad_clip > 0:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.global_steps += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps = state["global_steps"]


class EMA:
    """Exponential moving average of a module's parameters (fp32 shadow copy), updated after each optimiser step."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))

    def module_state_dict(self, module: nn.Module) -> dict:
        """The module's full state dict with every parameter replaced by its average (buffers as they are):
        what an artifact's ema.safetensors holds."""
        state = module.state_dict()
        for n, v in self.shadow.items():
            state[n] = v.to(state[n].dtype)
        return state

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        self.shadow = {n: state[n].float().clone() for n in self.shadow}

