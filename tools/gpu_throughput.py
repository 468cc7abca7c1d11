#!/usr/bin/env python
"""GPU throughput table: bf16 training steps of LightningDiT-XL/1, XL/2 and XXL/1 on random latents, two attention
paths each, with images/s, MFU and peak memory; JSON under the folder given. Called by tools/gpu_check.

    python tools/gpu_throughput.py --out DIR [--batch 32] [--steps 10] [--models XL/1,XL/2,XXL/1]

Needs torch only (and this checkout on PYTHONPATH, or run from its root): dmvae_scale.models imports no yaml, ray or
deepspeed. No network. flash-attn is optional: when a wheel travels with the checkout (e.g. wheels/flash_attn-*.whl),
install it first with `pip install --no-index --find-links wheels flash-attn`; without it the "flash" path is torch's
own flash SDPA kernel. On a machine without CUDA it prints "no CUDA device" and exits 0.

What a step is: fp32 weights under bf16 autocast (as our engine trains), a flow-matching loss on random 16x16x32
latents, backward, fused AdamW. MFU = analytic training FLOPs per image (models/flops.py, checked against
FlopCounterMode for each row) x images/s / the GPU's dense bf16 peak (models/flops.py's table; MIG slices scaled).
The two paths: "flash" (flash_attn, else SDPA forced to its flash kernel) and "math" (SDPA forced to its math kernel).
The last line printed is the headline: XL/1 flash MFU and its speed-up over the math path.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dmvae_scale, not an installed one

import torch  # noqa: E402

DEFAULT_MODELS = "XL/1,XL/2,XXL/1"


def _attention_setup(path: str):
    """(the model's attention backend, the context that pins SDPA's kernel) for a path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dmvae_scale.models.attention import flash_available
    if path == "flash":
        if flash_available():
            return "flash", contextlib.nullcontext(), "flash_attn"
        return "sdpa", sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "torch SDPA flash kernel"
    return "sdpa", sdpa_kernel([SDPBackend.MATH]), "torch SDPA math kernel"


def _step(model, opt, x, y, gen):
    t = torch.rand(x.shape[0], device=x.device, generator=gen)
    noise = torch.randn(x.shape, device=x.device, generator=gen)
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(x_t, t, y).float(), noise - x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def measure(name: str, path: str, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dmvae_scale.config import DiTConfig
    from dmvae_scale.models.dit import LightningDiT
    from dmvae_scale.models.flops import cuda_peak_bf16_flops, dit_flops, register_attention_flop_formulas
    from dmvae_scale.scaling.estimate import GIB, activation_bytes, model_state_bytes

    size, patch = name.split("/")
    backend, kernel, kernel_name = _attention_setup(path)
    cfg = DiTConfig(size=size, patch_size=int(patch), input_size=16, in_channels=32, attention=backend)
    row = {"model": name, "attention": path, "kernel": kernel_name, "batch": batch}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = opt = None
    try:
        with torch.device(device):
            model = LightningDiT(cfg)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, 32, 16, 16, device=device, generator=gen)
        y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        register_attention_flop_formulas()
        with kernel:
            counter = FlopCounterMode(display=False)
            with counter:
                _step(model, opt, x, y, gen)
            for _ in range(max(warmup - 1, 0)):
                _step(model, opt, x, y, gen)
            torch.cuda.synchronize(device)
            began = time.perf_counter()
            for _ in range(steps):
                loss = _step(model, opt, x, y, gen)
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
        analytic = dit_flops(cfg).train
        rate = batch * steps / seconds
        peak = cuda_peak_bf16_flops(device)
        states = model_state_bytes(params, 0, 1)
        predicted = states.total - states.ema + activation_bytes(cfg, batch)  # no EMA in this loop
        row.update(params=params, images_per_s=rate, step_ms=1e3 * seconds / steps,
                   train_gflops_per_image=analytic / 1e9,
                   counted_gflops_per_image=counter.get_total_flops() / batch / 1e9,
                   achieved_tflops=analytic * rate / 1e12,
                   mfu=None if peak.flops is None else analytic * rate / peak.flops, peak_note=peak.note,
                   peak_memory_gib=torch.cuda.max_memory_allocated(device) / GIB, estimate_memory_gib=predicted / GIB,
                   loss=float(loss.detach()), status="ok")
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="out of memory", error=str(exc).splitlines()[0][:200])
    except Exception as exc:  # noqa: BLE001 - one failing row is reported, the table goes on
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    finally:
        del model, opt
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_throughput.json")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"sizes/patch, comma-separated ({DEFAULT_MODELS})")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, the first one counted (3)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="skip rows once this many seconds passed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for path in ("flash", "math"):
            if time.perf_counter() - began > args.time_limit:
                rows.append({"model": name, "attention": path, "status": "skipped (time limit)"})
                continue
            rows.append(measure(name, path, args.batch, args.steps, args.warmup, device))
            print(json.dumps(rows[-1]), flush=True)
    info = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "seconds": time.perf_counter() - began, "rows": rows}
    (out / "gpu_throughput.json").write_text(json.dumps(info, indent=2))

    print(f"\n{info['device']}, batch {args.batch}, bf16 autocast, fused AdamW")
    print(f"{'model':<7}{'attention':<26}{'img/s':>9}{'ms/step':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}"
          f"{'est GiB':>9}{'GF an/ct':>14}")
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['model']:<7}{r.get('kernel', r['attention']):<26}{r['status']}")
            continue
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{r['model']:<7}{r['kernel']:<26}{r['images_per_s']:>9.1f}{r['step_ms']:>9.1f}"
              f"{r['achieved_tflops']:>9.1f}{mfu:>7}{r['peak_memory_gib']:>10.1f}{r['estimate_memory_gib']:>9.1f}"
              f"{r['train_gflops_per_image']:>7.0f}/{r['counted_gflops_per_image']:<6.0f}")
    ok = {(r["model"], r["attention"]): r for r in rows if r.get("status") == "ok"}
    first = next((r["model"] for r in rows), None)
    flash, math_ = ok.get((first, "flash")), ok.get((first, "math"))
    if flash and math_:
        mfu = "-" if flash["mfu"] is None else f"{flash['mfu']:.1%}"
        print(f"{first} flash: {flash['images_per_s']:.0f} img/s, MFU {mfu}; "
              f"{flash['images_per_s'] / math_['images_per_s']:.2f}x the math path")
    else:
        print("headline: no complete flash/math pair measured")
    print(f"-> {out / 'gpu_throughput.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
