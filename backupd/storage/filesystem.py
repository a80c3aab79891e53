"""Filesystem storage: one file per key under a root directory.

An upload is written to a hidden temporary file next to its final path and
renamed into place only after the bytes and the directory entry are on disk,
so a crash leaves either the old state or the whole object, never half of it.
Every blocking call runs in a worker thread; writes are batched so the event
loop hands the thread about a MiB at a time. Every `EARLY_SYNC` bytes an
fdatasync starts in the background (never waited for while writing), so the
final fsync before the rename finds little left to flush: the cost of making a
backup durable overlaps with the dump instead of following it.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from backupd.config.model import FilesystemStorage
from backupd.errors import NotFound, PreconditionFailed, StorageError
from backupd.storage.base import (
    MAX_VERSIONED_BYTES,
    BaseStore,
    BaseUpload,
    IncompleteUpload,
    MiB,
    ObjectInfo,
    Versioned,
    check_key,
    check_prefix,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

DIR_MODE = 0o700
FILE_MODE = 0o600
PARTIAL_MARK = ".partial-"
WRITE_BATCH = MiB  # bytes gathered before one trip to the worker thread
EARLY_SYNC = 64 * MiB  # bytes written between two background fdatasyncs


def is_partial(name: str) -> bool:
    """Whether a file name is an upload in progress (or left by a crash)."""
    return name.startswith(".") and PARTIAL_MARK in name


def _describe(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return reason[:1].lower() + reason[1:]


def _make_dirs(path: Path, stop: Path | None = None) -> None:
    """Create `path` and its missing parents with mode 0700 (down from `stop`)."""
    missing: list[Path] = []
    current = path
    while current != stop and not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Remove now-empty directories from `path`'s parent up to, not including, `root`."""
    directory = path.parent
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _walk(root: Path, folder: str, partial: bool) -> list[tuple[str, os.stat_result]]:
    """Regular files under `folder` as (key, stat); only temporary upload files when `partial`."""
    start = root.joinpath(*folder.split("/")) if folder else root
    files: list[tuple[str, os.stat_result]] = []
    stack = [(start, folder)]
    while stack:
        directory, rel = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            key = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), key))
            elif entry.is_file(follow_symlinks=False) and is_partial(entry.name) == partial:
                try:
                    files.append((key, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
    return files


def _list_objects(root: Path, prefix: str) -> list[ObjectInfo]:
    found = [
        ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))
        for key, st in _walk(root, prefix.rpartition("/")[0], False)
        if key.startswith(prefix)
    ]
    found.sort(key=lambda info: info.key)
    return found


def _unlink_and_prune(path: Path, root: Path) -> None:
    """Remove a file (a missing one is fine), then its parents that became empty."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _remove_empty_parents(path, root)


def _delete_files(root: Path, paths: dict[str, Path]) -> dict[str, str]:
    """Delete every file it can; returns why each failed one could not be deleted."""
    failures: dict[str, str] = {}
    for key, path in paths.items():
        try:
            _unlink_and_prune(path, root)
        except OSError as exc:
            failures[key] = _describe(exc)
    return failures


def _open_regular(path: Path) -> int:
    """Open a regular file for reading; a directory or device counts as missing."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CAS_LOCK = ".cas.partial-lock"  # the lock file of conditional replaces, in the root
CLOCK = ".clock.partial-clock"  # touched to read the filesystem's own time


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _write_temp(path: Path, data: bytes) -> Path:
    _make_dirs(path.parent)
    temp = path.parent / f".{path.name}{PARTIAL_MARK}{secrets.token_hex(6)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return temp


def _create_exclusive(path: Path, data: bytes) -> str:
    temp = _write_temp(path, data)
    try:
        os.link(temp, path)  # EEXIST if the key exists: the atomic test-and-set
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return _etag(data)


def _replace_if_match(root: Path, path: Path, data: bytes, etag: str) -> str | None:
    fd = os.open(root / CAS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as current:
                if _etag(current.read(MAX_VERSIONED_BYTES + 1)) != etag:
                    return None
        except FileNotFoundError:
            return None
        temp = _write_temp(path, data)
        try:
            os.rename(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return _etag(data)
    finally:
        os.close(fd)  # releases the lock


def _read_versioned(root: Path, path: Path) -> tuple[bytes, float, datetime]:
    fd = _open_regular(path)
    try:
        modified = os.fstat(fd).st_mtime_ns
        data = os.read(fd, MAX_VERSIONED_BYTES + 1)
    finally:
        os.close(fd)
    clock = root / CLOCK
    cfd = os.open(clock, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.utime(cfd)  # no time given: the filesystem's (on NFS, the server's) now
        now = os.fstat(cfd).st_mtime_ns
    finally:
        os.close(cfd)
    return data, (now - modified) / 1e9, datetime.fromtimestamp(modified / 1e9, UTC)


class _PartialFile:
    """The blocking half of an upload; every method runs in a worker thread, one at a
    time, except `sync_data`, which may run alongside `write`."""

    def __init__(self, root: Path, path: Path) -> None:
        self.root = root
        self.path = path
        self.temp = path.with_name(f".{path.name}{PARTIAL_MARK}{secrets.token_hex(8)}")
        self.fd: int | None = None
        self.published = False

    def create(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(3):  # a concurrent delete may remove the fresh parent directory
            _make_dirs(self.path.parent, self.root)
            try:
                self.fd = os.open(self.temp, flags, FILE_MODE)
                return
            except FileNotFoundError:
                continue
        self.fd = os.open(self.temp, flags, FILE_MODE)

    def write(self, chunks: list[bytes]) -> None:
        assert self.fd is not None
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view) :]

    def sync_data(self) -> None:
        """Flush what is written so far (fdatasync); any error also fails `publish`."""
        assert self.fd is not None
        os.fdatasync(self.fd)

    def publish(self, chunks: list[bytes], expected: int) -> int:
        """Write the rest, make it durable, rename it into place; returns the size on disk."""
        self.write(chunks)
        assert self.fd is not None
        os.fsync(self.fd)
        size = os.fstat(self.fd).st_size
        os.close(self.fd)
        self.fd = None
        if size != expected:
            raise StorageError(f"{self.path}: wrote {expected} bytes but the file has {size}")
        os.rename(self.temp, self.path)
        self.published = True
        _fsync_dir(self.path.parent)
        return size

    def discard(self) -> None:
        """Close and remove whatever this upload left, the published file included."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            (self.path if self.published else self.temp).unlink()
        except FileNotFoundError:
            pass
        self.published = False
        _remove_empty_parents(self.path, self.root)


class FilesystemUpload(BaseUpload):
    """One object being written to a temporary file, renamed into place by `complete()`.

    The flow is `BaseUpload`'s. A write stuck in the kernel (a hung disk or NFS
    server) cannot be interrupted: past `CLEANUP_DEADLINE` the cleanup goes on
    in the background and removes the file once the write returns.
    """

    DISCARD_INTERRUPTIBLE = False
    OVERDUE_NOTE = "a write is still stuck; the file is removed once it returns"

    def __init__(self, store_name: str, key: str, file: _PartialFile) -> None:
        super().__init__(key)
        self._store_name = store_name
        self._file = file
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._size = 0
        self._io: asyncio.Task[object] | None = None
        self._sync: asyncio.Task[None] | None = None  # a background fdatasync
        self._unsynced = 0

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        self._size += len(data)
        if self._pending_size >= WRITE_BATCH:
            self._unsynced += self._pending_size
            chunks, self._pending, self._pending_size = self._pending, [], 0
            await self._in_thread(self._file.write, chunks)
            if self._unsynced >= EARLY_SYNC and (self._sync is None or self._sync.done()):
                self._check_sync()
                self._unsynced = 0
                self._sync = asyncio.ensure_future(asyncio.to_thread(self._file.sync_data))

    async def _complete(self) -> int:
        chunks, self._pending, self._pending_size = self._pending, [], 0
        if self._sync is not None:
            await asyncio.wait([self._sync])
            self._check_sync()
        return await self._in_thread(self._file.publish, chunks, self._size)

    def _release_buffers(self) -> None:
        self._pending = []

    def _where(self) -> dict[str, Any]:
        return {"storage": self._store_name, "path": str(self._file.temp)}

    def _check_sync(self) -> None:
        """Raise if the last background fdatasync failed.

        Its error must not be dropped: the kernel reports a writeback error once
        per open file, so the final fsync would not see it again.
        """
        if self._sync is None or not self._sync.done():
            return
        sync, self._sync = self._sync, None
        error = sync.exception() if not sync.cancelled() else None
        if isinstance(error, OSError):
            raise self._write_error(error) from error
        if error is not None:
            raise error

    async def _in_thread(self, func: Callable[..., T], *args: object) -> T:
        """Run one blocking step; a cancelled caller leaves it to `_discard` to wait for."""
        task = asyncio.ensure_future(asyncio.to_thread(func, *args))
        self._io = task
        try:
            return await asyncio.shield(task)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> StorageError:
        return StorageError(
            f"filesystem storage {self._store_name}: cannot write {self._file.path}: "
            f"{_describe(exc)}"
        )

    async def _discard(self) -> None:
        if self._sync is not None:  # the fd stays open until the fdatasync is done with it
            await asyncio.wait([self._sync])
            if not self._sync.cancelled():
                self._sync.exception()
        if self._io is not None:
            await asyncio.wait([self._io])  # the thread cannot be interrupted: let it finish
            if not self._io.cancelled():
                self._io.exception()  # consumed here; the caller already saw it
        try:
            await asyncio.to_thread(self._file.discard)
        except OSError as exc:
            raise StorageError(
                f"filesystem storage {self._store_name}: cannot remove {self._file.temp}: "
                f"{_describe(exc)}"
            ) from exc


class FilesystemStore(BaseStore):
    """A directory tree: keys are relative paths, files 0600, directories 0700."""

    def __init__(self, cfg: FilesystemStorage) -> None:
        self.name = cfg.name
        self.root = Path(cfg.path).absolute()
        self._cas_lock = asyncio.Lock()  # one compare-and-swap at a time in this process

    def _path(self, key: str) -> Path:
        check_key(key)
        if any(is_partial(part) for part in key.split("/")):
            raise StorageError(f"invalid storage key {key!r}: names a temporary upload file")
        return self.root.joinpath(*key.split("/"))

    async def _run(self, action: str, func: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(func, *args)
        except OSError as exc:
            raise StorageError(
                f"filesystem storage {self.name}: {action}: {_describe(exc)}"
            ) from exc

    async def open(self) -> None:
        """Create the root directory (0700, parents too) if it is missing."""
        await self._run(f"cannot create {self.root}", _make_dirs, self.root)

    async def open_upload(self, key: str) -> FilesystemUpload:
        file = _PartialFile(self.root, self._path(key))
        await self._run(f"cannot create {file.path}", file.create)
        return FilesystemUpload(self.name, key, file)

    async def open_read(self, key: str, chunk_size: int = MiB) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fd = await asyncio.to_thread(_open_regular, path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"filesystem storage {self.name}: {key} not found") from None
        except OSError as exc:
            raise StorageError(
                f"filesystem storage {self.name}: cannot read {path}: {_describe(exc)}"
            ) from exc
        try:
            while chunk := await self._run(f"cannot read {path}", os.read, fd, chunk_size):
                yield chunk
        finally:
            os.close(fd)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        check_prefix(prefix)
        return await self._run(f"cannot list {self.root}", _list_objects, self.root, prefix)

    async def delete(self, keys: Sequence[str]) -> builtins.list[str]:
        paths = {key: self._path(key) for key in keys}
        failures = await asyncio.to_thread(_delete_files, self.root, paths)
        for key, error in failures.items():
            log.warning("delete_failed", storage=self.name, key=key, error=error)
        return builtins.list(failures)

    async def list_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        files = await self._run(f"cannot list {self.root}", _walk, self.root, "", True)
        uploads = []
        for rel, st in files:
            folder, _, name = rel.rpartition("/")
            base = name[1:].rpartition(PARTIAL_MARK)[0]
            key = f"{folder}/{base}" if folder else base
            started = datetime.fromtimestamp(st.st_mtime, UTC)
            uploads.append(IncompleteUpload(key=key, upload_id=rel, started=started))
        uploads.sort(key=lambda upload: upload.upload_id)
        return uploads

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        check_key(upload.upload_id)
        if not is_partial(upload.upload_id.rpartition("/")[2]):
            raise StorageError(f"{upload.upload_id!r} is not a temporary upload file")
        path = self.root.joinpath(*upload.upload_id.split("/"))
        await self._run(f"cannot remove {path}", _unlink_and_prune, path, self.root)

    async def check(self) -> None:
        probe = _PartialFile(self.root, self.root / "backupd-check")
        await self._run(f"cannot write in {self.root}", self._probe, probe)

    @staticmethod
    def _probe(probe: _PartialFile) -> None:
        probe.create()
        try:
            probe.write([b"backupd write check\n"])
            assert probe.fd is not None
            os.fsync(probe.fd)
        finally:
            probe.discard()

    # -- conditional writes (HA claims) --------------------------------------
    #
    # create: the bytes go to a temporary file, fsynced, then link(2) to the key,
    # which fails if the key exists (atomic on local filesystems and NFS). replace:
    # under a POSIX lock (lockf, which NFSv4 and NLM honour across hosts) plus a
    # thread lock (POSIX locks do not exclude threads of one process), the current
    # content's hash is compared with the etag, then a temporary file is renamed
    # over the key. The etag is the content's SHA-256; every claim write carries
    # a fresh token, so two writes never share one. Age is judged by the
    # filesystem's clock: a clock file is touched (utime with no time: on NFS the
    # server's time) and its mtime compared with the object's.

    async def create_if_absent(self, key: str, data: bytes) -> str:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_create_exclusive, path, data)
        except FileExistsError:
            raise PreconditionFailed(
                f"filesystem storage {self.name}: {key} already exists"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"filesystem storage {self.name}: cannot create {path}: {_describe(exc)}"
            ) from exc

    async def replace_if_match(self, key: str, data: bytes, etag: str) -> str:
        path = self._path(key)
        try:
            async with self._cas_lock:
                new = await asyncio.to_thread(_replace_if_match, self.root, path, data, etag)
        except OSError as exc:
            raise StorageError(
                f"filesystem storage {self.name}: cannot replace {path}: {_describe(exc)}"
            ) from exc
        if new is None:
            raise PreconditionFailed(f"filesystem storage {self.name}: {key} changed or is gone")
        return new

    async def read_versioned(self, key: str) -> Versioned:
        path = self._path(key)
        try:
            data, age, modified = await asyncio.to_thread(_read_versioned, self.root, path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"filesystem storage {self.name}: {key} not found") from None
        except OSError as exc:
            raise StorageError(
                f"filesystem storage {self.name}: cannot read {path}: {_describe(exc)}"
            ) from exc
        if len(data) > MAX_VERSIONED_BYTES:
            raise StorageError(f"filesystem storage {self.name}: {key} is too large for a claim")
        return Versioned(data=data, etag=_etag(data), age=age, modified=modified)

    async def aclose(self) -> None:
        """Nothing to release: every call opens and closes its own files."""


async def open_filesystem_store(cfg: FilesystemStorage) -> FilesystemStore:
    store = FilesystemStore(cfg)
    await store.open()
    return store
