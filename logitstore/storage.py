"""Where a store lives: a local folder or an fsspec URL, behind one function, :func:`location`.

A location hands out a zarr store for metadata and arrays, and whole files by key for the hot read path
(memory-mapped locally; fetched once into a local cache for remote URLs).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any

from .errors import FormatError, StoreNotFoundError

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*(/[A-Za-z0-9_][A-Za-z0-9_.]*)*$")  # no "..", no absolute paths
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def check_key(key: str) -> str:
    """Refuse any key that could leave the store folder."""
    if not _KEY.match(key):
        raise FormatError(f"refusing store key {key!r}: keys are plain names joined by '/'")
    return key


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def file_crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class LocalLocation:
    """A store folder on a local file system."""

    def __init__(self, path: str | os.PathLike[str]):
        text = str(path)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.root = Path(text).expanduser().absolute()
        self.url = str(self.root)
        self.is_local = True

    def __repr__(self) -> str:
        return f"LocalLocation({self.url!r})"

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=read_only)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_file(self, key: str) -> Path | None:
        """A local path to the file `key`, or None when it does not exist."""
        p = self.path(key)
        return p if p.is_file() else None

    def read_bytes(self, key: str) -> bytes | None:
        p = self.local_file(key)
        return p.read_bytes() if p is not None else None

    def file_size(self, key: str) -> int | None:
        p = self.local_file(key)
        return p.stat().st_size if p is not None else None

    def exists(self) -> bool:
        return self.root.exists()

    def has_key(self, key: str) -> bool:
        return self.path(key).is_file()

    def top_level_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

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
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.is_dir() else 0


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

    def file_size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self._remote(key)))
        except FileNotFoundError:
            return None

    def local_file(self, key: str) -> Path | None:
        target = self.cache_root / check_key(key)
        if target.is_file():
            return target
        data = self.read_bytes(key)
        if data is None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".download")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return target

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

    def remove_partials(self) -> int:
        return 0  # object stores write whole objects; nothing is left half-written

    def total_bytes(self) -> int:
        return int(sum(self.fs.du(self._root, total=False).values())) if self.exists() else 0


Location = LocalLocation | RemoteLocation


def location(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Location:
    """The one place that turns a user's path or URL into a store location."""
    if is_url(path):
        return RemoteLocation(str(path), storage_options)
    if storage_options:
        raise ValueError("storage options apply to URLs only")
    return LocalLocation(path)


def require_store(loc: Location) -> None:
    if not loc.has_key("zarr.json"):
        raise StoreNotFoundError(f"no logitstore store at {loc.url}")
