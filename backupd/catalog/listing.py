"""Backups in a store: writing a manifest, reading one back (validated), listing them.

The model and the validation of what is read are in `manifest.py`; this module is
what reads and writes them in a store. A manifest that cannot be used is skipped
and logged by its key and a short reason, never guessed at.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import structlog

from backupd.catalog.manifest import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    InvalidManifest,
    Manifest,
    now_utc,
)
from backupd.errors import NotFound, StorageError
from backupd.storage.base import ObjectInfo, Store

_READ_CHUNK = 64 * 1024
READ_CONCURRENCY = 8  # manifests read at once by a listing

log = structlog.get_logger("backupd.manifest")


@dataclass(frozen=True, slots=True)
class SkippedManifest:
    """A manifest a listing could not use: its key, and why (never its content)."""

    key: str
    reason: str

    @property
    def stem(self) -> str:
        return self.key.rsplit("/", 1)[-1].removesuffix(MANIFEST_SUFFIX)


@dataclass(frozen=True, slots=True)
class Listing:
    """What one listing of one storage found."""

    backups: list[Manifest]  # valid manifests, newest first (by started_at, then id)
    invalid: list[SkippedManifest]
    now: datetime  # what "in the future" was measured against
    objects: tuple[ObjectInfo, ...] = ()  # the store listing it was read from (its prefix)

    @property
    def future(self) -> list[Manifest]:
        """Backups dated ahead of the clock (beyond FUTURE_TOLERANCE), newest first."""
        return [m for m in self.backups if m.in_future(self.now)]

    @property
    def current(self) -> list[Manifest]:
        """Backups not dated in the future, newest first: the ones that count as newest."""
        return [m for m in self.backups if not m.in_future(self.now)]

    @property
    def newest(self) -> Manifest | None:
        """The newest backup not dated in the future."""
        return next((m for m in self.backups if not m.in_future(self.now)), None)

    @property
    def newest_complete(self) -> Manifest | None:
        """The newest backup not dated in the future that lacks no database: the last
        success (a partial backup's run failed)."""
        return next((m for m in self.backups if not m.in_future(self.now) and not m.failed), None)


async def write_manifest(store: Store, manifest: Manifest) -> None:
    await store.put_bytes(manifest.manifest_key, manifest.to_json())


async def read_manifest(store: Store, key: str) -> Manifest:
    """Read and validate the manifest at `key` (at most MAX_MANIFEST_BYTES of it).

    Raises NotFound if it is gone, InvalidManifest if it is not a valid manifest
    of that key, StorageError if the storage fails.
    """
    chunks: list[bytes] = []
    total = 0
    stream = store.open_read(key, _READ_CHUNK)
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > MAX_MANIFEST_BYTES:
                raise InvalidManifest(f"larger than {MAX_MANIFEST_BYTES} bytes")
            chunks.append(chunk)
    finally:
        await _aclose(stream)
    return Manifest.from_json(b"".join(chunks), key)


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def scan_backups(
    store: Store,
    job: str | None = None,
    now: datetime | None = None,
    *,
    written: Manifest | None = None,
) -> Listing:
    """Every backup in `store` (of `job`, or of all jobs), newest first, and what was skipped.

    A manifest that is invalid, too large or unreadable is logged (its key and
    a short reason) and skipped, never guessed at. Backups dated in the future
    are listed, and logged.

    `written` is a manifest this process has just written (a run's, before its
    prune): listed under its key with its size, it is taken as it is, not read back.
    """
    now = now or now_utc()
    prefix = f"{job}/" if job else ""
    objects = await store.list(prefix)
    slots = asyncio.Semaphore(READ_CONCURRENCY)
    written_size = len(written.to_json()) if written is not None else -1

    async def read(info: ObjectInfo) -> Manifest | SkippedManifest | None:
        try:
            if written is not None and (info.key, info.size) == (
                written.manifest_key,
                written_size,
            ):
                return written
            if info.size > MAX_MANIFEST_BYTES:
                raise InvalidManifest(f"larger than {MAX_MANIFEST_BYTES} bytes")
            async with slots:
                return await read_manifest(store, info.key)
        except NotFound:
            return None  # deleted between list and read (prune)
        except InvalidManifest as exc:
            return SkippedManifest(info.key, str(exc))
        except StorageError as exc:
            return SkippedManifest(info.key, f"cannot be read: {exc}")

    # At once (a store's round trips add up); every read ends before an error is raised.
    results = await asyncio.gather(
        *(read(info) for info in objects if info.key.endswith(MANIFEST_SUFFIX)),
        return_exceptions=True,
    )
    manifests = []
    invalid = []
    for result in results:  # in key order, as listed
        if isinstance(result, BaseException):
            raise result
        if isinstance(result, Manifest):
            manifests.append(result)
        elif result is not None:
            log.warning(
                "manifest_invalid", storage=store.name, key=result.key, reason=result.reason
            )
            invalid.append(result)
    manifests.sort(key=lambda m: (m.started_at, m.id), reverse=True)
    listing = Listing(manifests, invalid, now, tuple(objects))
    for m in listing.future:
        log.warning(
            "backup_in_future",
            storage=store.name,
            backup=m.stem,
            started_at=m.started_at,
            ahead_seconds=round((m.started - now).total_seconds()),
        )
    return listing


async def list_backups(store: Store, job: str | None = None) -> list[Manifest]:
    """Every valid backup in `store` (of `job`, or of all jobs), newest first."""
    return (await scan_backups(store, job)).backups


async def find_backup(store: Store, job: str, which: str | None) -> Manifest:
    """`--backup` resolution: an id, a stem, or `latest` (the default).

    `latest` is the newest backup not dated in the future, or the newest
    one if every backup is.
    """
    listing = await scan_backups(store, job)
    backups = listing.backups
    if which in (None, "", "latest"):
        newest = listing.newest or (backups[0] if backups else None)
        if newest is None:
            raise NotFound(f"no backups of job {job!r} in storage {store.name!r}")
        return newest
    for m in backups:
        if which in (m.id, m.stem, m.stem + MANIFEST_SUFFIX):
            return m
    for skipped in listing.invalid:
        if which in (skipped.stem, skipped.stem.rsplit("-", 1)[-1], skipped.stem + MANIFEST_SUFFIX):
            raise NotFound(
                f"backup {which!r} of job {job!r} in storage {store.name!r} is not usable: "
                f"its manifest {skipped.key} is invalid: {skipped.reason}"
            )
    raise NotFound(f"no backup {which!r} of job {job!r} in storage {store.name!r}")
