"""This user's local caches: one root per user, `$TMPDIR/dmvae-<uid>`, and under it one directory per kind
(`checkpoints`, `artifacts`, `stream`), each created 0700 and refused unless lstat shows a real directory (not a
symlink) owned by this uid and writable by nobody else. Another local user can then neither plant files in a cache
nor point it elsewhere. `local_files` walks a directory to upload, never following a symlink."""
from __future__ import annotations

import logging
import os
import stat
import tempfile
from typing import Iterator

from .errors import UserError

log = logging.getLogger(__name__)


class PrivateCacheError(UserError):
    """A cache directory someone else could write to, or that points elsewhere; names the path."""


def private_dir(path: str, what: str = "cache", error: type[UserError] = PrivateCacheError) -> str:
    """Create `path` (mode 0700) unless it exists, then refuse it (raising `error`) unless lstat shows a real
    directory (not a symlink) owned by this user and writable by nobody else. Its parent must exist."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise error(f"{what} {path}: cannot create it ({exc}); set TMPDIR to a directory of yours") from exc
    st = os.lstat(path)
    uid = os.geteuid()
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = f"it is a symlink (to {os.readlink(path)})"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory"
    elif st.st_uid != uid:
        problem = f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"its mode {stat.S_IMODE(st.st_mode):04o} lets group or others write into it"
    if problem:
        raise error(f"{what} {path}: {problem}; refusing to keep files there (someone else could plant them). "
                    f"Remove it, or set TMPDIR to a directory of yours")
    return path


def user_root(error: type[UserError] = PrivateCacheError) -> str:
    """$TMPDIR/dmvae-<uid>, this user's root of every local cache (created 0700 and checked)."""
    return private_dir(os.path.join(tempfile.gettempdir(), f"dmvae-{os.geteuid()}"), "cache root", error)


def user_cache(kind: str, what: str | None = None, error: type[UserError] = PrivateCacheError) -> str:
    """The private directory of one kind of cache under user_root() (both checked with private_dir)."""
    return private_dir(os.path.join(user_root(error), kind), what or f"{kind} cache", error)


def named_private_dir(path: str, what: str, error: type[UserError] = PrivateCacheError) -> str:
    """A cache directory the user named: its parents made as needed, the directory itself checked."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return private_dir(path, what, error)


def local_files(local_dir: str, what: str = "upload") -> Iterator[tuple[str, str]]:
    """(path, relative path with '/') of every regular file under `local_dir`, sorted; a symlink (to a file or a
    directory) is skipped with a warning naming it, never followed: a planted link to a secret stays local."""
    for dirpath, dirnames, files in os.walk(local_dir):
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                log.warning(f"{what}: skipping {path}: a symlink (to {os.readlink(path)}); not following it")
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                log.warning(f"{what}: skipping {path}: a symlink (to {os.readlink(path)}); not uploading it")
                continue
            if stat.S_ISREG(st.st_mode):
                yield path, os.path.relpath(path, local_dir).replace(os.sep, "/")
