"""Writes that survive a power cut.

A write is on disk only once it is fsynced: the file for its bytes, its folder for its name (a new file, a rename,
a new folder). Until then a crash may keep a rename and lose the bytes it names, so anything that records work as
done (a store's commit row, its header, a checkpoint's marker) is written only after what it names is durable, and
counts only once it is durable itself. These are the primitives; the store writer and the training side use them.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Folders on file systems that cannot sync them (some network and FUSE file systems) answer one of these; their
# names are as durable as that file system makes them, and there is nothing more to ask for.
_CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush the bytes of the file at `path` (not following a symbolic link) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush the entries of the folder at `path` (new names, renames, removals) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC:
            raise
    finally:
        os.close(fd)


def fsync_dirs(folders: Iterable[str | os.PathLike[str]]) -> None:
    """fsync each folder once, deepest first (a new folder's own entries before its name in its parent)."""
    for folder in sorted({Path(f) for f in folders}, key=lambda p: (-len(p.parts), str(p))):
        fsync_dir(folder)


def sync_written(paths: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str],
                 named: set[Path] | None = None) -> None:
    """Make files already written (renamed into place) under `root` durable: fsync each (one that is absent, e.g.
    removed, is skipped), then the folders whose entries changed, deepest first: each file's folder, and above it
    each folder up to `root` that may hold a new name (see :func:`new_names`)."""
    named = set() if named is None else named
    folders: set[Path] = set()
    for path in paths:
        try:
            fsync_file(path)
        except FileNotFoundError:
            pass
        folders.add(Path(path).parent)
    sync_folders(folders, root, named)


def sync_folders(folders: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str],
                 named: set[Path]) -> None:
    """fsync `folders` (whose entries changed) and the folders above them that may hold a new name, once each.
    `named` holds the folders whose own names are durable already (their parents were fsynced after they were
    made): they stop the walk up to `root`, and the folders whose names this call makes durable are added to it.
    Each fsync flushes the device, so a writer that keeps `named` across shards fsyncs only what each shard
    changes."""
    root = Path(root)
    changed: set[Path] = set()
    made: set[Path] = set()
    for folder in map(Path, folders):
        changed.add(folder)
        while folder != root and folder not in named and folder != folder.parent:
            made.add(folder)
            folder = folder.parent
            changed.add(folder)
    fsync_dirs(f for f in changed if f.is_dir())
    named.update(f for f in made if f.is_dir())


def replace_durably(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename `source` over `target` (atomic on POSIX), then fsync the folders whose entries changed. `source`'s
    bytes must be durable already (see :func:`write_durably`)."""
    os.replace(source, target)
    folders = {Path(target).parent, Path(source).parent}
    fsync_dirs(folders)


def write_durably(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write `path` whole or not at all, and durably: the bytes go to a temporary file in the same folder (named
    ``NAME.<32 hex>.partial``), which is fsynced, renamed over `path`, and the folder fsynced. After a crash `path`
    holds its old bytes or the new ones, never a part; a temporary file may be left behind."""
    target = Path(path)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
