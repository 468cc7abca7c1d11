"""Stage artifacts on a local disk or an object store, read and written the same way.

open_artifact(location) opens a local artifact directory in place, or downloads a remote one (s3://...) once per node
into a cache keyed by its content hash (from its artifact.json): workers on one node that open the same artifact
take a file lock, the first downloads, the others find the finished copy. A copy is published (renamed into place)
only after its files match the content hash, so a half-downloaded artifact is never read.

upload_artifact(local_dir, url) puts artifact.json last, so a reader never sees a half-uploaded artifact as complete.

The cache is this user's (`$TMPDIR/dmvae-<uid>/artifacts`, private_cache: 0700, refused when it is a symlink or
someone else's), beside the shard and checkpoint caches: point TMPDIR at a large local volume on cluster nodes. A
cached entry is trusted by nothing it says itself: at every open its files are hashed again and must match the content
hash that names the entry and that the remote artifact.json records; an entry that does not (planted, modified, cut
short) is removed and downloaded again, with a warning.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dmvae_scale.artifacts import ARTIFACT_FILES, Artifact, ArtifactError, ArtifactInfo, hash_problem, \
    read_artifact_info

from ..private_cache import local_files, user_cache
from . import storage

log = logging.getLogger(__name__)

MANIFEST = "artifact.json"


def cache_root() -> Path:
    """This user's artifact download cache, $TMPDIR/dmvae-<uid>/artifacts (created 0700 and checked)."""
    return Path(user_cache("artifacts", "artifact cache", ArtifactError))


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
            if info.format >= 2 and name not in info.sizes:
                continue  # not part of the artifact: its content hash does not cover it
            if fs.exists(remote):
                size = int(fs.info(remote).get("size") or 0)
                if info.format >= 2 and size != info.sizes[name]:  # refused before a byte is read
                    raise ArtifactError(f"{url}/{name}: {size} bytes, but "
                                        f"{url}/{MANIFEST} records {info.sizes[name]}; refusing to download it")
                fs.get_file(remote, str(staging / name))
        if not (staging / "weights.safetensors").is_file():
            raise ArtifactError(f"{url}/weights.safetensors: missing from artifact {url}")
        problem = hash_problem(staging, info)
        if problem:
            raise ArtifactError(f"{url}: content hash mismatch ({problem}: its files changed after artifact.json "
                                f"was written, or are being rewritten now)")
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
    root = cache_root()
    final = root / key
    with _locked(root / f"{key}.lock"):
        if (final / MANIFEST).is_file() or final.is_symlink():
            problem = _entry_problem(final, info, manifest)
            if problem is None:
                return Artifact(location, final, info, verified=True)
            log.warning(f"artifact cache entry {final}: {problem}; removing it and downloading {location} again")
            if final.is_symlink():
                final.unlink()
            else:
                shutil.rmtree(final)
        _download(location, info, manifest, final)
        return Artifact(location, final, info, verified=True)


def _entry_problem(final: Path, info: ArtifactInfo, manifest: bytes) -> str | None:
    """None when the cached entry is the remote artifact: a real directory whose files hash to the content hash
    that names it (the remote artifact.json's) and whose artifact.json is the remote one; else what is wrong."""
    if final.is_symlink() or not final.is_dir():
        return "not a directory of this cache (a symlink?)"
    try:
        if (final / MANIFEST).read_bytes() != manifest:
            return f"its {MANIFEST} differs from the remote one"
        problem = hash_problem(final, info)
    except (OSError, ArtifactError) as exc:
        return f"unreadable ({exc})"
    return f"{problem} that names it" if problem else None


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
    files = dict((rel, src) for src, rel in local_files(str(local_dir), f"artifact upload {url}") if "/" not in rel)
    if MANIFEST not in files:
        raise ArtifactError(f"{local_dir}/{MANIFEST}: not a regular file; nothing uploaded")
    for name in sorted(files):
        if name != MANIFEST:
            fs.put_file(files[name], f"{root}/{name}")
    fs.put_file(files[MANIFEST], f"{root}/{MANIFEST}")

