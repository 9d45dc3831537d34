"""Where a store lives: a local folder or an fsspec URL, behind one function, :func:`location`.

A location hands out whole files by key, read with a size limit the caller sets or memory-mapped at a size the
caller expects (fetched once into a local cache for remote URLs), and a zarr store for the writer. Local files are
opened without following a symbolic link in any part of the key and without blocking, and only regular files are
read: a link, FIFO or device inside a store is refused, never followed or waited on.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import stat
from pathlib import Path
from typing import Any

from .durable import fsync_dirs, sync_folders, sync_written, write_durably
from .errors import DamagedFileError, FormatError, StoreNotFoundError
from .write_lock import LOCK_KEY, Holder, Lease, LocalLock, local_holder, remote_holder

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*(/[A-Za-z0-9_][A-Za-z0-9_.]*)*$")  # no "..", no absolute paths
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def tidy_path(path: str | os.PathLike[str]) -> Path:
    """`path` without its `.` and `..` parts (what messages show), unless that names another place: after a
    symbolic link `..` leads to the link target's parent, so such a path is kept as it is."""
    text = os.fspath(path)
    tidy = os.path.normpath(text)
    if tidy != text and os.path.realpath(tidy) != os.path.realpath(text):
        return Path(text)
    return Path(tidy)


def check_key(key: str) -> str:
    """Refuse any key that could leave the store folder."""
    if not _KEY.match(key):
        raise FormatError(f"refusing store key {key!r}: keys are plain names joined by '/'")
    return key


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def file_sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_exactly(fd: int, size: int, key: str) -> bytes:
    data = os.pread(fd, size, 0) if size else b""
    if len(data) != size:
        raise FormatError(f"{key} changed size while it was read")
    return data


def _check_size(url: str, key: str, actual: int, limit: int, size: int | None) -> None:
    if size is not None and actual != size:
        raise DamagedFileError(f"it has {actual} bytes, its record says {size}")
    if actual > limit:
        raise FormatError(f"{url}: {key} has {actual} bytes, more than the {limit} a file of its kind may have")


def map_bytes(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, access=mmap.ACCESS_READ)


class LocalLocation:
    """A store folder on a local file system."""

    def __init__(self, path: str | os.PathLike[str]):
        text = str(path)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.root = tidy_path(Path(text).expanduser().absolute())
        self.url = str(self.root)
        self.is_local = True
        self._named: set[Path] = set()  # folders under the store whose names this process made durable

    def __repr__(self) -> str:
        return f"LocalLocation({self.url!r})"

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=read_only)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def open_file(self, key: str) -> int | None:
        """A read-only descriptor of the regular file `key`, or None when there is nothing at `key`.

        Every folder of the key is opened relative to the one before it with O_NOFOLLOW, and the file itself with
        O_NOFOLLOW | O_NONBLOCK, so no symbolic link is followed and no FIFO or device is waited on.
        """
        parts = check_key(key).split("/")
        try:
            folder = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FormatError(f"cannot open the store folder {self.root}: {exc.strerror}") from None
        try:
            for name in parts[:-1]:
                inner = os.open(name, _DIR_FLAGS, dir_fd=folder)
                os.close(folder)
                folder = inner
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise FormatError(f"{self.url}: refusing {key}: a symbolic link or not a regular file inside the "
                                  "store") from None
            raise FormatError(f"{self.url}: cannot open {key}: {exc.strerror}") from None
        finally:
            os.close(folder)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FormatError(f"{self.url}: refusing {key}: not a regular file (a FIFO, device or folder inside the "
                              "store)")
        return fd

    def read_file(self, key: str, *, limit: int, size: int | None = None) -> bytes | None:
        """The bytes of `key` (None when absent), refusing a file above `limit` bytes or other than `size`."""
        fd = self.open_file(key)
        if fd is None:
            return None
        try:
            actual = os.fstat(fd).st_size
            _check_size(self.url, key, actual, limit, size)
            return _read_exactly(fd, actual, key)
        finally:
            os.close(fd)

    def map_file(self, key: str, size: int) -> mmap.mmap | None:
        """A read-only memory map of `key`, which must have exactly `size` (> 0) bytes; None when absent."""
        fd = self.open_file(key)
        if fd is None:
            return None
        try:
            _check_size(self.url, key, os.fstat(fd).st_size, size, size)
            try:
                return map_bytes(fd, size)
            except (OSError, ValueError) as exc:  # address space exhausted, or a file system without mmap
                raise FormatError(f"{self.url}: cannot map {key} ({exc})") from None
        finally:
            os.close(fd)

    def lexists(self, key: str) -> bool:
        """Whether anything (a file, folder, link, ...) is at `key`, without following links."""
        return os.path.lexists(self.path(key))

    def write_file(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Write `key` atomically (temporary name, then rename) and, when `durable`, durably: the file fsynced before
        its rename, its folder and those above it up to the store folder fsynced after (logitstore/durable.py)."""
        import uuid

        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            write_durably(target, data)  # temporary name, fsync, rename, fsync of its folder
            if target.parent != self.root and target.parent not in self._named:  # a folder made for it
                sync_folders([target.parent.parent], self.root, self._named)
                self._named.add(target.parent)
            return
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")  # removed by remove_partials
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, target)

    def sync(self, keys: list[str]) -> None:
        """Make files written under the store (by this process, or by zarr for it) durable: each file, then the
        folders whose entries changed (logitstore/durable.py, `sync_written`)."""
        sync_written([self.path(key) for key in keys], self.root, self._named)

    def sync_name(self) -> None:
        """Make the store folder's own name durable (fsync the folder holding it), once, when it is planned."""
        fsync_dirs([self.root, self.root.parent])

    def read_bytes(self, key: str) -> bytes | None:
        """A file the writer wrote itself (no size limit; links and special files are still refused)."""
        return self.read_file(key, limit=1 << 62)

    def file_size(self, key: str) -> int | None:
        fd = self.open_file(key)
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return self.root.exists()

    def has_key(self, key: str) -> bool:
        return os.path.isfile(self.path(key)) and not os.path.islink(self.path(key))

    def top_level_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def acquire_write_lock(self) -> LocalLock:
        """Take the store's write lock (creating the folder), or raise StoreLockedError naming its holder."""
        return LocalLock.acquire(self.root, self.url)

    def write_lock_holder(self) -> Holder | None:
        """Who holds the write lock now (None: nobody); never blocks, never takes it."""
        return local_holder(self.root, self.url)

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in the store folder but the top-level names in `keep` (links are removed, never
        followed)."""
        import shutil

        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def remove_partials(self) -> int:
        """Delete temporary files left by writes that were killed before their rename."""
        removed = 0
        if self.root.is_dir():
            for p in self.root.rglob("*.partial"):
                if _PARTIAL.search(p.name):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    def total_bytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(p.lstat().st_size for p in self.root.rglob("*") if stat.S_ISREG(p.lstat().st_mode))


class RemoteLocation:
    """A store under an fsspec URL (s3://, gs://, memory://, ...).

    Files read by key are fetched once into a local cache folder and checked against the store's commit record by
    the reader, so training never hits the network per batch.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        if self.url.startswith(("s3://", "s3a://")):
            # Writers on other machines add files: never answer from a stale listing.
            self.storage_options.setdefault("use_listings_cache", False)
        self.fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._root = self._root.rstrip("/")
        self.is_local = False
        base = Path(cache_dir or os.environ.get("LOGITSTORE_CACHE") or Path.home() / ".cache" / "logitstore")
        self.cache_root = base / hashlib.sha256(self.url.encode()).hexdigest()[:24]

    def __repr__(self) -> str:
        return f"RemoteLocation({self.url!r})"

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)

    def _remote(self, key: str) -> str:
        return f"{self._root}/{check_key(key)}"

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._remote(key))
        except FileNotFoundError:
            return None

    def read_file(self, key: str, *, limit: int, size: int | None = None) -> bytes | None:
        """The object `key` (None when absent), refusing one above `limit` bytes or other than `size`."""
        actual = self.file_size(key)
        if actual is None:
            return None
        _check_size(self.url, key, actual, limit, size)
        data = self.read_bytes(key)
        if data is None:
            return None
        if len(data) != actual:
            raise FormatError(f"{key} changed size while it was read")
        return data

    def file_size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self._remote(key)))
        except FileNotFoundError:
            return None

    def map_file(self, key: str, size: int) -> mmap.mmap | None:
        """A memory map of a local copy of `key` (fetched once into the cache); the reader checks it against the
        commit record and drops the copy when it differs."""
        cache = LocalLocation(self.cache_root)
        try:
            mapped = cache.map_file(key, size) if cache.has_key(key) else None
        except DamagedFileError:  # a stale copy: fetch again
            mapped = None
        if mapped is not None:
            return mapped
        data = self.read_file(key, limit=size, size=size)
        if data is None:
            return None
        cache.write_file(key, data, durable=False)  # a cache: checked on every read, fetched again if lost
        return cache.map_file(key, size)

    def lexists(self, key: str) -> bool:
        return bool(self.fs.exists(self._remote(key)))

    def write_file(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self.fs.pipe_file(self._remote(key), data)  # an object is durable once its PUT returns

    def sync(self, keys: list[str]) -> None:
        pass  # nothing to flush: every object was durable when its write returned

    def sync_name(self) -> None:
        pass

    def drop_cached(self, key: str) -> None:
        (self.cache_root / check_key(key)).unlink(missing_ok=True)

    def exists(self) -> bool:
        return bool(self.fs.exists(self._root))

    def has_key(self, key: str) -> bool:
        return bool(self.fs.exists(self._remote(key)))

    def top_level_names(self) -> list[str]:
        if not self.fs.exists(self._root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._root, detail=False))

    def acquire_write_lock(self) -> Lease:
        """Take the store's write lease, or raise StoreLockedError naming its holder."""
        return Lease.acquire(self.fs, self._remote(LOCK_KEY), self.url)

    def write_lock_holder(self) -> Holder | None:
        """Who holds the write lease now (None: nobody, or it expired)."""
        return remote_holder(self.fs, self._remote(LOCK_KEY))

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove every object under the store but the top-level names in `keep`."""
        if not self.fs.exists(self._root):
            return
        for path in self.fs.ls(self._root, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1] not in keep:
                self.fs.rm(path, recursive=True)

    def remove_partials(self) -> int:
        return 0  # object stores write whole objects; nothing is left half-written

    def total_bytes(self) -> int:
        return int(sum(self.fs.du(self._root, total=False).values())) if self.exists() else 0


Location = LocalLocation | RemoteLocation
WriteLock = LocalLock | Lease


def location(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Location:
    """The one place that turns a user's path or URL into a store location."""
    if is_url(path):
        return RemoteLocation(str(path), storage_options)
    if storage_options:
        raise ValueError("storage options apply to URLs only")
    return LocalLocation(path)


def require_store(loc: Location) -> None:
    if not loc.lexists("zarr.json"):
        raise StoreNotFoundError(f"no logitstore store at {loc.url}")
