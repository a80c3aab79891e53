"""The storage protocol every backend implements.

Keys are relative to the storage's root (its `prefix` for S3, its `path` for
the filesystem) and always use "/". An upload is invisible under its key
until `complete()` returns; `abort()` leaves nothing behind. Backends
translate their own errors into `StorageError` (permanent) or
`TransientStorageError` (worth retrying).
"""

from __future__ import annotations

import asyncio
import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, Protocol

import structlog

from backupd.errors import StorageError

log = structlog.get_logger(__name__)

MiB = 1024 * 1024

CLEANUP_DEADLINE = 10.0
"""Seconds an upload's `abort()` may take (on a hung store, say): past it, what is
left is logged and left to the sweeper (`abandoned_upload_grace`). A failed or
cancelled backup attempt gets this much, in total, for all of its cleanup."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime  # aware, UTC


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """An upload that was started and never completed nor aborted (a crash)."""

    key: str
    upload_id: str  # backend handle: S3 UploadId, or the temp file's path under the root
    started: datetime  # aware, UTC; the filesystem reports the last write


@dataclass(frozen=True, slots=True)
class Versioned:
    """A small object read with its version, for compare-and-swap (HA claims)."""

    data: bytes
    etag: str  # what `replace_if_match` compares; changes with every write
    age: float  # seconds since it was last written, by the store's own clock
    modified: datetime  # when it was last written (aware, UTC), as listings report it

    @property
    def store_now(self) -> datetime:
        """The store's clock when it answered (comparable with listings' `modified`)."""
        return self.modified + timedelta(seconds=self.age)


MAX_VERSIONED_BYTES = 64 * 1024


class Upload(Protocol):
    """One object being written by one task.

    A failure or cancellation inside `write()` or `complete()` aborts the upload
    before the error propagates: a cancelled writer leaves nothing behind even
    without calling `abort()`. `abort()` from another task wins over a running
    `complete()`, which then raises `StorageError`.
    """

    key: str

    async def write(self, data: bytes) -> None:
        """Append bytes; may wait (backpressure) until the backend accepts them."""

    async def complete(self) -> int:
        """Publish the object under its key; returns its stored size, checked."""

    async def abort(self) -> None:
        """Discard everything written; never raises; returns within `CLEANUP_DEADLINE`."""


class Store(Protocol):
    name: str

    async def open_upload(self, key: str) -> Upload:
        """Start writing a new object."""

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object at once, atomically (manifests)."""

    async def read_bytes(self, key: str) -> bytes:
        """Read a small object whole; `NotFound` if absent."""

    def open_read(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream an object's bytes; `NotFound` if absent."""

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Complete objects whose key starts with `prefix`, sorted by key."""

    async def delete(self, keys: Sequence[str]) -> builtins.list[str]:
        """Delete objects (missing ones count as deleted); returns the keys that failed."""

    async def list_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        """Uploads left behind by a crash, for the sweeper."""

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        """Remove one leftover upload."""

    async def check(self) -> None:
        """Reach the storage and prove it is writable (`backupd check --connect`)."""

    # Conditional writes (HA claims, issue 17): small objects only.

    async def create_if_absent(self, key: str, data: bytes) -> str:
        """Create `key` only if it does not exist; returns its etag, else `PreconditionFailed`."""

    async def replace_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Replace `key` only if its etag is still `etag`; returns the new etag, else
        `PreconditionFailed` (changed or gone)."""

    async def read_versioned(self, key: str) -> Versioned:
        """Read a small object with its etag and age (store clock); `NotFound` if absent."""

    async def aclose(self) -> None:
        """Release connections."""


def check_key(key: str) -> str:
    """Return `key` if it is a plain relative "/"-path, else raise `StorageError`.

    Both backends refuse the same keys, so a key that works on S3 also works on
    the filesystem and can never name a file outside the storage's root.
    """
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise StorageError(f"invalid storage key {key!r}: expected a relative path like 'a/b.dump'")
    if "\0" in key:
        raise StorageError(f"invalid storage key {key!r}: contains a NUL byte")
    return key


def check_prefix(prefix: str) -> str:
    """Return a listing prefix if it is empty or a key with an optional trailing "/"."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class BaseUpload(ABC):
    """The flow of one upload, written once over the backend's primitives.

    A state machine (open -> completing -> done, or -> aborted from any state
    but done): a failure or cancellation inside `write()` or `complete()`
    aborts the upload before the error propagates, so `abort()` is then a
    no-op; an `abort()` from another task during `complete()` wins, and
    `complete()` raises. The cleanup runs once, in its own task, so a caller
    cancelled meanwhile cannot cut it short, and for at most `CLEANUP_DEADLINE`
    from the first `abort()`, however many callers wait for it.

    A backend implements `_write` (take bytes; may wait for the backend),
    `_complete` (make the object visible under its key; return its checked
    size), `_discard` (remove whatever the upload left, a published object
    included, raising if it cannot), `_release_buffers` and `_where` (the log
    fields naming the upload).
    """

    DISCARD_INTERRUPTIBLE: ClassVar[bool] = True
    """Whether a discard still running at `CLEANUP_DEADLINE` is given up (its
    requests cancelled; the sweeper removes the leftover after
    `abandoned_upload_grace`) or, if it cannot be interrupted (a write stuck in
    the kernel), left to finish in the background."""
    OVERDUE_NOTE: ClassVar[str]
    """Logged with the event when the cleanup outlives `CLEANUP_DEADLINE`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._state: Literal["open", "completing", "done", "aborted"] = "open"
        self._cleanup: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        self._check_open()
        try:
            await self._write(data)
        except BaseException:
            await self.abort()
            raise

    async def complete(self) -> int:
        self._check_open()
        self._state = "completing"
        try:
            size = await self._complete()
            self._check_not_aborted()  # abort() may have run in another task meanwhile
        except BaseException:
            await self.abort()
            raise
        self._state = "done"
        return size

    async def abort(self) -> None:
        """Discard everything written; never raises; returns within `CLEANUP_DEADLINE`.

        If the caller is cancelled meanwhile, the cleanup still finishes in the background.
        """
        if self._state == "done":
            return
        self._state = "aborted"
        self._release_buffers()
        if self._cleanup is None:
            self._cleanup = asyncio.ensure_future(self._discard_within_deadline())
        await asyncio.shield(self._cleanup)

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"upload of {self.key} is already completed or aborted")

    def _check_not_aborted(self) -> None:
        if self._state == "aborted":
            raise StorageError(f"upload of {self.key} was aborted")

    async def _discard_within_deadline(self) -> None:
        discard = asyncio.ensure_future(self._discard_logged())
        try:
            async with asyncio.timeout(CLEANUP_DEADLINE):
                await (discard if self.DISCARD_INTERRUPTIBLE else asyncio.shield(discard))
        except TimeoutError:
            log.warning(
                "upload_abort_abandoned" if self.DISCARD_INTERRUPTIBLE else "upload_abort_overdue",
                **self._where(),
                deadline_seconds=CLEANUP_DEADLINE,
                note=self.OVERDUE_NOTE,
            )

    async def _discard_logged(self) -> None:
        try:
            await self._discard()
        except Exception as exc:
            log.warning("upload_abort_failed", **self._where(), error=str(exc))

    @abstractmethod
    async def _write(self, data: bytes) -> None:
        """Take more bytes; may wait (backpressure) until the backend accepts them."""

    @abstractmethod
    async def _complete(self) -> int:
        """Make the object visible under its key; returns its stored size, checked."""

    @abstractmethod
    async def _discard(self) -> None:
        """Remove everything this upload left, a published object included."""

    @abstractmethod
    def _release_buffers(self) -> None:
        """Drop the bytes not yet handed to the backend (called by `abort()` at once)."""

    @abstractmethod
    def _where(self) -> dict[str, Any]:
        """The log fields that name this upload (never a secret)."""


class BaseStore(ABC):
    """The flow shared by every backend, written once over the backend's primitives."""

    name: str

    @abstractmethod
    async def open_upload(self, key: str) -> Upload:
        """Start writing a new object."""

    @abstractmethod
    def open_read(self, key: str, chunk_size: int = MiB) -> AsyncIterator[bytes]:
        """Stream an object's bytes; `NotFound` if absent."""

    async def put_bytes(self, key: str, data: bytes) -> None:
        upload = await self.open_upload(key)
        try:
            await upload.write(data)
            await upload.complete()
        except BaseException:
            await upload.abort()
            raise

    async def read_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.open_read(key)])
