"""What `dmvae-scale eval ...` runs: plain functions with keyword arguments (cli.py only parses and delegates)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dmvae_scale.errors import UserError

from .evaluate import EvalOptions, check_count, compute_reference, evaluate_reconstructions, evaluate_samples
from .features import default_device
from .inception import INCEPTION_NAME, POOL_DIM, load_inception
from .sources import open_image_set
from .stats import check_comparable, load_stats


def _device(device: Optional[str]) -> torch.device:
    if device is None:
        return default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    return torch.device(device)


def _dinov2(weights: Optional[str], arch: str, device: torch.device):
    if weights is None:
        return None
    from .dinov2 import load_dinov2
    return load_dinov2(weights, arch, device)


def dinov2_stats_path(out: str | Path) -> Path:
    """Where `eval ref --dinov2` puts the DINOv2 statistics beside the Inception ones."""
    out = Path(out)
    return out.with_name(out.stem + "-dinov2.npz")


def eval_ref(source: str, out: str, split: str = "train", image_size: Optional[int] = None,
             limit: Optional[int] = None, inception: Optional[str] = None, dinov2: Optional[str] = None,
             dinov2_arch: str = "vit_l", device: Optional[str] = None, opts: EvalOptions = EvalOptions()) -> None:
    dev = _device(device)
    images = open_image_set(source, split, image_size, limit)
    compute_reference(images, load_inception(inception, dev), out, opts)
    net = _dinov2(dinov2, dinov2_arch, dev)
    if net is not None:
        compute_reference(images, net, dinov2_stats_path(out), opts)


def eval_samples(samples: str, ref: str, out: str, limit: Optional[int] = None, inception: Optional[str] = None,
                 dinov2: Optional[str] = None, dinov2_arch: str = "vit_l", dinov2_ref: Optional[str] = None,
                 device: Optional[str] = None, opts: EvalOptions = EvalOptions()) -> dict:
    dev = _device(device)
    reference = load_stats(ref)
    images = open_image_set(samples, limit=limit)
    # What can be refused without the network (its name and size are fixed) is refused before loading it.
    check_comparable(reference, INCEPTION_NAME, None, POOL_DIM)
    check_count(images.total, POOL_DIM, INCEPTION_NAME, opts)
    dnet = _dinov2(dinov2, dinov2_arch, dev)
    dref = load_stats(dinov2_ref) if dinov2_ref is not None else None
    return evaluate_samples(images, reference, load_inception(inception, dev), out, opts, dnet, dref)


def eval_tokenizer(tokenizer: str, source: str, out: str, split: str = "test", limit: Optional[int] = None,
                   weights: str = "ema", inception: Optional[str] = None, device: Optional[str] = None,
                   opts: EvalOptions = EvalOptions(), reference: Optional[str] = None,
                   reference_image_size: Optional[int] = None) -> dict:
    """rFID / PSNR / SSIM of a tokenizer artifact's reconstructions of a validation split. `reference`: a statistics
    file of those very images (brought to `reference_image_size`, which must be the tokenizer's), used instead of
    computing the originals' features again."""
    from dmvae_scale.data.artifact_store import open_tokenizer

    dev = _device(device)
    tok, artifact = open_tokenizer(tokenizer, weights)
    info, cfg = artifact.info, artifact.config()
    tok = tok.to(dev)
    size, channels = cfg.tokenizer.image_size, cfg.tokenizer.in_channels
    if reference is not None and reference_image_size != size:
        raise UserError(f"reference statistics {reference} are of images at {reference_image_size} px, the tokenizer "
                        f"{tokenizer} reconstructs {size} px images: compute them at image_size {size}")
    images = open_image_set(source, split, size, limit)

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        inp = x.to(dev).float().div(127.5).sub(1.0)
        if channels == 1:
            inp = inp[:, :1]
        return tok.decode(tok.encode(inp)).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()

    settings = {"tokenizer": f"{tokenizer} ({info.id}, {weights} weights)", "image_size": size}
    return evaluate_reconstructions(images, reconstruct, load_inception(inception, dev), out, opts,
                                    settings=settings, reference=None if reference is None else load_stats(reference))
