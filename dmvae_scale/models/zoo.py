"""The model table behind `dmvae-scale models`: every LightningDiT size at patch 1 and 2, counted on the meta device,
with its analytic GFLOPs per image (models/flops.py)."""
from __future__ import annotations

from ..config import ConfigError, DiTConfig
from .dit import DIT_SIZES, param_count, resolve_shape
from .flops import dit_flops

PATCH_SIZES = (1, 2)


def model_table(input_size: int = 16, in_channels: int = 32, num_classes: int = 1000) -> list[dict]:
    """One row per (size, patch) that fits the latent grid: shape, token count and parameter count."""
    if input_size <= 0 or in_channels <= 0:
        raise ConfigError(f"input_size/in_channels: need positive values, got {input_size}/{in_channels}")
    rows = []
    for size in DIT_SIZES:
        for patch in PATCH_SIZES:
            if input_size % patch:
                continue  # this grid cannot be cut into patches of this size
            cfg = DiTConfig(size=size, patch_size=patch, input_size=input_size, in_channels=in_channels,
                            num_classes=num_classes)
            shape = resolve_shape(cfg)
            rows.append({"name": f"{size}/{patch}", "size": size, "depth": shape.depth, "width": shape.hidden_size,
                         "heads": shape.num_heads, "head_dim": shape.hidden_size // shape.num_heads, "patch": patch,
                         "tokens": (input_size // patch) ** 2, "params": param_count(cfg),
                         "gflops_forward": dit_flops(cfg).forward / 1e9, "gflops_train": dit_flops(cfg).train / 1e9})
    return rows


def print_model_table(input_size: int = 16, in_channels: int = 32, num_classes: int = 1000) -> None:
    rows = model_table(input_size, in_channels, num_classes)
    header = (f"{'model':<8}{'depth':>6}{'width':>7}{'heads':>6}{'head_dim':>9}{'patch':>6}{'tokens':>7}"
              f"{'params (M)':>12}{'GFLOPs fwd':>12}{'GFLOPs train':>14}")
    print(f"LightningDiT on {input_size}x{input_size}x{in_channels} latents, {num_classes} classes")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<8}{r['depth']:>6}{r['width']:>7}{r['heads']:>6}{r['head_dim']:>9}{r['patch']:>6}"
              f"{r['tokens']:>7}{r['params'] / 1e6:>12.1f}{r['gflops_forward']:>12.1f}{r['gflops_train']:>14.1f}")
    print("GFLOPs per image, matrix products only (as FlopCounterMode counts); train = forward + backward")
    print(f"{len(rows)} models, {rows[0]['params'] / 1e6:.1f}M to {rows[-1]['params'] / 1e6:.1f}M parameters")
