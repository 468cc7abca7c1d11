"""What a run reports: metrics sinks (metrics.jsonl, TensorBoard, W&B), achieved FLOP/s and MFU, and the loop hook
that feeds them at each log interval (rank 0 writes; every rank keeps the history)."""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterator, Optional

import torch

from ..log import duration_text, say
from ..batch_keys import FEATURES_KEY
from ..config import RunConfig, config_hash, to_dict
from ..data import storage
from ..errors import UserError
from ..private_cache import local_files
from .loop import LoopHook


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("WANDB_PROJECT is set but wandb is not installed; pip install wandb or unset "
                        "WANDB_PROJECT") from None
    return wandb


class MetricSinks:
    """metrics.jsonl and TensorBoard events under the run directory; W&B when WANDB_PROJECT is set.

    An object-store run directory is written through a local copy that starts from the run's own files, so a resume
    on another machine (or after the cache was cleared) appends to metrics.jsonl instead of replacing it."""

    def __init__(self, cfg: RunConfig, cache_dir: str, wandb_project: Optional[str] = None):
        self.cfg = cfg
        self.remote = storage.is_remote(cfg.run_dir)
        self.local_dir = os.path.join(cache_dir, "logs") if self.remote else cfg.run_dir
        os.makedirs(self.local_dir, exist_ok=True)
        self.jsonl = os.path.join(self.local_dir, "metrics.jsonl")
        if self.remote:
            remote_jsonl = storage.join(cfg.run_dir, "metrics.jsonl")
            if storage.exists(remote_jsonl):
                with open(self.jsonl, "wb") as f:
                    f.write(storage.read_bytes(remote_jsonl))
            elif os.path.exists(self.jsonl):
                os.remove(self.jsonl)  # a stale copy of another run of this directory
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"))
        self.wandb = None
        if wandb_project:
            wandb = import_wandb()
            self.wandb = wandb.init(project=wandb_project, name=cfg.name, resume="allow",
                                    id=f"{cfg.name}-{config_hash(cfg)}", config=to_dict(cfg))

    def write(self, images: int, metrics: dict[str, float]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"images": images, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, images)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=images)
        if self.remote:  # small files: copy the whole logs directory up at each interval
            fs, root = storage.filesystem(self.cfg.run_dir)
            for src, rel in local_files(self.local_dir, f"log upload {self.cfg.run_dir}"):  # never a symlink
                fs.put_file(src, f"{root.rstrip('/')}/{rel}")

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of this worker's GPU (models/flops.py's table: PCIe / NVL told from SXM, a MIG slice
    scaled by its SMs), or None on CPU, in fp32, or for a GPU the table lacks (then no MFU is logged)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    from ..models.flops import cuda_peak_bf16_flops
    return cuda_peak_bf16_flops(device).flops


def analytic_flops_per_image(cfg) -> Optional[float]:
    """models/flops.py's training FLOPs per image of a flow-matching stage (generator, reference): the DiT's forward
    and backward, plus the frozen tokenizer's encoding where the stage encodes images itself (no latent cache, no
    teacher features). Logged beside the counted figure, so the two can be compared; None for other stages."""
    if cfg.stage not in ("generator", "reference"):
        return None
    from ..models.flops import dit_flops, tokenizer_flops
    total = float(dit_flops(cfg.score).train)
    encodes = cfg.stage == "generator" or cfg.reference.kind in ("tokenizer", "noisy_tokenizer")
    if encodes and cfg.data.latents is None and not cfg.teacher.remote:
        tok = tokenizer_flops(cfg.tokenizer)
        total += tok.encoder + tok.bottleneck
    return total


class FlopCounter:
    """Counts the FLOPs of the first `steps` training steps of this process (feeds achieved FLOP/s, MFU and HFU).

    A stage whose steps differ in cost (the dmd stage updates the tokenizer on one step in `dm.tokenizer_every`, the
    fake score on the others) names its cycle (`flop_cycle`); the counter counts one whole cycle, each step apart,
    and reports the mean, so FLOP/s and MFU hold for the run and not for whichever step came first. Each count
    starts when a batch is handed out and stops when the next is asked for (or at close()).

    `flops_per_step`: hardware FLOPs (everything that ran, activation recomputation included: HFU's numerator);
    `model_flops_per_step`: the same less the recomputation (MFU's numerator; models/recompute.py tells them apart).
    """

    def __init__(self, per_rank_batch: int = 1, steps: int = 1):
        self.per_rank_batch = per_rank_batch
        self.steps = max(1, int(steps))
        self.flops_per_step: Optional[float] = None
        self.model_flops_per_step: Optional[float] = None
        self.per_step: list[tuple[float, float]] = []  # (hardware, recomputed) of each counted step
        self._gen = None

    # -- a part of a checkpoint: a resumed run logs the count of its first run's first steps, without recounting --
    def state_dict(self) -> dict:
        per = self.per_rank_batch
        return {"flops_per_image": self.flops_per_step / per if self.flops_per_step else None,
                "model_flops_per_image": self.model_flops_per_step / per if self.model_flops_per_step else None,
                "per_step_per_image": [[h / per, r / per] for h, r in self.per_step]}

    def load_state_dict(self, state: dict) -> None:
        per_image = state.get("flops_per_image")
        self.flops_per_step = per_image * self.per_rank_batch if per_image else None
        model = state.get("model_flops_per_image", per_image)  # checkpoints before the split: no recompute known
        self.model_flops_per_step = model * self.per_rank_batch if model else None
        self.per_step = [(float(h) * self.per_rank_batch, float(r) * self.per_rank_batch)
                         for h, r in state.get("per_step_per_image", [])]

    def wrap(self, batches: Iterator, start_step: int = 0) -> Iterator:
        """Count the batches of index < `steps` that are still to come (`start_step`: the batches taken before,
        the loop's optimiser steps x its accumulation, as the worker passes both; a run resumed past them counts
        nothing). Counting runs a step under a dispatch mode whose numerics differ in the
        last bits (SiLU's backward, for one): which steps are counted depends on the step index only, so a resumed
        run takes exactly the steps an uninterrupted one takes."""
        self._gen = self._counted(iter(batches), max(0, self.steps - int(start_step)))
        return self._gen

    def _finish(self) -> None:
        if self.per_step:
            n = len(self.per_step)
            self.flops_per_step = sum(h for h, _ in self.per_step) / n
            self.model_flops_per_step = sum(h - r for h, r in self.per_step) / n

    def _counted(self, it: Iterator, steps: int) -> Iterator:
        from torch.utils.flop_counter import FlopCounterMode

        from ..models.flops import register_attention_flop_formulas
        from ..models.recompute import RecomputeTally, counting_recompute
        register_attention_flop_formulas()  # fused CPU SDPA and flash-attn kernels count as zero otherwise
        for _ in range(steps):
            counter, tally = FlopCounterMode(display=False), RecomputeTally()
            handed = False
            try:
                with counter, counting_recompute(counter, tally):
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    handed = True
                    yield batch
            finally:
                if handed:  # also when the loop ends (close()) during the step
                    self.per_step.append((float(counter.get_total_flops()), tally.flops))
                    self._finish()
        yield from it

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()  # leaves the counting mode if the loop ended within the counted steps


class LogHook(LoopHook):
    """At each log interval: images/s, skipped steps, achieved FLOP/s per worker (MFU on GPU) beside the losses, into
    the history (every rank), the sinks (rank 0) and `report(images, metrics)` (Ray Train's report, when set).
    `summary_lines`: one printed line per interval instead of a redrawn progress bar (logs of Ray jobs)."""

    def __init__(self, *, start_images: int, per_rank_batch: int, world: int, device: torch.device, precision: str,
                 flops: FlopCounter, sinks: Optional[MetricSinks], report: Optional[Callable] = None,
                 summary_lines: bool = False, total_images: int = 0, analytic_per_image: Optional[float] = None):
        self.per_rank_batch, self.world, self.device, self.precision = per_rank_batch, world, device, precision
        self.flops, self.sinks, self.report = flops, sinks, report
        self.summary_lines, self.total_images = summary_lines, total_images
        self.analytic_per_image = analytic_per_image  # models/flops.py's count for the stage's main model
        self.history: list[dict[str, float]] = []
        self.last_time = time.perf_counter()
        self.last_images = start_images

    def on_log(self, loop, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = (loop.images_seen - self.last_images) / max(now - self.last_time, 1e-9)
        out = dict(metrics)
        out["images_per_second"] = rate
        out["skipped_steps"] = float(loop.skipped_steps)
        flops, model = self.flops.flops_per_step, self.flops.model_flops_per_step or self.flops.flops_per_step
        if flops:  # per worker: FLOPs of one step / its images x its share of the image rate
            achieved = model / self.per_rank_batch * rate / self.world  # model FLOPs: no recomputation
            achieved_hw = flops / self.per_rank_batch * rate / self.world  # everything that ran
            out["tflops_per_worker"] = achieved / 1e12
            # counted (FlopCounterMode), the mean over the stage's cycle of steps (FlopCounter)
            out["gflops_per_image"] = model / self.per_rank_batch / 1e9
            if flops != model:
                out["gflops_per_image_hardware"] = flops / self.per_rank_batch / 1e9
            if self.analytic_per_image:
                out["gflops_per_image_analytic"] = self.analytic_per_image / 1e9
            peak = peak_flops(self.device, self.precision)
            if peak:
                out["mfu"] = achieved / peak  # model FLOP utilisation
                out["hfu"] = achieved_hw / peak  # hardware FLOP utilisation (with activation recompute)
        self.last_time, self.last_images = now, loop.images_seen
        self.history.append({"images": float(loop.images_seen), **out})
        if self.sinks is not None:
            self.sinks.write(loop.images_seen, out)
            if self.summary_lines:
                shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(out.items()) if k != "skipped_steps")
                left = self.total_images - loop.images_seen
                eta = f", ETA {duration_text(left / rate)}" if left > 0 and rate > 0 else ""
                say("train", f"{loop.stage.name} {loop.images_seen}/{self.total_images} images{eta}: {shown}")
        if self.report is not None:
            self.report(loop.images_seen, out)


class ImageGrid(LoopHook):
    """Every `every` images: the stage's tokenizer reconstructions of the first images of the current batch, under
    those images, as one TensorBoard image ("reconstructions"). Every rank computes them (under ZeRO-3 a forward
    gathers parameters collectively); rank 0 writes. Stages without a tokenizer, and batches without images (cached
    latents), show nothing."""

    IMAGES = 8

    def __init__(self, every: int, stage, device: torch.device, sinks: Optional[MetricSinks], start_images: int):
        self.every, self.stage, self.device, self.sinks = every, stage, device, sinks
        self.next = (start_images // every + 1) * every if every > 0 else None
        self.batch: Optional[dict] = None

    def wrap(self, batches: Iterator) -> Iterator:
        """The batch iterator, remembering the batch last handed out."""
        for batch in batches:
            self.batch = batch
            yield batch

    @torch.no_grad()
    def reconstructions(self, batch: dict) -> Optional[torch.Tensor]:
        tokenizer = getattr(self.stage, "tokenizer", None)
        if tokenizer is None or "image" not in batch:
            return None
        x = batch["image"][:self.IMAGES].to(self.device)
        features = batch.get(FEATURES_KEY)
        if features is not None:
            features = features[:self.IMAGES].to(self.device)
        recon, _ = tokenizer(x, features)
        return torch.cat([x, recon.to(x.dtype)]).clamp(-1, 1).cpu()

    def after_step(self, loop) -> None:
        if self.next is None or loop.images_seen < self.next or self.batch is None:
            return
        self.next = (loop.images_seen // self.every + 1) * self.every
        images = self.reconstructions(self.batch)
        if images is None or self.sinks is None:
            return
        from torchvision.utils import make_grid
        grid = make_grid((images + 1) / 2, nrow=len(images) // 2, padding=2, pad_value=1.0)
        self.sinks.tb.add_image("reconstructions", grid, loop.images_seen)
        self.sinks.tb.flush()
