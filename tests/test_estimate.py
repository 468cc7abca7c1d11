"""`dmvae-scale estimate`: model-state bytes against DeepSpeed's estimators, activations against a real CPU step,
time and cost arithmetic, and the one-command answer for the paper's generator."""
import dataclasses
import json

import pytest
import torch

from dmvae_scale.cli import main as cli_main
from dmvae_scale.config import DiTConfig, load_config
from dmvae_scale.models.dit import LightningDiT, param_count
from dmvae_scale.models.flops import dit_flops
from dmvae_scale.scaling.estimate import (GIB, IMAGENET_TRAIN_IMAGES, activation_bytes, deepspeed_mixed_state_bytes,
                                          estimate, estimate_run, largest_layer_params, model_state_bytes)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("size", ["S", "XL", "3B"])
@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 8)])
def test_mixed_layout_equals_deepspeed_estimators(size, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    cfg = DiTConfig(size=size)
    params, layer, world = param_count(cfg), largest_layer_params(cfg), gpus_per_node * nodes
    _, ds_zero2 = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)
    _, ds_zero3, _ = estimate_zero3_model_states_mem_needs(params, layer, gpus_per_node, nodes, cpu_offload=False)
    assert deepspeed_mixed_state_bytes(params, 2, world) == ds_zero2
    assert deepspeed_mixed_state_bytes(params, 3, world, layer) == ds_zero3


def test_our_model_states_per_stage():
    """fp32 weights, grads, AdamW moments: 16 bytes/param replicated at ZeRO-0; each stage partitions one more part."""
    p, n = 1_000_000, 8
    z0, z1, z2, z3 = (model_state_bytes(p, s, n, largest_layer=1000) for s in range(4))
    assert z0.params + z0.grads + z0.optimizer == 16 * p
    assert z1.optimizer == pytest.approx(12 * p / n) and z1.grads == 4 * p  # moments + DeepSpeed's fp32 partition
    assert z2.grads == pytest.approx(4 * p / n) and z2.params == 4 * p
    assert z3.params == pytest.approx(4 * p / n)
    assert z0.ema == z3.ema == pytest.approx(4 * p / n)
    assert z0.total > z1.total > z2.total - z2.buffers + z1.buffers > z3.total


def _saved_bytes_real_cpu_step(cfg: DiTConfig, batch: int) -> int:
    """Bytes autograd keeps after a real bf16-autocast forward on CPU (fp32 weights), counted per storage."""
    torch.manual_seed(0)
    model = LightningDiT(cfg)
    x, t = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(batch)
    y = torch.zeros(batch, dtype=torch.long)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, y)
    return sum(saved.values())


def test_activations_match_a_real_autocast_step():
    """Meta-device activations plus autocast's bf16 weight copies (counted under buffers) = what a real bf16
    autocast step on CPU saves, within 1%."""
    cfg = DiTConfig(depth=3, hidden_size=128, num_heads=4, input_size=8, in_channels=4, num_classes=10,
                    attention="sdpa")
    predicted = activation_bytes(cfg, 4) + 2 * param_count(cfg)
    assert predicted == pytest.approx(_saved_bytes_real_cpu_step(cfg, 4), rel=0.01)
    assert activation_bytes(cfg, 8) == pytest.approx(2 * activation_bytes(cfg, 4), rel=0.01)  # linear in batch


def test_checkpointing_keeps_block_inputs_and_one_block():
    cfg = DiTConfig(depth=6, hidden_size=128, num_heads=4, input_size=8, in_channels=4, num_classes=10)
    full = activation_bytes(cfg, 4)
    ckpt = activation_bytes(dataclasses.replace(cfg, grad_checkpointing=True), 4)
    block_inputs = 6 * 4 * 64 * 128 * 2
    assert block_inputs < ckpt < full / 2


def test_time_and_cost_arithmetic():
    cfg = DiTConfig(size="B", patch_size=2)
    e = estimate(cfg, zero_stage=2, micro_batch=32, num_gpus=8, gpu="NVIDIA H100 80GB HBM3", mfu=0.5,
                 total_images=1_000_000)
    assert e.gpu == "H100" and e.global_batch == 256
    assert e.compute_s == pytest.approx(256 * dit_flops(cfg).train / (8 * 989.4e12 * 0.5))
    assert e.step_s == pytest.approx(e.compute_s + e.comm_s) and e.comm_s > 0  # ZeRO-2 does not overlap
    assert e.images_per_s == pytest.approx(256 / e.step_s)
    assert e.gpu_hours == pytest.approx(1_000_000 / e.images_per_s * 8 / 3600)


def test_paper_generator_on_64_h200_in_one_command(capsys):
    assert cli_main(["estimate", "configs/imagenet256/generator.yaml", "--epochs", "800", "--gpus", "64",
                     "--gpu", "H200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 64 and out["micro_batch"] == 16 and out["total_images"] == 800 * IMAGENET_TRAIN_IMAGES
    assert out["gpu_hours"] == pytest.approx(out["wall_hours"] * 64)
    run = estimate_run(load_config("configs/imagenet256/generator.yaml"), num_gpus=64, epochs=800)
    assert out["gpu_hours"] == pytest.approx(run.gpu_hours)
    assert 0 < out["mem_total_gib"] < 141


def test_xl1_zero2_batch256_on_8_h200_prints_memory_and_time(capsys):
    assert cli_main(["estimate", "--size", "XL", "--patch", "1", "--zero", "2", "--batch", "256", "--gpus", "8",
                     "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 32" in out and "activations (micro-batch 32)" in out and "ms per step" in out
    assert "DeepSpeed's estimator" in out


def test_bad_inputs_name_the_flag(capsys):
    assert cli_main(["estimate", "--gpu", "K80"]) == 2
    assert "'K80' is not in the peak table" in capsys.readouterr().err
    assert cli_main(["estimate", "--batch", "100", "--gpus", "8"]) == 2
    assert "--batch 100 does not split over 8 GPUs" in capsys.readouterr().err
    assert cli_main(["estimate", "configs/demo/tokenizer.yaml"]) == 2
    assert "DiT stages" in capsys.readouterr().err
    e = estimate(DiTConfig(size="S"), zero_stage=2, micro_batch=1, num_gpus=1, gpu="H200", mfu=0.4)
    assert e.memory_per_gpu / GIB < 2
