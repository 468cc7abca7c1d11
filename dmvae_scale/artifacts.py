"""Stage artifacts: what one stage hands to the next, named explicitly in the next stage's config.

An artifact is a directory (local path; s3:// through fsspec) holding
    weights.safetensors     raw weights, one entry per model: "<model>.<param name>"
    ema.safetensors         EMA weights, same keys (optional)
    artifact.json           stage, models, latent shape and statistics, config hash, upstream artifact ids,
                            content hash (format 2: of both weight files and config.yaml), each file's size;
                            written LAST, so a directory without it is not an artifact
    config.yaml             the resolved config of the run that produced it
Loading checks the content hash and refuses anything missing or mismatched with an error naming the file and key.

`Artifact` is one opened artifact in a local directory; data/artifact_store.py's `open_artifact` gives one for a
local path or an s3:// URL (downloaded once per node into a cache keyed by the content hash).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

# Format 2 (written now): the content hash covers weights.safetensors, ema.safetensors AND config.yaml (which shapes
# the model a later stage builds), and artifact.json records each file's size (downloads are capped at it). Format 1
# (hash of the weight files only, no sizes) is still read, its config.yaml then vouched for by nothing.
ARTIFACT_FORMAT = 2
READABLE_FORMATS = (1, 2)

# What the saved tensors compute, beyond their layout (ARTIFACT_FORMAT) and shapes: bumped when a change of the code
# makes weights saved before it compute another function here. Recorded in every artifact.json ("method") and in
# every checkpoint's meaning ("method.version"); a manifest without one is version 1. Checkpoints of the stages that
# train a DiT, and artifacts that hold one, from before a version are refused with the reason (method_refusal).
METHOD_VERSION = 2
METHOD_CHANGES = {  # version -> (what the weights before it were made with, what it changed to)
    2: ("the DiT time embedding t*1000", "the DiT embeds t in [0, 1], as LightningDiT does"),
}
DIT_MODELS = ("real_score", "fake_score", "generator")  # the models whose function version 2 changed
DIT_STAGES = ("reference", "dmd", "generator")  # the stages that train one


def method_refusal(version: int, what: str) -> str | None:
    """The one-line reason `what` (made at method `version`) cannot be used by this code, or None."""
    if version >= METHOD_VERSION:
        return None
    first = min(v for v in METHOD_CHANGES if v > version)
    before, now = METHOD_CHANGES[first]
    return (f"{what} was made with {before} (before method version {first}: {now}), so its score model computes "
            f"another function here; retrain it, and the stages after it, with this version (delete the old run "
            f"directory and artifact first)")


class ArtifactError(UserError):
    pass


@dataclass
class LatentSpec:
    """Shape and normalisation of a tokenizer's latents: z' = (z - mean) * scale."""

    channels: int
    height: int
    width: int
    mean: float = 0.0
    scale: float = 1.0

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) * scale, in float32 when z is a bf16/fp16 latent from an autocast encoder (the flow-matching
        and DM arithmetic that follows must not run in bf16)."""
        if z.dtype in (torch.bfloat16, torch.float16):
            z = z.float()
        return (z - self.mean) * self.scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.mean


@dataclass
class ArtifactInfo:
    stage: str
    models: list[str]
    config_hash: str
    latent: Optional[LatentSpec] = None
    upstream: dict[str, str] = field(default_factory=dict)  # role -> upstream artifact id
    extra: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    format: int = ARTIFACT_FORMAT
    method: int = METHOD_VERSION  # what the weights compute (METHOD_VERSION); a manifest without the key is 1
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes (format 2)
    # Format 2: the hash of the weight files alone (format 1's content hash). The id is made from it, so an id names
    # the weights wherever the artifact was written (config.yaml holds run_dir and input paths); checked with the
    # content hash wherever the files are (hash_problem).
    weights_hash: str = ""

    @property
    def id(self) -> str:
        return f"{self.stage}-{(self.weights_hash or self.content_hash)[:12]}"


def _flatten(models: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    flat = {}
    for name, sd in models.items():
        for k, v in sd.items():
            flat[f"{name}.{k}"] = v.detach().cpu().contiguous()
    return flat


_CHUNK = 8 * 2**20


def sha256_of_stream(f) -> str:
    """Hex sha256 of what is left to read in the binary stream `f` (the package's one file-hashing loop)."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(_CHUNK), b""):
        digest.update(block)  # releases the GIL: files hash in parallel on threads
    return digest.hexdigest()


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 of a file: artifacts, checkpoint files, weights files and reference statistics all use this."""
    with open(path, "rb") as f:
        return sha256_of_stream(f)


def save_artifact(directory: str | Path, info: ArtifactInfo, weights: dict[str, dict[str, torch.Tensor]],
                  ema: dict[str, dict[str, torch.Tensor]] | None = None, config_yaml: str | None = None) -> ArtifactInfo:
    """Write an artifact; artifact.json goes last so a crash never leaves something that looks complete."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    manifest = d / "artifact.json"
    if manifest.exists():
        manifest.unlink()
    save_file(_flatten(weights), str(d / "weights.safetensors"))
    if ema:
        save_file(_flatten(ema), str(d / "ema.safetensors"))
    if config_yaml is not None:
        (d / "config.yaml").write_text(config_yaml)
    info.models = sorted(weights)
    info.format = ARTIFACT_FORMAT
    info.content_hash, info.weights_hash = _hashes(d, ARTIFACT_FORMAT)
    info.sizes = {n: (d / n).stat().st_size for n in ARTIFACT_FILES if (d / n).is_file()}
    tmp = d / "artifact.json.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(manifest)
    return info


def read_artifact_info(directory: str | Path) -> ArtifactInfo:
    d = Path(directory)
    manifest = d / "artifact.json"
    if not d.is_dir():
        raise ArtifactError(f"artifact not found: {d} (run the stage that produces it first)")
    if not manifest.is_file():
        raise ArtifactError(f"{manifest}: missing; {d} is not a complete artifact (interrupted run?)")
    try:
        raw = json.loads(manifest.read_text())
        latent = raw.pop("latent", None)
        raw.setdefault("method", 1)  # written from method version 2 on
        info = ArtifactInfo(**raw, latent=LatentSpec(**latent) if latent else None)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{manifest}: unreadable artifact manifest ({exc})") from None
    if info.format not in READABLE_FORMATS:
        raise ArtifactError(f"{manifest}: format {info.format}, this version reads formats "
                            f"{', '.join(map(str, READABLE_FORMATS))}")
    dits = [m for m in info.models if m in DIT_MODELS]
    refusal = method_refusal(info.method, f"{manifest}: this {info.stage} artifact ({', '.join(dits)})") \
        if dits else None
    if refusal:
        raise ArtifactError(refusal)
    return info


def load_artifact(directory: str | Path, which: str = "ema", verify: bool = True
                  ) -> tuple[ArtifactInfo, dict[str, dict[str, torch.Tensor]]]:
    """Return (info, {model: state_dict}). `which` is "ema" or "raw"; asking for EMA weights that were not saved
    is an error, never a silent fall-back to raw ones."""
    if which not in ("ema", "raw"):
        raise ArtifactError(f"weights choice must be 'ema' or 'raw', got {which!r}")
    d = Path(directory)
    info = read_artifact_info(d)
    files = {"raw": d / "weights.safetensors", "ema": d / "ema.safetensors"}
    if not files["raw"].is_file():
        raise ArtifactError(f"{files['raw']}: missing from artifact {d}")
    if verify:
        problem = hash_problem(d, info)
        if problem:
            raise ArtifactError(f"{d}: content hash mismatch ({problem}: files changed after artifact.json was "
                                f"written)")
    path = files[which]
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact {d} has no {which} weights; set inputs.tokenizer_weights=raw "
                            f"or use an artifact saved with EMA")
    flat = load_file(str(path))
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in info.models}
    for k, v in flat.items():
        model, _, name = k.partition(".")
        if model not in out:
            raise ArtifactError(f"{path}: key '{k}' belongs to no model listed in artifact.json ({info.models})")
        out[model][name] = v
    return info, out


ARTIFACT_FILES = ("weights.safetensors", "ema.safetensors", "config.yaml")  # besides artifact.json, which goes last


@dataclass
class Artifact:
    """An artifact readable in `directory` (a local artifact itself, or the local copy of a remote one); `location`
    is what the user named (a path or a URL), used in every message."""

    location: str
    directory: Path
    info: ArtifactInfo
    verified: bool = False  # content hash checked already (a fresh download); loading then skips the re-hash
    _loaded: dict = field(default_factory=dict, repr=False)  # which -> weights, read once per opened artifact

    @classmethod
    def read(cls, directory: str | Path, location: str | None = None) -> "Artifact":
        return cls(location or str(directory), Path(directory), read_artifact_info(directory))

    def config(self):
        """The RunConfig of the run that produced this artifact (its config.yaml)."""
        from .config import load_config
        config_file = self.directory / "config.yaml"
        if not config_file.is_file():
            raise ArtifactError(f"{self.location}/config.yaml is missing; an artifact must carry the config that "
                                f"made it")
        try:
            return load_config(config_file)
        except UserError as exc:
            raise ArtifactError(f"{self.location}/config.yaml: {exc}") from None

    def weights(self, which: str = "ema") -> dict[str, dict[str, torch.Tensor]]:
        """{model: state_dict} of every model, `which` = "ema" or "raw" (checked against the content hash)."""
        if which not in self._loaded:
            try:
                _, self._loaded[which] = load_artifact(self.directory, which=which, verify=not self.verified)
            except ArtifactError as exc:  # name what the user named, not the cache directory
                raise ArtifactError(str(exc).replace(str(self.directory), self.location)) from None
            self.verified = True
        return self._loaded[which]

    def state(self, model: str, which: str = "ema") -> dict[str, torch.Tensor]:
        """One model's state dict; an artifact without it is an error naming its stage and models."""
        weights = self.weights(which)
        if model not in weights or not weights[model]:
            raise ArtifactError(f"{self.location}: holds no {which} weights for '{model}' (stage "
                                f"'{self.info.stage}', models {self.info.models})")
        return weights[model]


def _hashes(directory: str | Path, format: int) -> tuple[str, str]:
    """(content hash, weights hash) of `directory`, each file hashed once; the weights hash is "" for format 1
    (whose content hash is one already)."""
    d = Path(directory)
    files = {n: sha256_of_file(d / n) for n in ARTIFACT_FILES if (d / n).is_file() or n == "weights.safetensors"}
    weights = hashlib.sha256(files["weights.safetensors"].encode())
    if "ema.safetensors" in files:
        weights.update(files["ema.safetensors"].encode())
    if format < 2:
        return weights.hexdigest(), ""
    content = hashlib.sha256(b"dmvae-artifact-2\n")
    for name, digest in files.items():
        content.update(f"{name} {digest}\n".encode())
    return content.hexdigest(), weights.hexdigest()


def hash_problem(directory: str | Path, info: "ArtifactInfo") -> str | None:
    """None when the files of `directory` hash to what `info` records (content hash and, format 2, weights hash,
    which the id is made of); else what differs."""
    content, weights = _hashes(directory, info.format)
    if content != info.content_hash:
        return f"its files hash to {content}, not to the content hash {info.content_hash}"
    if info.format >= 2 and weights != info.weights_hash:
        return f"its weights hash to {weights}, not to the weights hash {info.weights_hash or '(none)'} of its id"
    return None


def content_hash_of(directory: str | Path, format: int = ARTIFACT_FORMAT) -> str:
    """The content hash of the files in `directory`, as save_artifact computes it. Format 2: sha256 over the line
    "<name> <sha256 of the file>" of each of ARTIFACT_FILES present (config.yaml included); format 1: sha256 over the
    hex sha256 of weights.safetensors, then of ema.safetensors when present (format 2's weights hash)."""
    return _hashes(directory, format)[0]


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load that names missing/unexpected keys and shape mismatches instead of printing and carrying on."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ArtifactError(f"cannot load {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
