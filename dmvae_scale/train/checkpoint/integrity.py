"""What a checkpoint's files are trusted for, and how they are read: names that stay inside their directory, the
sha256 the manifest records for every file, a private per-user cache, and pickles that may build data, never run code.

  - Names. A manifest's file keys and engine names become paths. Each is refused unless it is made of
    `[A-Za-z0-9_.-]+` segments (no `.` or `..`, not absolute), and every joined path must resolve (symlinks
    followed) inside its directory.
  - Hashes. The manifest lists each file's sha256 (store.py). The files are checked against it before any is read
    on restore or export (`verify_files`); a mismatch names the file, the expected and the actual hash.
  - The local cache of a remote run directory lives under a directory this user owns, created 0700 and checked with
    lstat (`private_dir`): not a symlink, owned by this uid, not writable by group or others.
  - Pickles. Every torch.load of a checkpoint file is `weights_only=True` with an allow-list of exactly the three
    DeepSpeed types its files hold (`DEEPSPEED_SAFE_GLOBALS`, found by saving ZeRO 0-3 checkpoints of DeepSpeed
    0.19.8 and their universal conversion). DeepSpeed's own readers (its checkpoint engine, the universal loading and
    conversion, zero_to_fp32) call torch.load with weights_only=False: inside `checked_loads`, torch.load is
    replaced by `safe_load`, whatever its callers ask for, and a file under the checkpoint that the manifest does
    not list (a planted extra shard a glob would pick up) is refused. A pickle that would call anything else is
    refused by torch's restricted unpickler when it meets the reference, before anything runs; the CheckpointError
    names the file and the reference.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ...artifacts import sha256_of_file as sha256_file, sha256_of_stream as sha256_stream  # noqa: F401
from ...errors import UserError
from ...private_cache import private_dir as _private_dir


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read; names the checkpoint and the file."""


# ----------------------------------------------------------------------------------------------------------------------
# Names that stay inside their directory
# ----------------------------------------------------------------------------------------------------------------------

_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_name(name: Any, what: str) -> str:
    """One path segment: `[A-Za-z0-9_.-]+`, not `.` or `..`."""
    if not isinstance(name, str) or not _SEGMENT.match(name) or name in (".", ".."):
        raise CheckpointError(f"{what}: {name!r} is not a safe name (expected letters, digits, '_', '.', '-'; "
                              f"not '.' or '..'); refusing it")
    return name


def check_relpath(rel: Any, what: str) -> str:
    """A relative path of safe segments separated by '/' (no absolute path, no `..`, no empty segment)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        raise CheckpointError(f"{what}: {rel!r} is not a relative path inside the checkpoint; refusing it")
    for part in rel.split("/"):
        check_name(part, f"{what}: {rel!r}")
    return rel


def join_inside(base: str, rel: str, what: str) -> str:
    """base/rel, refused unless rel is a safe relative path and the result resolves inside base."""
    check_relpath(rel, what)
    path = os.path.join(base, *rel.split("/"))
    root = os.path.realpath(base)
    real = os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{what}: {path} resolves to {real}, outside {root}; refusing it")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------------------------------

def mismatch(path: str, expected: str, actual: str, where: str) -> CheckpointError:
    return CheckpointError(f"{path}: sha256 {actual}, but {where} lists {expected}; the file changed after the "
                           f"checkpoint was written (damaged or replaced), refusing to read it")


# ----------------------------------------------------------------------------------------------------------------------
# A private directory
# ----------------------------------------------------------------------------------------------------------------------

def private_dir(path: str, what: str = "checkpoint cache") -> str:
    """private_cache.private_dir, refusing with a CheckpointError."""
    return _private_dir(path, what, CheckpointError)


# ----------------------------------------------------------------------------------------------------------------------
# Pickles that build data only
# ----------------------------------------------------------------------------------------------------------------------

# What DeepSpeed 0.19.8 pickles into a ZeRO 0-3 checkpoint and its universal conversion besides tensors and plain
# containers (found by saving every stage and listing the pickles' globals): the optimiser shards hold the loss
# scaler (LossScaler: a scale and a flag, even with fp16 off), the ZeRO stage as an enum, and ZeRO 1/2's fragment
# addresses (a dataclass of two ints). Building them runs no code beyond setting attributes.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_allowed = False
_allow_lock = threading.Lock()


def _allow_deepspeed_types() -> None:
    """Add the DeepSpeed types to torch's weights_only allow-list, once (process-wide: a scoped safe_globals would
    be undone by another thread leaving its own). Without DeepSpeed installed there is nothing of it to read."""
    global _allowed
    if _allowed:
        return
    with _allow_lock:
        if _allowed:
            return
        import importlib

        import torch
        found = []
        for dotted in DEEPSPEED_SAFE_GLOBALS:
            module, name = dotted.rsplit(".", 1)
            try:
                found.append(getattr(importlib.import_module(module), name))
            except ImportError:
                continue
        torch.serialization.add_safe_globals(found)
        _allowed = True


def _refusal(where: str, exc: BaseException) -> CheckpointError:
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error: ([^\n]+)",
                                                                                text)
    what = f"it references {match.group(1)}" if match else (text.strip().splitlines() or ["?"])[-1]
    allowed = ", ".join(n.rsplit(".", 1)[1] for n in DEEPSPEED_SAFE_GLOBALS)
    return CheckpointError(f"{where}: refused to unpickle it: {what}, which a checkpoint file may not hold (only "
                           f"tensors, plain containers and {allowed}); loading it would run code from the file. "
                           f"Nothing of it was run")


def _name_of(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return getattr(f, "name", None) or repr(f)


def safe_load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
    """torch.load(f, weights_only=True) with the DeepSpeed allow-list, whatever weights_only the caller passed; a
    refused pickle raises a CheckpointError naming the file. Inside checked_loads, a path under a checkpoint being
    read must be one its manifest lists (CheckpointView.check_read)."""
    import pickle

    import torch
    kwargs.pop("weights_only", None)
    if isinstance(f, (str, os.PathLike)):
        for view in list(_VIEWS):
            view.check_read(os.fspath(f))
    _allow_deepspeed_types()
    load = _REAL_LOAD or torch.load  # inside checked_loads: the torch.load the patch replaced
    try:
        return load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refusal(_name_of(f), exc) from None


# ----------------------------------------------------------------------------------------------------------------------
# Reading a checkpoint's files: only what its manifest lists, every torch.load a safe one
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class CheckpointView:
    """A local directory holding a checkpoint's files (verified against its manifest), and what may be read there:
    the files the manifest lists, plus what is derived from them here (`derived`: path prefixes, such as an
    engine's universal conversion)."""

    root: str
    listed: set[str]
    where: str
    derived: tuple[str, ...] = field(default_factory=tuple)

    def check_read(self, path: str) -> None:
        """Refuse reading `path` when it lies in the checkpoint (before or after resolving symlinks) but is neither
        listed nor derived, or when it resolves outside the checkpoint."""
        root_abs, root_real = os.path.abspath(self.root), os.path.realpath(self.root)
        absolute, real = os.path.abspath(path), os.path.realpath(path)
        if _under(absolute, root_abs):
            rel = os.path.relpath(absolute, root_abs)
        elif _under(real, root_real):
            rel = os.path.relpath(real, root_real)
        else:
            return  # not a file of this checkpoint
        rel = rel.replace(os.sep, "/")
        if not (rel in self.listed or any(rel.startswith(p) for p in self.derived)):
            raise CheckpointError(f"{path}: not a file of checkpoint {self.where} (its manifest does not list it); "
                                  f"refusing to read it")
        if not _under(real, root_real):
            raise CheckpointError(f"{path}: resolves to {real}, outside checkpoint {self.where}; refusing to read it")


def _under(path: str, root: str) -> bool:
    return path.startswith(root.rstrip(os.sep) + os.sep)


_REAL_LOAD = None  # torch.load, while checked_loads has replaced it
_VIEWS: list[CheckpointView] = []
_patch_lock = threading.RLock()
_depth = 0


def _checked_torch_load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
    """torch.load while checked_loads is active (a pickle_module is dropped: the restricted unpickler is the one)."""
    return safe_load(f, map_location, **kwargs)


@contextlib.contextmanager
def checked_loads(view: CheckpointView | None = None) -> Iterator[None]:
    """While inside: every torch.load of the process is `safe_load` (weights_only with the allow-list, whatever the
    caller passed: DeepSpeed's loaders ask for full pickles), and a file under `view.root` that the manifest does
    not list is refused. Process-wide for its duration (torch.load is one function): another thread loading a full
    pickle meanwhile is refused too, never the other way round. Nests."""
    import torch
    global _REAL_LOAD, _depth
    with _patch_lock:
        if _depth == 0:
            _REAL_LOAD = torch.load
            torch.load = _checked_torch_load
        _depth += 1
        if view is not None:
            _VIEWS.append(view)
    try:
        yield
    finally:
        with _patch_lock:
            if view is not None:
                _VIEWS.remove(view)
            _depth -= 1
            if _depth == 0:
                torch.load, _REAL_LOAD = _REAL_LOAD, None


def hash_files(paths: Iterable[str], threads: int = 8) -> dict[str, str]:
    """{path: sha256} of local files, a few at a time (hashlib runs without the GIL)."""
    paths = list(paths)
    if len(paths) <= 1:
        return {p: sha256_file(p) for p in paths}
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths)))
