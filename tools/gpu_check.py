#!/usr/bin/env python3
"""GPU checks that run on a bare GPU machine: torch is all they need.

    python3 tools/gpu_check.py [--out DIR] [--steps N] [--no-pytest] [--no-throughput]

Checks, in order (each prints PASS / FAIL / SKIP with its numbers; all go to DIR/gpu_check.json):
  device       the GPU, compute capability, native bf16, whether flash-attn and NVIDIA apex really load, and the
               compute paths a worker would choose (precision, attention kernel for DiT-XL's head dim, RMSNorm)
  bf16_train   a small DiT trained by flow matching with one autocast region per forward (what the stages do) tracks
               the same run in fp32, and its output changes after every optimiser step; a run-long region (the old
               bug) is run too and reported
  attention    flash-attn (or torch's flash SDPA kernel where flash-attn is absent) against SDPA math, forward and
               backward, on the DiT's own strided q/k/v
  rms_norm     apex's fused RMSNorm against an fp32 reference, with a relative bf16 tolerance (apex rounds twice)
  dit_bf16     a DiT forward under bf16 autocast against float32 math attention
  sampling     the sampler's inference precision on this device (bf16 where native, else TF32)
  throughput   tools/gpu_throughput.py (DiT training images/s, MFU, peak memory) when present
  pytest       `pytest -m gpu` when pytest imports (test modules whose stack is missing skip cleanly)

What it needs: torch. The repository is found from this file's path (no install). flash-attn, apex, pytest and
pyyaml are used when they import. The lent GPU machines have Python 3.12 and torch only; to bring pytest along:
    bash tools/gpu_wheels.sh                 # here: Python 3.12 manylinux wheels into .whl/ (ignored by git)
    # there, with .whl carried with the checkout:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site python3 tools/gpu_check.py --out "$OUT"
Exit status: 0 when every check that ran passed, or when there is no CUDA device (nothing to check: said so);
1 when a check failed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (the one hard requirement)

RESULTS: list[dict] = []


def report(name: str, status: str, detail: str = "", **numbers) -> None:
    RESULTS.append({"check": name, "status": status, "detail": detail, **numbers})
    extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"[{status}] {name}: {detail}{' (' + extra + ')' if extra else ''}", flush=True)


def optional(module: str) -> str | None:
    """Version (or 'present') of an optional module, or None when it does not import."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "present"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------

def check_device(dev: torch.device) -> dict:
    from dmvae_scale.models.attention import flash_available, select_backend_for
    from dmvae_scale.models.hardware import native_bf16
    from dmvae_scale.models.layers import fused_rms_norm_available
    from dmvae_scale.train.precision import compute_paths
    props = torch.cuda.get_device_properties(dev)
    info = {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "native_bf16": native_bf16(dev),
            "flash_attn": optional("flash_attn"), "flash_usable": flash_available(),
            "apex_fused_rms_norm": fused_rms_norm_available()}
    precision = "bf16" if info["native_bf16"] else "fp32"
    paths = compute_paths(dev, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    paths["attention (head_dim 72, DiT-XL)"] = select_backend_for(dev, dtype, 72)
    paths["attention (head_dim 128, 1.5B/3B)"] = select_backend_for(dev, dtype, 128)
    info["paths"] = paths
    report("device", "PASS", f"{props.name} sm_{props.major}{props.minor}, {info['memory_gib']} GiB; " +
           "; ".join(f"{k}: {v}" for k, v in paths.items()))
    return info


def _tiny_dit(dev: torch.device, attention: str = "auto"):
    from dmvae_scale.config import DiTConfig
    from dmvae_scale.models.dit import LightningDiT
    cfg = DiTConfig(depth=4, hidden_size=384, num_heads=6, input_size=8, in_channels=16, num_classes=10,
                    attention=attention)
    return LightningDiT(cfg).to(dev)


def _train(dev: torch.device, precision: str, steps: int, run_long_region: bool = False):
    """(losses, did the probe output change after every step) for a seeded tiny DiT on fixed structured latents."""
    import contextlib

    from dmvae_scale.method.flow import flow_matching_loss
    from dmvae_scale.train.precision import ForwardPrecision
    torch.manual_seed(0)
    model = _tiny_dit(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    g = torch.Generator(device="cpu").manual_seed(1)
    basis = torch.randn(4, 16 * 8 * 8, generator=g)
    data = (torch.randn(512, 4, generator=g) @ basis).view(512, 16, 8, 8).to(dev)  # low-rank "latents"
    labels = torch.randint(0, 10, (512,), generator=g).to(dev)
    probe_x, probe_t, probe_y = data[:8], torch.full((8,), 0.5, device=dev), labels[:8]
    autocast = ForwardPrecision(precision, "cuda")
    outer = torch.autocast("cuda", dtype=torch.bfloat16) if run_long_region else contextlib.nullcontext()
    losses, changed = [], []
    previous = None
    with outer:
        for step in range(steps):
            idx = torch.randint(0, 512, (64,), generator=g).to(dev)
            gen = torch.Generator(device=dev).manual_seed(step)
            region = contextlib.nullcontext() if run_long_region else autocast()
            with region:
                loss = flow_matching_loss(model, data[idx], labels[idx], gen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            with torch.no_grad(), (contextlib.nullcontext() if run_long_region else autocast()):
                out = model(probe_x, probe_t, probe_y).float()
            if previous is not None:
                changed.append(not torch.equal(out, previous))
            previous = out
    return losses, all(changed)


def check_bf16_training(dev: torch.device, steps: int) -> None:
    fp32, _ = _train(dev, "fp32", steps)
    bf16, moved = _train(dev, "bf16", steps)
    gaps = [abs(a - b) / max(b, 1e-12) for a, b in zip(bf16, fp32)]
    mean_gap = sum(gaps) / len(gaps)
    fell = sum(fp32[-5:]) / 5 < 0.8 * sum(fp32[:2]) / 2
    ok = moved and mean_gap < 0.05 and fell
    report("bf16_train", "PASS" if ok else "FAIL",
           f"{steps} steps: bf16 loss within {mean_gap:.2%} of fp32 on average, output changed after every step: "
           f"{moved}, fp32 loss fell: {fell}", first_fp32=fp32[0], last_fp32=fp32[-1], last_bf16=bf16[-1],
           mean_rel_gap=mean_gap)
    stale, moved_stale = _train(dev, "bf16", min(steps, 6), run_long_region=True)
    report("bf16_run_long_region", "PASS",
           f"for contrast, one region around the run: output changed after every step: {moved_stale} "
           f"(False = the stale-weight bug that per-forward regions avoid)")


def check_attention(dev: torch.device) -> None:
    """flash vs SDPA math on q/k/v laid out exactly as the DiT makes them (views of one qkv projection)."""
    import torch.nn.functional as F

    from dmvae_scale.models.attention import attention, flash_available
    torch.manual_seed(0)
    batch, tokens, heads, head_dim = 4, 256, 16, 72  # DiT-XL: 1152 = 16 x 72
    qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim).to(dev)
    x = torch.randn(batch, tokens, heads * head_dim, device=dev)

    def run(kind: str):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = qkv(xi).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # strided views
            if kind == "flash":
                out = attention(q, k, v, "flash")
            elif kind == "sdpa_flash_kernel":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(q, k, v)
            else:
                out = attention(q.float(), k.float(), v.float(), "math")
        out.float().square().mean().backward()
        return out.float().detach(), xi.grad.detach()

    kind = "flash" if flash_available() else "sdpa_flash_kernel"
    fast, ref = run(kind), run("math")
    fwd, bwd = rel(fast[0], ref[0]), rel(fast[1], ref[1])
    ok = fwd < 2e-2 and bwd < 5e-2
    report("attention", "PASS" if ok else "FAIL",
           f"{kind} vs float32 math on the DiT's strided q/k/v (head_dim {head_dim}), forward and backward"
           f"{'' if kind == 'flash' else ' (flash-attn not installed: torch flash kernel instead)'}",
           forward_rel=fwd, backward_rel=bwd)


def check_rms_norm(dev: torch.device) -> None:
    import torch.nn.functional as F

    from dmvae_scale.models.layers import fused_rms_norm_available, rms_norm
    if not fused_rms_norm_available():
        report("rms_norm", "SKIP", "NVIDIA apex with a loadable fused_layer_norm_cuda is not installed here")
        return
    g = torch.Generator(device=dev).manual_seed(0)
    x = 4 + 4 * torch.rand(4, 256, 1152, device=dev, generator=g)  # values of 4 to 8: where absolute 2e-2 failed
    w = 1 + 0.1 * torch.randn(1152, device=dev, generator=g)
    want = F.rms_norm(x, (1152,), w, 1e-6)  # fp32 reference
    got = rms_norm(x.bfloat16(), w.bfloat16(), 1e-6)
    err = float(((got.float() - want).abs() / want.abs().clamp_min(1e-3)).max())
    report("rms_norm", "PASS" if err < 2 ** -6 else "FAIL", "apex fused RMSNorm in bf16 vs fp32 reference",
           max_rel=err)


def check_dit_bf16(dev: torch.device) -> None:
    import dataclasses

    from dmvae_scale.models.dit import LightningDiT
    torch.manual_seed(0)
    fast = _tiny_dit(dev)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0.0, 0.05)
    slow = LightningDiT(dataclasses.replace(fast.cfg, attention="math")).to(dev)
    slow.load_state_dict(fast.state_dict())
    x, t, y = torch.randn(8, 16, 8, 8, device=dev), torch.rand(8, device=dev), torch.arange(8, device=dev)
    with torch.no_grad():
        want = slow(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(x, t, y)
    err = rel(got, want)
    report("dit_bf16", "PASS" if err < 3e-2 else "FAIL", "DiT forward, bf16 autocast vs float32 math", rel_l2=err)


def check_sampling(dev: torch.device) -> None:
    from dmvae_scale.models.hardware import inference_precision, native_bf16
    name, _ = inference_precision(dev)
    want = "bf16" if native_bf16(dev) else "tf32"
    report("sampling", "PASS" if name == want else "FAIL", f"sampling runs in {name} on this device")


def run_throughput(out: Path) -> None:
    script = REPO / "tools" / "gpu_throughput.py"
    if not script.is_file():
        report("throughput", "SKIP", "tools/gpu_throughput.py is not in this checkout")
        return
    proc = subprocess.run([sys.executable, str(script), "--out", str(out)], text=True)
    report("throughput", "PASS" if proc.returncode == 0 else "FAIL", f"{script.name} exited {proc.returncode}")


def run_pytest(out: Path) -> None:
    if optional("pytest") is None:
        report("pytest", "SKIP", "pytest: not installed (bring it with tools/gpu_wheels.sh)")
        return
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={out / 'pytest_gpu.xml'}"]
    proc = subprocess.run(cmd, cwd=REPO, text=True, env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep +
                                                           os.environ.get("PYTHONPATH", "")})
    report("pytest", "PASS" if proc.returncode in (0, 5) else "FAIL", f"pytest -m gpu exited {proc.returncode}")


# ----------------------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json (and the throughput JSON)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of the bf16-vs-fp32 check")
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--no-throughput", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), Python {sys.version.split()[0]}; "
          f"optional: flash_attn {optional('flash_attn') or 'not installed'}, "
          f"yaml {optional('yaml') or 'not installed'}", flush=True)
    print(f"pytest: {'installed' if optional('pytest') else 'not installed'}", flush=True)
    summary = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "checks": RESULTS}
    if not torch.cuda.is_available():  # the first GPU decision
        print(f"no CUDA device: torch sees no GPU here (CUDA build {torch.version.cuda}); nothing to check",
              flush=True)
        summary["device"] = None
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        return 0
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    summary["device"] = check_device(dev)
    for check in (lambda: check_bf16_training(dev, args.steps), lambda: check_attention(dev),
                  lambda: check_rms_norm(dev), lambda: check_dit_bf16(dev), lambda: check_sampling(dev)):
        try:
            check()
        except Exception as exc:  # one broken check must not hide the others
            report(getattr(check, "__name__", "check"), "FAIL", f"{type(exc).__name__}: {exc}")
    if not args.no_throughput:
        run_throughput(out)
    if not args.no_pytest:
        run_pytest(out)
    failed = [r["check"] for r in RESULTS if r["status"] == "FAIL"]
    summary["seconds"] = round(time.perf_counter() - began, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(f"gpu_check: {len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed or skipped"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''} in {summary['seconds']} s -> {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
