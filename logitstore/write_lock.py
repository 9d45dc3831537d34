"""One writer per store: the write lock a writer holds for its whole run (docs/FORMAT.md, "Write lock").

On a local file system the lock is a kernel lock on the file ``STORE/write.lock``: an open-file-description lock
(Linux's ``F_OFD_SETLK``; ``flock`` elsewhere), which the kernel drops when its holder's process ends however it
ends, so a killed writer leaves no stale lock. The file's bytes only name the holder (process, host, since) for the
message a second writer gets; who holds the lock is the kernel's word, never the file's. The holder removes the
file when it lets go.

On an object store the lock is a lease: the object ``STORE/write.lock`` holding the same record plus an expiry,
created only where none exists (S3's ``If-None-Match: *``, fsspec's ``mode="create"``), renewed by its holder
every ``RENEW_SECONDS`` (S3: only if it is still the object the holder wrote, ``If-Match``), and deleted when the
holder lets go. A lease that has expired, or whose holder is provably gone (a process on this machine that no
longer runs), may be taken over. Backends without conditional writes get the same protocol with a read-back
instead of the condition, which two writers starting within a second of each other can both pass.

A store from elsewhere is hostile input: its lock file is never followed if it is a link, never read if it is not
a regular file, read only up to ``MAX_RECORD_BYTES``, and its record is shown, never believed.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import re
import socket
import stat
import struct
import threading
import time
import uuid
from typing import Any

from .errors import FormatError, StoreLockedError, printable

LOCK_KEY = "write.lock"
LEASE_SECONDS = 120.0  # how long an object-store lease holds without renewal
RENEW_SECONDS = 30.0
SETTLE_SECONDS = 1.0  # read-back delay where a backend has no conditional create
MAX_RECORD_BYTES = 4096

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_FLOCK = "@hhqqi4x"  # Linux struct flock: l_type, l_whence, l_start, l_len, l_pid (then padding)


def _utc(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a store's write lock, as its record says (None fields: not recorded or not readable)."""

    pid: int | None = None
    host: str | None = None
    since: str | None = None
    expires: str | None = None  # leases only
    process: str | None = None  # boot, pid namespace, pid and start time: tells a gone process on this machine
    token: str | None = None  # leases only: which writer wrote the record

    def describe(self) -> str:
        if self.pid is None:
            return "a writer that has not recorded itself yet"
        return (f"process {self.pid} on host {printable(self.host or 'unknown')}, since "
                f"{self.since or 'an unrecorded time'}")

    def record(self) -> bytes:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None},
                          sort_keys=True).encode()


def parse_record(raw: bytes | None) -> Holder:
    """The holder a lock record names; fields that are missing or malformed are left out (never trusted)."""
    try:
        doc = json.loads(raw[:MAX_RECORD_BYTES].decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        return Holder()

    def text(key: str, pattern: re.Pattern[str] | None = None) -> str | None:
        value = doc.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= 255 or (pattern and not pattern.fullmatch(value)):
            return None
        return value

    pid = doc.get("pid")
    return Holder(pid if type(pid) is int and 0 < pid < 1 << 31 else None, text("host"), text("since", _TIME),
                  text("expires", _TIME), text("process"), text("token"))


def _process_identity(pid: int) -> str | None:
    """The identity of process `pid` on this machine: boot, pid namespace, pid and start time (None where /proc
    cannot tell, or the process does not run)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return None
    return f"{boot}:{namespace}:{pid}:{start}"


def _this_holder(lease: bool) -> Holder:
    now = time.time()
    return Holder(os.getpid(), socket.gethostname() or "unknown", _utc(now),
                  _utc(now + LEASE_SECONDS) if lease else None, _process_identity(os.getpid()),
                  uuid.uuid4().hex if lease else None)


def _gone(holder: Holder) -> bool:
    """Whether the holder is a process of this machine (same boot and pid namespace) that no longer runs."""
    if holder.pid is None or holder.process is None:
        return False
    mine = _process_identity(os.getpid())
    if mine is None or mine.rsplit(":", 2)[0] != holder.process.rsplit(":", 2)[0]:
        return False
    return _process_identity(holder.pid) != holder.process


def refusal(url: str, holder: Holder) -> StoreLockedError:
    """What a second writer is told."""
    lease = ""
    if holder.expires is not None:
        lease = (f"; if that process is gone, its lease ends at {holder.expires}, or delete {url}/{LOCK_KEY} once "
                 "you are sure no writer runs")
    return StoreLockedError(f"{url} is being written by another writer ({holder.describe()}){lease}; wait for it to "
                            "finish (or stop it) and run this command again, or write to another path")


# ---- local folders -------------------------------------------------------------------------------------------------

def _lock_struct(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _lock_struct(fcntl.F_WRLCK))
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _is_locked(fd: int) -> bool | None:
    """Whether another open file holds the lock; None where the kernel cannot be asked without taking it."""
    import fcntl

    if not hasattr(fcntl, "F_OFD_GETLK"):
        return None
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _lock_struct(fcntl.F_WRLCK))
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


def _open_lock_file(folder: int, url: str, *, create: bool) -> int | None:
    """The lock file, opened relative to the store folder without following a link or blocking; None when absent
    (and not created). A link, folder, FIFO or device there is refused."""
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | _NOFOLLOW
    try:
        fd = os.open(LOCK_KEY, flags, 0o644, dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
            raise FormatError(f"{url}: refusing {LOCK_KEY}: a symbolic link or not a regular file inside the "
                              "store") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{url}: refusing {LOCK_KEY}: a symbolic link or not a regular file inside the store")
    return fd


def _read_record(fd: int) -> Holder:
    return parse_record(os.pread(fd, MAX_RECORD_BYTES, 0))


def _same_file(fd: int, folder: int) -> bool:
    try:
        there = os.stat(LOCK_KEY, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


class LocalLock:
    """A held kernel lock on STORE/write.lock."""

    def __init__(self, url: str, folder: int, fd: int):
        self.url, self._folder, self._fd = url, folder, fd
        self._owner = os.getpid()  # a forked child shares the lock, and must not let it go for its parent

    @classmethod
    def acquire(cls, root: os.PathLike[str], url: str) -> LocalLock:
        os.makedirs(root, exist_ok=True)
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            # A holder that lets go removes the file; one opened just before that is locked but nameless: retry.
            for _ in range(100):
                fd = _open_lock_file(folder, url, create=True)
                assert fd is not None
                if not _try_lock(fd):
                    holder = _read_record(fd)
                    for _ in range(20):  # the holder writes its record just after it locks
                        if holder.pid is not None:
                            break
                        time.sleep(0.05)
                        holder = _read_record(fd)
                    os.close(fd)
                    raise refusal(url, holder)
                if _same_file(fd, folder):
                    try:
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, _this_holder(lease=False).record(), 0)
                    except BaseException:
                        os.unlink(LOCK_KEY, dir_fd=folder)
                        os.close(fd)
                        raise
                    return cls(url, folder, fd)
                os.close(fd)
            raise StoreLockedError(f"{url}: {LOCK_KEY} keeps changing; another process is taking and dropping the "
                                   "store's write lock")
        except BaseException:
            os.close(folder)
            raise

    def check(self) -> None:
        """Raise if the lock was lost (a kernel lock is held until it is released)."""

    def release(self) -> None:
        if self._fd < 0 or os.getpid() != self._owner:
            return
        try:
            if _same_file(self._fd, self._folder):
                os.unlink(LOCK_KEY, dir_fd=self._folder)
        except OSError:
            pass  # the kernel lock goes with the descriptor; a file left behind names a holder that is gone
        finally:
            os.close(self._fd)
            os.close(self._folder)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the kernel lets go anyway
            pass


def local_holder(root: os.PathLike[str], url: str) -> Holder | None:
    """The holder of the local store's lock, or None when no process holds it (or the kernel cannot tell without
    taking it). Never blocks and never takes the lock; a lock file that is a link or not a regular file is
    ignored."""
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError:
        return None
    try:
        fd = _open_lock_file(folder, url, create=False)
    except (FormatError, OSError):
        return None
    finally:
        os.close(folder)
    if fd is None:
        return None
    try:
        return _read_record(fd) if _is_locked(fd) else None
    finally:
        os.close(fd)


# ---- object stores -------------------------------------------------------------------------------------------------

class _Conditions:
    """The conditional writes a backend offers: create-if-absent, and for S3 replace and delete if unchanged."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.s3 = hasattr(fs, "call_s3") and hasattr(fs, "split_path")

    def create(self, data: bytes) -> str | None:
        """Write the object only if none exists; its ETag where the backend gives one. FileExistsError if one
        exists; NotImplementedError if the backend cannot make the condition."""
        try:
            answer = self.fs.pipe_file(self.path, data, mode="create")
        except (TypeError, ValueError, NotImplementedError):
            raise NotImplementedError from None
        return answer.get("ETag") if isinstance(answer, dict) else None

    def replace(self, data: bytes, etag: str | None) -> str | None:
        """Overwrite the object only if it is still the one with `etag` (S3); elsewhere, unconditionally."""
        if self.s3 and etag is not None:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
            except OSError as exc:
                if "pre-condition" in str(exc) or "precondition" in str(exc).lower():
                    raise FileExistsError(str(exc)) from None
                raise
            self.fs.invalidate_cache(self.path)
            return answer.get("ETag")
        self.fs.pipe_file(self.path, data)
        return None

    def delete(self, etag: str | None) -> None:
        if self.s3 and etag is not None:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except OSError:
                return  # no longer ours (or gone): leave it
            self.fs.invalidate_cache(self.path)
            return
        self.fs.rm_file(self.path)

    def read(self) -> tuple[Holder, str | None] | None:
        """The current lease and its ETag; None when there is none."""
        try:
            info = self.fs.info(self.path)
            if int(info.get("size") or 0) > MAX_RECORD_BYTES:
                return Holder(), info.get("ETag")
            return parse_record(self.fs.cat_file(self.path)), info.get("ETag")
        except FileNotFoundError:
            return None


def _expired(holder: Holder) -> bool:
    if holder.expires is None:
        return True  # a lease without a readable expiry is not a lease
    return holder.expires < _utc(time.time())


class Lease:
    """A held lease on STORE/write.lock in an object store, renewed by a background thread."""

    def __init__(self, url: str, conditions: _Conditions, holder: Holder, etag: str | None):
        self.url, self._conditions, self._holder, self._etag = url, conditions, holder, etag
        self._lost: str | None = None
        self._owner = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="logitstore-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, fs: Any, path: str, url: str) -> Lease:
        conditions = _Conditions(fs, path)
        mine = _this_holder(lease=True)
        try:
            etag = conditions.create(mine.record())
        except FileExistsError:
            current = conditions.read()
            if current is not None and not (_expired(current[0]) or _gone(current[0])):
                raise refusal(url, current[0]) from None
            try:  # take over the stale lease, only if it is still that one
                etag = conditions.replace(mine.record(), current[1] if current else None)
            except FileExistsError:
                theirs = conditions.read()
                raise refusal(url, theirs[0] if theirs else Holder()) from None
        except NotImplementedError:
            etag = cls._write_and_read_back(conditions, mine, url)
        return cls(url, conditions, mine, etag)

    @staticmethod
    def _write_and_read_back(conditions: _Conditions, mine: Holder, url: str) -> str | None:
        current = conditions.read()
        if current is not None and not (_expired(current[0]) or _gone(current[0])):
            raise refusal(url, current[0])
        conditions.replace(mine.record(), None)
        time.sleep(SETTLE_SECONDS)
        now = conditions.read()
        if now is None or now[0].token != mine.token:
            raise refusal(url, now[0] if now else Holder())
        return None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            renewed = dataclasses.replace(self._holder, expires=_utc(time.time() + LEASE_SECONDS))
            try:
                if not self._conditions.s3:
                    now = self._conditions.read()
                    if now is None or now[0].token != self._holder.token:
                        raise FileExistsError
                self._etag = self._conditions.replace(renewed.record(), self._etag)
                self._holder = renewed
            except FileExistsError:
                self._lost = "another writer took over its lease after it expired"
                return
            except OSError as exc:  # the object store is unreachable: try again at the next renewal
                if _expired(self._holder):
                    self._lost = f"its lease expired while the object store could not be reached ({exc})"
                    return

    def check(self) -> None:
        """Raise if the lease was lost: nothing more may be written under it."""
        if self._lost is not None:
            raise StoreLockedError(f"{self.url}: this writer lost the store's write lock ({self._lost}); stop, and "
                                   "run the command again once no other writer runs")

    def release(self) -> None:
        if self._stop.is_set() or os.getpid() != self._owner:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._lost is None:
            try:
                self._conditions.delete(self._etag)
            except OSError:
                pass  # it expires on its own

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the lease expires anyway
            pass


def remote_holder(fs: Any, path: str) -> Holder | None:
    """The holder of an object store's lease, or None when there is none or it has expired."""
    try:
        current = _Conditions(fs, path).read()
    except OSError:
        return None
    if current is None or _expired(current[0]):
        return None
    return current[0]
