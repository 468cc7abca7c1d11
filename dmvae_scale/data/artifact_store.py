"""Stage artifacts on a local disk or an object store, read and written the same way.

open_artifact(location) opens a local artifact directory in place, or downloads a remote one (s3://...) once per node
into a cache keyed by its content hash (from its artifact.json): workers on one node that open the same artifact
take a file lock, the first downloads, the others find the finished copy. A copy is published (renamed into place)
only after its files match the content hash, so a half-downloaded artifact is never read.

upload_artifact(local_dir, url) puts artifact.json last, so a reader never sees a half-uploaded artifact as complete.

The cache lies under $TMPDIR (tempfile.gettempdir(), like the shard and checkpoint caches): point TMPDIR at a large
local volume on cluster nodes.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dmvae_scale.artifacts import ARTIFACT_FILES, Artifact, ArtifactError, ArtifactInfo, content_hash_of, \
    read_artifact_info

from . import storage

MANIFEST = "artifact.json"


def cache_root() -> Path:
    return Path(tempfile.gettempdir()) / "dmvae-artifacts"


def _remote_info(url: str) -> tuple[ArtifactInfo, bytes]:
    storage.check_reachable(url)
    manifest = storage.join(url, MANIFEST)
    try:
        raw = storage.read_bytes(manifest)
    except storage.StorageError:
        if not storage.exists(url):
            raise ArtifactError(f"artifact not found: {url} (run the stage that produces it first)") from None
        raise ArtifactError(f"{manifest}: missing; {url} is not a complete artifact (interrupted run or "
                            f"upload?)") from None
    staging = Path(tempfile.mkdtemp(prefix="dmvae-manifest-"))
    try:  # parse and check the format exactly as for a local artifact
        (staging / MANIFEST).write_bytes(raw)
        try:
            info = read_artifact_info(staging)
        except ArtifactError as exc:
            raise ArtifactError(str(exc).replace(str(staging / MANIFEST), manifest)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info, raw


def artifact_info(location: str | os.PathLike) -> ArtifactInfo:
    """The manifest of a local or remote artifact, without downloading its weights."""
    location = str(location)
    if storage.is_remote(location):
        return _remote_info(location)[0]
    return read_artifact_info(location)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        yield


def _download(url: str, info: ArtifactInfo, manifest: bytes, final: Path) -> None:
    staging = final.with_name(f"{final.name}.part-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fs, root = storage.filesystem(url)
        for name in ARTIFACT_FILES:
            remote = f"{root.rstrip('/')}/{name}"
            if fs.exists(remote):
                fs.get_file(remote, str(staging / name))
        if not (staging / "weights.safetensors").is_file():
            raise ArtifactError(f"{url}/weights.safetensors: missing from artifact {url}")
        if content_hash_of(staging) != info.content_hash:
            raise ArtifactError(f"{url}: content hash mismatch (its files changed after artifact.json was written, "
                                f"or are being rewritten now)")
        (staging / MANIFEST).write_bytes(manifest)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_artifact(location: str | os.PathLike) -> Artifact:
    """An artifact from a local directory or an object-store URL, ready to read from local disk."""
    location = str(location)
    if not storage.is_remote(location):
        return Artifact.read(location)
    info, manifest = _remote_info(location)
    if not info.content_hash:
        raise ArtifactError(f"{location}/{MANIFEST}: no content hash; not an artifact this version wrote")
    # Keyed by the weights' hash AND the config's: a deterministic rerun into another store makes the same weights
    # with another config.yaml (other input paths), which must not be served from the first one's copy.
    key = f"{info.content_hash}-{info.config_hash}"
    final = cache_root() / key
    with _locked(cache_root() / f"{key}.lock"):
        if not (final / MANIFEST).is_file():
            _download(location, info, manifest, final)
            return Artifact(location, final, info, verified=True)
    return Artifact(location, final, read_artifact_info(final))


def open_tokenizer(location: str | os.PathLike, which: str = "ema"):
    """(Tokenizer in eval mode, its Artifact) from a tokenizer or decoder stage artifact, local or s3://."""
    from dmvae_scale.models.tokenizer import Tokenizer
    artifact = open_artifact(location)
    if "tokenizer" not in artifact.info.models:
        raise ArtifactError(f"{location}: artifact of stage '{artifact.info.stage}' holds no tokenizer (models: "
                            f"{', '.join(artifact.info.models)}); pass a tokenizer or decoder stage artifact")
    return Tokenizer.from_artifact(artifact, which).eval().requires_grad_(False), artifact


def upload_artifact(local_dir: str | os.PathLike, url: str) -> None:
    """Copy a local artifact to `url/`, artifact.json last (a reader takes its presence to mean complete). A
    manifest already there from an earlier artifact is removed first."""
    local_dir = Path(local_dir)
    if not (local_dir / MANIFEST).is_file():
        raise ArtifactError(f"{local_dir}: not a complete artifact ({MANIFEST} missing); nothing uploaded")
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")
    for name in sorted(os.listdir(local_dir)):
        if name != MANIFEST and (local_dir / name).is_file():
            fs.put_file(str(local_dir / name), f"{root}/{name}")
    fs.put_file(str(local_dir / MANIFEST), f"{root}/{MANIFEST}")

