"""Export: consolidated fp32 weights (raw or EMA) of a training checkpoint as one safetensors file, offline (no process
group), from any ZeRO stage and any number of workers."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data import storage
from ..ema import consolidate_ema_shards
from .integrity import checked_loads, join_inside, safe_load
from .manager import read_rank_parts
from .store import MANIFEST, CheckpointError, CheckpointStore, checkpoint_name


@dataclass
class ExportSummary:
    path: str
    checkpoint: str
    which: str
    models: list[str]
    tensors: int
    parameters: int
    bytes: int

    def line(self) -> str:
        return (f"exported {self.which} weights of {', '.join(self.models)} from {self.checkpoint}: {self.tensors} "
                f"tensors, {self.parameters / 1e6:.2f}M parameters, {self.bytes / 2**20:.1f} MiB -> {self.path}")


def _engine_weights(local: str, name: str, listed: Any) -> dict[str, Any]:
    """Full fp32 state dict of one engine from its ZeRO shards (any stage, any number of workers), offline. Read
    inside integrity.checked_loads (weights_only, listed files only); `listed`: the files the manifest lists."""
    zero_dir = join_inside(local, f"engines/{name}", local)
    model_states = os.path.join(zero_dir, "zero", "mp_rank_00_model_states.pt")
    has_optim_shards = any(rel.startswith(f"engines/{name}/zero/") and rel.endswith("optim_states.pt")
                           for rel in listed)
    if not has_optim_shards:  # ZeRO stage 0: the module state is whole in the model-states file
        return {k: v.float() if v.is_floating_point() else v
                for k, v in safe_load(model_states, map_location="cpu")["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return get_fp32_state_dict_from_zero_checkpoint(zero_dir, tag="zero")


def _open_checkpoint(source: str) -> tuple[CheckpointStore, Any]:
    """(store, info) of a checkpoint directory, or of a run directory's latest complete checkpoint."""
    if storage.exists(storage.join(source, MANIFEST)):
        parent, name = source.rstrip("/").rsplit("/", 1)
        store = CheckpointStore(parent.rsplit("/checkpoints", 1)[0])
        info = store.read_manifest(name)
        problem = "unreadable manifest" if info is None else store.verify(info)
        if problem:
            raise CheckpointError(f"{source}: not a complete checkpoint ({problem})")
        return store, info
    store = CheckpointStore(source)
    info = store.latest()
    if info is None:
        raise CheckpointError(f"{source}: no complete checkpoint (expected a run directory with "
                              f"checkpoints/img-*/manifest.json, or a checkpoint directory)")
    return store, info


def consolidated_weights(source: str, kinds: tuple[str, ...] = ("raw",), models: list[str] | None = None
                         ) -> tuple[Any, dict[str, dict[str, dict[str, Any]]]]:
    """(checkpoint info, {kind: {model: fp32 state dict}}) for kinds "raw" and/or "ema", reading each engine's ZeRO
    shards once whatever the kinds (an XL checkpoint's consolidation is the slow part). "ema" takes the EMA average
    for the parameters of models that keep one (buffers from the raw weights); models=None: every trained model
    (with "ema": every one that keeps an average). Every file is checked against the manifest's sha256 before
    anything is read, and read weights_only (integrity.py): a pickle that would run code is refused, naming it."""
    bad = [k for k in kinds if k not in ("raw", "ema")]
    if bad or not kinds:
        raise CheckpointError(f"--weights must be raw or ema, got {', '.join(bad) or 'nothing'}")
    store, info = _open_checkpoint(source)
    chosen = list(models or info.engines)
    unknown = sorted(set(chosen) - set(info.engines))
    if unknown:
        raise CheckpointError(f"--models {','.join(unknown)}: not in checkpoint {info.url} (it holds "
                              f"{', '.join(info.engines)})")
    local = store.local_view(info)  # every file checked against the manifest's sha256 first
    with checked_loads(store.view(info, local)):
        return info, _consolidate(info, local, kinds, models, chosen)


def _consolidate(info: Any, local: str, kinds: tuple[str, ...], models: list[str] | None, chosen: list[str]
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    ema_shards = None
    if "ema" in kinds:
        ranks = [read_rank_parts(local, r) for r in range(info.world_size)]
        ema_shards = {n[len("ema."):]: [r[n] for r in ranks] for n in ranks[0] if n.startswith("ema.")}
        if models is None:  # every model that keeps an average
            chosen = [m for m in chosen if m in ema_shards]
        missing = [m for m in chosen if m not in ema_shards]
        if missing or not chosen:
            raise CheckpointError(f"--weights ema: models {', '.join(missing) or 'of this stage'} keep no EMA in "
                                  f"{info.url}; "
                                  f"use --weights raw or --models with {', '.join(sorted(ema_shards)) or 'none'}")
    out: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in kinds}
    for name in chosen:
        raw = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in _engine_weights(local, name, info.files).items()}
        if "raw" in kinds:
            out["raw"][name] = raw
        if ema_shards is not None:
            ema = dict(raw)
            for pname, avg in consolidate_ema_shards(ema_shards[name]).items():
                ema[pname] = avg.reshape(raw[pname].shape).float().contiguous()
            out["ema"][name] = ema
    return out


def export_weights(source: str, out: str, which: str = "raw", models: list[str] | None = None) -> ExportSummary:
    """Write `<model>.<name>` -> fp32 tensor for the trained models of a checkpoint (a checkpoint directory, or a run
    directory whose latest complete checkpoint is taken). which="ema" takes the EMA averages (consolidated_weights)."""
    from safetensors.torch import save_file
    info, weights = consolidated_weights(source, (which,), models)
    chosen = list(weights[which])
    flat = {f"{name}.{k}": v for name, state in weights[which].items() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    save_file(flat, out, metadata={"checkpoint": info.url, "images_seen": str(info.images_seen), "which": which,
                                   "models": ",".join(chosen)})
    params = sum(v.numel() for v in flat.values())
    return ExportSummary(out, info.url, which, chosen, len(flat), params, os.path.getsize(out))


def checkpoint_artifact(run_dir: str, images: int, out_dir: str) -> str:
    """An artifact of the run's checkpoint at `images` images seen (raw and EMA weights consolidated from its shards),
    beside the run's final artifact: the same config, stage, latent statistics and upstream, with
    extra.images_seen = images. What a curve over training (gFID at half the images) samples from. Returns out_dir."""
    from ...artifacts import ArtifactError, read_artifact_info, save_artifact
    from ...data.artifact_store import open_artifact
    final = open_artifact(storage.join(run_dir, "artifact"))
    if (Path(out_dir) / "artifact.json").is_file():
        made = read_artifact_info(out_dir)
        if made.extra.get("from_artifact") == final.info.id and made.extra.get("images_seen") == images:
            return out_dir  # made before from this very run
    ckpt = storage.join(run_dir, "checkpoints", checkpoint_name(images))
    if not storage.exists(storage.join(ckpt, MANIFEST)):
        kept = CheckpointStore(run_dir).complete()
        raise ArtifactError(f"{run_dir}: no complete checkpoint at {images} images; kept: "
                            f"{', '.join(str(c.images_seen) for c in kept) or 'none'} (keep_checkpoints and "
                            f"ckpt_every_images decide which stay)")
    info = read_artifact_info(final.directory)
    _, weights = consolidated_weights(ckpt, ("raw", "ema"), list(info.models))
    info.extra = {**info.extra, "images_seen": images, "from_artifact": final.info.id, "checkpoint": ckpt}
    config_yaml = (Path(final.directory) / "config.yaml").read_text()
    save_artifact(out_dir, info, weights["raw"], weights["ema"], config_yaml=config_yaml)
    return out_dir
