"""The storage protocol every backend implements.

Keys are relative to the storage's root (its `prefix` for S3, its `path` for
the filesystem) and always use "/". An upload is invisible under its key
until `complete()` returns; `abort()` leaves nothing behind. Backends
translate their own errors into `StorageError` (permanent) or
`TransientStorageError` (worth retrying).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime  # aware, UTC


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """An upload that was started and never completed nor aborted (a crash)."""

    key: str
    upload_id: str  # backend handle: S3 UploadId, or the temp file's name
    started: datetime  # aware, UTC


class Upload(Protocol):
    key: str

    async def write(self, data: bytes) -> None:
        """Append bytes; may wait (backpressure) until the backend accepts them."""

    async def complete(self) -> int:
        """Publish the object under its key; returns its stored size, checked."""

    async def abort(self) -> None:
        """Discard everything written; never raises."""


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

    async def delete(self, keys: Sequence[str]) -> list[str]:
        """Delete objects (missing ones count as deleted); returns the keys that failed."""

    async def list_incomplete_uploads(self) -> list[IncompleteUpload]:
        """Uploads left behind by a crash, for the sweeper."""

    async def abort_incomplete(self, upload: IncompleteUpload) -> None:
        """Remove one leftover upload."""

    async def check(self) -> None:
        """Reach the storage and prove it is writable (`backupd check --connect`)."""

    async def aclose(self) -> None:
        """Release connections."""
