"""Mixed precision that trains: bf16 (CPU autocast, the same weight-cast cache as CUDA autocast) tracks fp32, every
optimiser step changes what the next forward computes, and the flow-matching / DM arithmetic stays float32."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from repo import REPO
from dmvae_scale.config import load_config
from dmvae_scale.errors import UserError
from dmvae_scale.method.dm_loss import dm_loss
from dmvae_scale.method.flow import flow_matching_loss
from dmvae_scale.train.precision import ForwardPrecision

BF16 = ForwardPrecision("bf16", "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# The mechanism: autocast's weight-cast cache lives as long as the outermost region
# ---------------------------------------------------------------------------------------------------------------------

def _three_sgd_steps(per_forward: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 8)
    outputs = []

    def step():
        with (BF16() if per_forward else torch.autocast("cpu", dtype=torch.bfloat16)):
            out = model(x)
        outputs.append(out.detach().float().clone())
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    if per_forward:
        for _ in range(3):
            step()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # one region around the "run" (the old worker)
            for _ in range(3):
                step()
    return outputs


@pytest.mark.unit
def test_a_run_long_region_reuses_the_first_cast_and_per_forward_regions_see_every_step():
    stale = _three_sgd_steps(per_forward=False)
    assert torch.equal(stale[0], stale[1]) and torch.equal(stale[1], stale[2])  # the bug this module guards against
    fresh = _three_sgd_steps(per_forward=True)
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[1], fresh[2])


@pytest.mark.unit
def test_a_forward_region_inside_an_outer_region_is_refused():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="outer autocast region"):
            with BF16():
                pass
    with ForwardPrecision("fp32", "cpu")():  # fp32 opens nothing
        assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# A real stage: its model's output changes after every optimiser step under bf16
# ---------------------------------------------------------------------------------------------------------------------

def _tokenizer_stage(precision: str):
    from plain_engine import PlainEngine
    from dmvae_scale.train.stages import build_stage
    cfg = load_config(REPO / "configs/demo/tokenizer.yaml", ["run_dir=/nonexistent", "loss.gan_start_step=2"])
    torch.manual_seed(0)
    stage = build_stage(cfg)
    stage.set_precision(precision, "cpu")
    engines = {name: PlainEngine(spec.module, spec.optim) for name, spec in stage.models().items() if spec.trainable}
    return cfg, stage, engines


@pytest.mark.unit
def test_tokenizer_stage_output_changes_after_each_bf16_optimizer_step():
    from dmvae_scale.data.builtin import load_fashion_mnist
    cfg, stage, engines = _tokenizer_stage("bf16")
    images, labels = load_fashion_mnist("train")
    x = torch.from_numpy(images[:16]).float().div(127.5).sub(1).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    batch = {"image": x, "label": torch.from_numpy(labels[:16]).long()}
    probe = x[:4]
    tok = engines["tokenizer"]

    def output():
        with torch.no_grad(), stage.autocast():
            return tok(probe)[0].float()

    previous = output()
    for step in range(4):  # steps 2 and 3 run the GAN too (discriminator forward inside the tokenizer's loss)
        stage.step(batch, step, engines)
        now = output()
        assert not torch.equal(now, previous), f"output unchanged after optimiser step {step}"
        previous = now


# ---------------------------------------------------------------------------------------------------------------------
# The driver: a bf16 run tracks the fp32 run (real worker, DeepSpeed engine over gloo, world size 1)
# ---------------------------------------------------------------------------------------------------------------------

def _l1_history(result) -> list[float]:
    return [h["l1"] for h in result.history]


@pytest.mark.integration
def test_bf16_tokenizer_run_tracks_the_fp32_run_over_24_steps(tmp_path, capfd):
    from worker_process import train_in_process
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(REPO / "configs/demo/tokenizer.yaml", [
            f"run_dir={tmp_path / precision}", "batch_size=16", "total_images=384", "log_every_images=16",
            "ckpt_every_images=0", "loss.gan_weight=0", "data.limit=384", "optim.warmup_steps=2", "data.hflip=false",
            f"distributed.precision={precision}"])
        losses[precision] = torch.tensor(train_in_process(cfg, _l1_history, timeout=600))
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert len(fp32) == len(bf16) == 24
    # Training works in both: the l1 falls by more than a third over the run (with the stale-weight bug the bf16 run
    # stayed near its first value while fp32 fell).
    assert fp32[-4:].mean() < 0.66 * fp32[:2].mean() and bf16[-4:].mean() < 0.66 * bf16[:2].mean()
    # ... and bf16 tracks fp32 step by step: mean relative gap under 5% (bf16 rounding only), none above 15%.
    rel = (bf16 - fp32).abs() / fp32
    assert rel.mean() < 0.05 and rel.max() < 0.15, rel
    out = capfd.readouterr().out
    assert "compute paths: precision bf16 autocast per forward (cpu)" in out
    assert "compute paths: precision fp32" in out


# ---------------------------------------------------------------------------------------------------------------------
# fp32 where the method needs it
# ---------------------------------------------------------------------------------------------------------------------

class Spy(nn.Module):
    """A velocity model that records what it is given and answers in bf16, like a DiT under autocast."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.lin(x.movedim(1, -1)).movedim(-1, 1)


@pytest.mark.unit
def test_flow_matching_keeps_latents_noise_and_t_fp32_under_autocast_and_uses_one_t():
    model = Spy()
    z = torch.randn(64, 4, 2, 2).to(torch.bfloat16)  # latents as a bf16 autocast encoder hands them over
    t = 1 - torch.rand(64) * 1e-3  # near t=1, where bf16 has only a handful of values
    x0 = torch.randn(64, 4, 2, 2)
    with BF16():
        loss = flow_matching_loss(model, z, None, t=t, x0=x0)
    x_t, t_seen = model.calls[0]
    assert x_t.dtype == torch.float32 and t_seen.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(t_seen, t)  # the model gets the same t that built x_t ...
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, tb * z.float() + (1 - tb) * x0, rtol=0, atol=1e-6)  # ... an exact fp32 x_t
    assert len(torch.unique(t_seen)) == 64  # 64 distinct t; bf16 would have collapsed them onto a few values


@pytest.mark.unit
def test_dm_loss_computes_in_fp32_under_autocast_and_its_gradient_is_g_over_n():
    torch.manual_seed(0)
    real, fake = Spy(), Spy()
    z = torch.randn(8, 4, 2, 2).to(torch.bfloat16).requires_grad_(True)
    t, noise = torch.rand(8), torch.randn(8, 4, 2, 2)
    with BF16():
        loss, _ = dm_loss(z, torch.zeros(8, dtype=torch.long), real, fake, 3.0, 10, t=t, noise=noise)
    assert loss.dtype == torch.float32
    for model in (real, fake):
        for x_t, t_seen in model.calls:
            assert x_t.dtype == torch.float32 and t_seen.dtype == torch.float32
    loss.backward()
    # Reference in float64 from the same bf16 score outputs (the spies ignore labels, so CFG gives v_c):
    # g = (x_fake - x_real) / W and the gradient reaching z is g / N.
    tb = t.view(-1, 1, 1, 1)
    x_t = tb * z.detach().float() + (1 - tb) * noise
    with torch.no_grad(), BF16():
        v_real, v_fake = real(x_t, t, None).double(), fake(x_t, t, None).double()
    x_real = x_t.double() + (1 - tb.double()) * v_real
    x_fake = x_t.double() + (1 - tb.double()) * v_fake
    weight = (z.detach().double() - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    want = (x_fake - x_real) / weight / z.numel()
    torch.testing.assert_close(z.grad.double(), want.to(torch.bfloat16).double(), rtol=2e-2, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# GPU selection that cannot pick a path the hardware cannot run (checked on CPU where no GPU is needed)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_flash_attention_is_never_chosen_for_head_dims_it_cannot_run():
    from dmvae_scale.models.attention import flash_unfit_reason
    cuda = torch.device("cuda", 0)
    assert "multiple of 8 and at most 256" in flash_unfit_reason(cuda, torch.bfloat16, 20)
    assert "multiple of 8 and at most 256" in flash_unfit_reason(cuda, torch.bfloat16, 264)
    assert "bf16/fp16" in flash_unfit_reason(cuda, torch.float32, 64)
    assert "CUDA" in flash_unfit_reason(torch.device("cpu"), torch.bfloat16, 64)


@pytest.mark.unit
def test_auto_precision_is_fp32_without_native_bf16_and_the_process_group_timeout_is_a_config_key(capsys):
    from dmvae_scale.cli import main
    from dmvae_scale.models.hardware import inference_precision, native_bf16
    from dmvae_scale.train.deepspeed_engine import resolve_precision
    cpu = torch.device("cpu")
    assert not native_bf16(cpu) and resolve_precision("auto", cpu) == "fp32"
    assert inference_precision(cpu)[0] == "fp32"
    assert load_config(None, ["distributed.timeout_s=7200"]).distributed.timeout_s == 7200
    assert main(["config", "show", str(REPO / "configs/demo/tokenizer.yaml"), "distributed.timeout_s=0"]) == 2
    assert "distributed.timeout_s: must be a positive number of seconds, got 0" in capsys.readouterr().err


@pytest.mark.unit
def test_sampling_gpus_come_from_the_cluster_and_a_gpu_request_without_gpus_is_refused():
    from dmvae_scale.eval.sample_run import gpus_for_workers
    assert gpus_for_workers(None, cluster_gpus=8) == 1.0  # a CPU laptop submitting to a GPU cluster gets GPU actors
    assert gpus_for_workers(None, cluster_gpus=0) == 0.0
    assert gpus_for_workers(0.5, cluster_gpus=1) == 0.5
    with pytest.raises(UserError, match=r"--gpus-per-worker 1: the Ray cluster has 0 GPUs"):
        gpus_for_workers(1, cluster_gpus=0)


# ---------------------------------------------------------------------------------------------------------------------
# The GPU check runs on a machine that has torch and nothing else
# ---------------------------------------------------------------------------------------------------------------------

TORCH_ONLY = """
import importlib.abc, sys
STACK = {"yaml", "ray", "deepspeed", "streaming", "pytest", "s3fs", "boto3", "moto", "safetensors", "tqdm", "PIL",
         "scipy", "sklearn", "torchvision", "flash_attn", "apex", "tensorboard", "dmvae_scale_installed"}
class TorchOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STACK:
            raise ModuleNotFoundError(f"No module named {name!r} (torch-only machine)")
sys.meta_path.insert(0, TorchOnly())
"""


@pytest.mark.unit
def test_gpu_check_on_a_torch_only_machine_without_cuda_says_so_instead_of_crashing(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(TORCH_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)  # the checkout is found by the script itself, not by an install
    out = subprocess.run([sys.executable, str(REPO / "tools/gpu_check.py"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "no CUDA device" in text and "Traceback" not in text
    assert "pytest: not installed" in text  # it looked for the optional pieces and named what is missing
    assert (tmp_path / "out" / "gpu_check.json").is_file()
