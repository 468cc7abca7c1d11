"""The CPU side of issue #22's speed work: the fused EMA update, FLOPs averaged over a stage's cycle of steps with
model and hardware FLOPs apart, and the host syncs a training step makes (Tensor.item / Tensor.__bool__)."""
from __future__ import annotations

import sys

import pytest
import test_engine_toys as toys
import torch
from plain_engine import PlainEngine
from torch import nn

from dmvae_scale.config import DiTConfig
from dmvae_scale.models.dit import LightningDiT
from dmvae_scale.train.batches import stream_batches
from dmvae_scale.train.ema import ShardedEMA
from dmvae_scale.train.loop import train_loop
from dmvae_scale.train.reporting import FlopCounter


@pytest.mark.unit
@pytest.mark.parametrize("world", [1, 3])
def test_fused_ema_update_is_bit_equal_to_the_per_parameter_loop(world):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(torch.bfloat16)
    ema = ShardedEMA(module, 0.9, rank=world - 1, world=world)
    reference = {n: t.clone() for n, t in ema.shadow.items()}
    for _ in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update(module)
        for n, p in ema.params.items():  # the loop the fused update replaced
            reference[n].lerp_(ema._local(p).float(), 1.0 - ema.decay)
    for n, expected in reference.items():
        assert torch.equal(ema.shadow[n], expected), n


def _toy_run(tmp_path, flops: FlopCounter | None = None, images: int = 32):
    cfg = toys.toy_config(tmp_path, f"total_images={images}", "distributed.num_workers=1")
    torch.manual_seed(cfg.seed)
    stage = toys.toy_stage(cfg)
    engines = {n: PlainEngine(s.module, s.optim) for n, s in stage.models().items() if s.trainable}
    emas = {n: ShardedEMA(engines[n].module, cfg.optim.ema_decay, 0, 1) for n, s in stage.models().items() if s.ema}
    batches = stream_batches(toys.VectorData(), cfg.batch_size, cfg.seed)
    if flops is not None:
        batches = flops.wrap(batches)
    summary, _ = train_loop(stage, engines, batches, cfg, emas=emas, progress=False)
    if flops is not None:
        flops.close()
    return summary


@pytest.mark.unit
def test_flops_per_step_is_the_mean_over_the_stages_cycle_of_cheap_and_expensive_steps(tmp_path):
    # The toy stage updates its critic on odd steps only: step 0 is the cheap one, step 1 the expensive one.
    first_only, cycle = FlopCounter(8, steps=1), FlopCounter(8, steps=2)
    _toy_run(tmp_path / "a", first_only)
    _toy_run(tmp_path / "b", cycle)
    (cheap, _), (dear, _) = cycle.per_step
    assert dear > cheap > 0
    assert first_only.flops_per_step == cheap  # what the log said before: the cheap step alone
    assert cycle.flops_per_step == (cheap + dear) / 2 == cycle.model_flops_per_step  # no recompute here
    restored = FlopCounter(8)
    restored.load_state_dict(cycle.state_dict())
    assert restored.flops_per_step == cycle.flops_per_step


@pytest.mark.unit
def test_a_resumed_run_counts_the_same_steps_as_an_uninterrupted_one():
    """Counting changes a step's last bits (SiLU's backward under FlopCounterMode, below), so which steps are counted
    must depend on the step index alone: a run resumed after step 1 of a 2-step cycle counts step 1 and keeps the
    checkpoint's count of step 0, the mean then equals the uninterrupted run's; resumed past the cycle, it counts
    nothing."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(64, 8, requires_grad=True)
    torch.nn.functional.silu(x).square().sum().backward()
    plain, x.grad = x.grad, None
    with FlopCounterMode(display=False):
        torch.nn.functional.silu(x).square().sum().backward()
    assert not torch.equal(plain, x.grad)  # why: were this ever equal, counting could go anywhere

    def count(start_step: int, earlier: FlopCounter | None, costs: list[int]) -> FlopCounter:
        counter = FlopCounter(2, steps=2)
        if earlier is not None:
            counter.load_state_dict(earlier.state_dict())
        counted = 0
        for n in counter.wrap(iter(costs[start_step:]), start_step=start_step):
            a = torch.randn(n, 16)
            a @ a.T  # noqa: B018 - a matmul of n-dependent cost, counted while open
            counted += 1
        counter.close()
        return counter

    costs = [4, 16, 8]
    straight = count(0, None, costs)
    first = count(0, None, costs[:1])  # killed after step 0
    resumed = count(1, first, costs)
    assert len(straight.per_step) == len(resumed.per_step) == 2
    assert resumed.per_step == straight.per_step and resumed.flops_per_step == straight.flops_per_step
    past = count(2, straight, costs)
    assert past.per_step == straight.per_step  # nothing recounted beyond the cycle


@pytest.mark.unit
def test_model_flops_leave_out_activation_recompute_and_hardware_flops_include_it():
    def one_step(checkpointing: bool) -> FlopCounter:
        torch.manual_seed(0)
        cfg = DiTConfig(depth=2, hidden_size=32, num_heads=2, input_size=4, in_channels=4, num_classes=5,
                        grad_checkpointing=checkpointing)
        model = LightningDiT(cfg)
        counter = FlopCounter(2)
        x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 5])
        for _ in counter.wrap(iter([0])):
            model(x, t, y).square().mean().backward()
        counter.close()
        return counter

    plain, recomputed = one_step(False), one_step(True)
    assert recomputed.model_flops_per_step == plain.flops_per_step == plain.model_flops_per_step
    assert recomputed.flops_per_step > recomputed.model_flops_per_step  # the blocks' forward ran twice


def _caller_in_package() -> bool:
    frame = sys._getframe(3)  # past count() and the patched method: their caller
    return "dmvae_scale" in frame.f_code.co_filename.replace("\\", "/").split("/")


@pytest.mark.unit
def test_host_reads_per_training_step_are_one_per_backward_from_the_guard(tmp_path, monkeypatch):
    """Counts Tensor.item and Tensor.__bool__ calls over a whole run of the toy stage (the real loop, guard and
    sharded EMA; `float()` of the logged means once per log interval is not counted). The package's own calls:
    today the non-finite guard reads its all-reduced flag once per backward (train/guard.py); a device-side guard
    (issue #22 item 2) would bring this to 0. Every other call is torch AdamW reading its CPU step counter (this
    test's plain engines; no device sync: the counter never lives on the GPU)."""
    calls = {"package_item": 0, "package_bool": 0, "other_item_cpu": 0, "other_bool_cpu": 0, "other_device": 0}
    item, as_bool = torch.Tensor.item, torch.Tensor.__bool__

    def count(self, kind: str) -> None:
        if _caller_in_package():
            calls[f"package_{kind}"] += 1
        elif self.device.type == "cpu" and self.dim() == 0 and not self.requires_grad:
            calls[f"other_{kind}_cpu"] += 1
        else:
            calls["other_device"] += 1

    def counted_item(self):
        count(self, "item")
        return item(self)

    def counted_bool(self):
        count(self, "bool")
        return as_bool(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)
    summary = _toy_run(tmp_path, images=32)
    monkeypatch.undo()
    steps = summary.steps
    backwards = steps + steps // 2  # the student every step, the critic every second one
    assert steps == 4
    assert calls["package_item"] == backwards and calls["package_bool"] == 0, calls
    assert calls["other_item_cpu"] > 0 and calls["other_device"] == 0, calls


@pytest.mark.unit
def test_the_autoencoder_stage_augments_with_its_device_generator(monkeypatch):
    """On a GPU the first generator of step_generators lives on the GPU: DiffAugment then draws there, with no host
    copy. On CPU both generators are one object, so the stage is given two distinct ones here to tell them apart."""
    from pathlib import Path

    from dmvae_scale.config import load_config
    from dmvae_scale.models.discriminator import DiffAugment
    from dmvae_scale.train.stages import AutoencoderStage

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo" / "tokenizer.yaml"
    cfg = load_config(demo, ["loss.gan_start_step=0", "loss.gan_weight=0.5", "discriminator.diffaug=true",
                             "loss.perceptual_weight=0"])
    stage = AutoencoderStage(cfg)
    device_gen, cpu_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    monkeypatch.setattr(stage, "_rng", lambda step, x: (device_gen, cpu_gen))
    seen = []
    forward = DiffAugment.forward

    def spy(self, x, generator):
        seen.append(generator)
        return forward(self, x, generator)

    monkeypatch.setattr(DiffAugment, "forward", spy)
    engines = {n: PlainEngine(s.module, s.optim) for n, s in stage.models().items() if s.trainable}
    size = cfg.data.image_size
    stage.step({"image": torch.rand(2, 3, size, size) * 2 - 1, "label": torch.zeros(2, dtype=torch.long)}, 0,
               engines)
    assert seen and all(g is device_gen for g in seen)
