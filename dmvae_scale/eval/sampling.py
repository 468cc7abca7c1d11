"""Sampling at scale, resumable: what `dmvae-scale sample` writes and how a re-run finishes only what is missing.

Output directory
    sampling.json      the settings (sampler, steps, time shift, CFG scale and interval, seed, batch size, counts,
                       generator id); written first; a re-run with other settings is refused, naming the key
    images/NNNNNN.png  one PNG per sample index, written atomically (tmp + rename), so a file that exists is whole
    samples.npz        ADM layout: arr_0 uint8 N x H x W x 3, arr_1 labels; written last, from the PNGs
    grid.png           the first 64 samples
Determinism: sample i has label i % num_classes (balanced, 50 per class by default) and initial noise drawn from a
generator seeded by (seed, i). Work is split into fixed batches of `batch_size` consecutive indices; the SDE sampler's
per-step noise comes from a generator seeded by (seed, batch index). So a batch always holds the same samples whichever
worker runs it and whenever, and a resumed run writes exactly the images the uninterrupted run would have (on the same
device type; GPU and CPU round differently).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from dmvae_scale.artifacts import LatentSpec
from dmvae_scale.errors import UserError
from dmvae_scale.method.flow import SamplerSettings, sample
from dmvae_scale.models.hardware import inference_precision

from .images import to_uint8_nhwc
from .sources import SAMPLES_FILE, SAMPLING_SETTINGS_FILE

IMAGES_DIR = "images"
LABEL_SAMPLING = "balanced: sample i has label i % num_classes"  # SamplingPlan.labels, as sampling.json says it


@dataclass
class SamplingPlan:
    """Everything that decides which images come out; recorded in sampling.json and checked on resume."""

    num_samples: int
    num_classes: int
    batch_size: int
    seed: int
    method: str
    steps: int
    cfg_scale: float
    guidance_interval: Optional[list[float]]
    generator: str  # generator artifact id
    weights: str  # "ema" or "raw"
    time_shift: float = 1.0  # ode_* samplers only

    def __post_init__(self):
        if self.num_samples < 1 or self.batch_size < 1:
            raise UserError(f"sample: need num_samples >= 1 and batch_size >= 1, got {self.num_samples}, "
                            f"{self.batch_size}")

    @property
    def sampler(self) -> SamplerSettings:
        interval = tuple(self.guidance_interval) if self.guidance_interval else None
        return SamplerSettings(self.method, self.steps, self.cfg_scale, interval, time_shift=self.time_shift)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_indices(self, batch: int) -> list[int]:
        return list(range(batch * self.batch_size, min(self.num_samples, (batch + 1) * self.batch_size)))

    def labels(self, indices: Sequence[int]) -> np.ndarray:
        return np.asarray(indices, dtype=np.int64) % self.num_classes


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (distinct tuples -> unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def initial_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """Sample `index`'s starting noise: a function of (seed, index) only."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_seed(seed, 0, index)))


class LatentImageSampler:
    """velocity model + latent normalisation + decoder -> uint8 images for given sample indices."""

    def __init__(self, velocity: Callable, decode: Callable[[torch.Tensor], torch.Tensor], latent: LatentSpec,
                 plan: SamplingPlan, null_label: Optional[int], device: torch.device | str = "cpu"):
        self.velocity, self.decode, self.latent = velocity, decode, latent
        self.plan, self.null_label, self.device = plan, null_label, torch.device(device)
        self.shape = (latent.channels, latent.height, latent.width)
        self.precision, self._autocast = inference_precision(self.device)

    @torch.no_grad()
    def batch(self, batch: int) -> tuple[list[int], np.ndarray]:
        """(indices, uint8 N x H x W x 3 images) of one fixed batch of the plan."""
        indices = self.plan.batch_indices(batch)
        noise = torch.stack([initial_noise(self.plan.seed, i, self.shape) for i in indices]).to(self.device)
        y = torch.from_numpy(self.plan.labels(indices)).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(_seed(self.plan.seed, 1, batch))
        with self._autocast:  # bf16 matmuls where native; the sampler's state and arithmetic stay float32
            z = sample(self.velocity, noise, y, self.plan.sampler, self.null_label, generator=g)
            x = self.decode(self.latent.denormalize(z)).float().clamp(-1.0, 1.0)
        return indices, to_uint8_nhwc(x, value_range=(-1, 1))


# ----------------------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------------------

def png_path(out_dir: Path, index: int) -> Path:
    return out_dir / IMAGES_DIR / f"{index:06d}.png"


def prepare_output(out_dir: str | Path, plan: SamplingPlan, extra: dict) -> Path:
    """Create OUT with sampling.json, or check that an existing one describes the same plan."""
    out_dir = Path(out_dir)
    settings_file = out_dir / SAMPLING_SETTINGS_FILE
    wanted = asdict(plan)
    if settings_file.is_file():
        recorded = json.loads(settings_file.read_text())
        for key, value in wanted.items():
            if recorded.get(key) != value:
                raise UserError(f"{out_dir} holds samples made with {key}={recorded.get(key)!r}, this run asks for "
                                f"{key}={value!r}; use another output directory or the same settings")
    else:
        (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        tmp = settings_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**wanted, **extra}, indent=2))
        tmp.replace(settings_file)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    return out_dir


def record_precision(out_dir: str | Path, used: set[str]) -> None:
    """Add the arithmetic the samplers ran in ("bf16", "tf32", "fp32": models/hardware.inference_precision) to
    sampling.json, joined with what an earlier, interrupted run recorded (an FID's protocol names it)."""
    settings_file = Path(out_dir) / SAMPLING_SETTINGS_FILE
    recorded = json.loads(settings_file.read_text())
    before = set(filter(None, str(recorded.get("precision") or "").split("+")))
    if not used or before | used == before:
        return
    recorded["precision"] = "+".join(sorted(before | used))
    tmp = settings_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(recorded, indent=2))
    tmp.replace(settings_file)


def pending_batches(out_dir: Path, plan: SamplingPlan) -> list[int]:
    """Batches with at least one sample whose PNG is missing."""
    return [b for b in range(plan.num_batches)
            if not all(png_path(out_dir, i).is_file() for i in plan.batch_indices(b))]


def write_pngs(out_dir: Path, indices: Sequence[int], images: np.ndarray) -> int:
    """Write the PNGs that are missing; returns how many were written."""
    written = 0
    for index, image in zip(indices, images):
        path = png_path(out_dir, index)
        if path.is_file():
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)
        written += 1
    return written


def assemble_npz(out_dir: Path, plan: SamplingPlan) -> Path:
    """samples.npz (arr_0 uint8 NHWC, arr_1 labels) from all PNGs in index order; refuses if any is missing.

    Streamed image by image into the zip member, so 50k samples at 256 px (9.8 GB) never sit in memory at once.
    """
    missing = [i for i in range(plan.num_samples) if not png_path(out_dir, i).is_file()]
    if missing:
        raise UserError(f"{out_dir}: {len(missing)} samples missing (first: {missing[0]}); re-run `sample` to finish")
    first = np.asarray(Image.open(png_path(out_dir, 0)).convert("RGB"))
    out = out_dir / SAMPLES_FILE
    tmp = out_dir / (SAMPLES_FILE + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (plan.num_samples, *first.shape)}
            np.lib.format.write_array_header_2_0(f, header)
            for i in range(plan.num_samples):
                image = np.asarray(Image.open(png_path(out_dir, i)).convert("RGB"))
                if image.shape != first.shape:
                    raise UserError(f"{png_path(out_dir, i)}: {image.shape}, sample 0 is {first.shape}")
                f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, plan.labels(range(plan.num_samples)))
    tmp.replace(out)
    return out
