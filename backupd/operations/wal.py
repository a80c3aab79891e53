"""The WAL archive of a physical job: push (archive_command), fetch (restore_command).

Names, keys and index entries are `catalog/walindex.py`; the archive as a whole
(listing, the restorable window, retention) is `walchain.py`.

A segment is stored once: pushing a name that exists with the same WAL bytes
(SHA-256 of the raw segment) succeeds without writing; with different bytes
it is refused, never overwritten (archive_command's contract). The index
entry is written after the data object: without its entry a segment does not
exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from backupd.catalog.manifest import now_utc, rfc3339
from backupd.catalog.walindex import (
    MAX_HISTORY_BYTES,
    PARTIAL_SUFFIX,
    SEGMENT_RE,
    SEGMENT_SIZE,
    WalEntry,
    folder_of,
    index_key,
    is_partial_name,
    is_wal_name,
    read_entry,
    segment_number,
    segment_of,
)
from backupd.config.model import Job
from backupd.errors import BackupdError, IntegrityError, NotFound, StorageError, UsageError
from backupd.operations.publish import job_encoders
from backupd.storage.base import Store
from backupd.stream.age import AgeDecryptor, DecryptionError, load_identities
from backupd.stream.codecs import Encoder, algorithm_of, decompressor

log = structlog.get_logger("backupd.wal")

# -- push ---------------------------------------------------------------------------------


def _encode(job: Job, raw: bytes) -> bytes:
    data = raw
    for enc in job_encoders(job):
        data = enc.update(data) + enc.finish()
    return data


@dataclass(frozen=True, slots=True)
class PushResult:
    name: str
    stored: tuple[str, ...]  # stores written now
    present: tuple[str, ...]  # stores that had the same bytes already
    size_bytes: int


async def push(job: Job, stores: Mapping[str, Store], path: str | Path) -> PushResult:
    """Archive the WAL file at `path` (a segment or a .history file) to every store."""
    path = Path(path)
    name = path.name
    if not is_wal_name(name):
        raise UsageError(f"{name!r} is not the name of a WAL segment or history file")
    raw = await asyncio.to_thread(_read_wal_file, path, name)
    return await push_bytes(job, stores, name, raw)


async def push_bytes(
    job: Job, stores: Mapping[str, Store], name: str, raw: bytes, *, replace: bool = False
) -> PushResult:
    """Store `raw` as WAL file `name` in every store; see `push`.

    `replace` is for `{segment}.partial` only, the copy of a growing segment: a
    newer copy holds the same WAL and more, so it replaces the older one.
    """
    if replace != is_partial_name(name):
        raise UsageError(f"{name!r}: only a growing segment's copy is ever replaced")
    raw_sha = hashlib.sha256(raw).hexdigest()
    stored: list[str] = []
    present: list[str] = []
    data: bytes | None = None
    size = 0
    for store_name, store in stores.items():
        try:
            existing = await read_entry(store, job.name, name)
        except (NotFound, IntegrityError) as exc:
            if isinstance(exc, IntegrityError) and not replace:
                raise
            existing = None
        if existing is not None:
            same = existing.raw_sha256 == raw_sha and existing.raw_bytes == len(raw)
            if not same and not replace:
                raise IntegrityError(
                    f"{name} is already archived in storage {store_name} with different "
                    "bytes: refusing to overwrite it (is another server archiving into job "
                    f"{job.name}'s archive?)"
                )
            if same:
                present.append(store_name)
                size = existing.size_bytes
                continue
        if data is None:
            data = await asyncio.to_thread(_encode, job, raw)
        ext = job.compression.extension + (".age" if job.encryption is not None else "")
        entry = WalEntry(
            name=name,
            key=f"{name}{ext}",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            raw_bytes=len(raw),
            raw_sha256=raw_sha,
            compression=job.compression.spec,
            encrypted=job.encryption is not None,
            archived_at=rfc3339(now_utc()),
        )
        if existing is not None:  # a replaced partial copy: no entry while its data changes
            await store.delete([index_key(job.name, name)])
        # The data first, the index entry last: without its entry a segment does not exist.
        await store.put_bytes(folder_of(job.name, name) + entry.key, data)
        await store.put_bytes(index_key(job.name, name), entry.to_json())
        stored.append(store_name)
        size = entry.size_bytes
    return PushResult(name, tuple(stored), tuple(present), size)


async def delete_partial(store: Store, job: str, segment: str) -> None:
    """Delete the copy of `segment` taken while it grew (the segment supersedes it)."""
    name = segment + PARTIAL_SUFFIX
    try:
        entry = await read_entry(store, job, name)
    except NotFound:
        return
    except IntegrityError:
        entry = None
    keys = [index_key(job, name)]
    if entry is not None:
        keys.append(folder_of(job, name) + entry.key)
    await store.delete(keys)


def _read_wal_file(path: Path, name: str) -> bytes:
    limit = SEGMENT_SIZE if SEGMENT_RE.fullmatch(name) else MAX_HISTORY_BYTES
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise BackupdError(f"cannot read {path}: {exc.strerror}") from None
    if SEGMENT_RE.fullmatch(name) and len(raw) != SEGMENT_SIZE:
        raise BackupdError(f"{path} is {len(raw)} bytes, a WAL segment is {SEGMENT_SIZE}")
    if len(raw) > limit:
        raise BackupdError(f"{path} is larger than {limit} bytes")
    return raw


# -- fetch --------------------------------------------------------------------------------


def _decoders(entry: WalEntry, identity: str | None) -> list[Encoder]:
    decoders: list[Encoder] = []
    if entry.encrypted:
        if identity is None:
            raise DecryptionError(
                f"WAL {entry.name} is encrypted with age: pass --identity FILE to wal-fetch"
            )
        decoders.append(AgeDecryptor(load_identities(identity)))
    decoders.append(decompressor(algorithm_of(entry.compression)))
    return decoders


async def fetch_bytes(store: Store, job: str, name: str, identity: str | None) -> bytes:
    """The WAL bytes of `name`, checked against its index entry (sizes and both digests)."""
    entry = await read_entry(store, job, name)
    stored = await store.read_bytes(folder_of(job, name) + entry.key)
    if len(stored) != entry.size_bytes or hashlib.sha256(stored).hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{name} in storage {store.name} does not match its index entry (size or SHA-256)"
        )

    def decode() -> bytes:
        data = stored
        for dec in _decoders(entry, identity):
            data = dec.update(data) + dec.finish()
        return data

    try:
        raw = await asyncio.to_thread(decode)
    except ValueError as exc:
        raise IntegrityError(f"{name}: cannot decode: {exc}") from None
    if len(raw) != entry.raw_bytes or hashlib.sha256(raw).hexdigest() != entry.raw_sha256:
        raise IntegrityError(f"{name} decoded to other bytes than were archived")
    return raw


async def fetch(
    job: str, stores: Sequence[Store], name: str, dest: str | Path, identity: str | None
) -> str:
    """Write `name` to `dest` from the first store that has it; the store's name.

    The file appears under `dest` only complete and checked (written aside, then
    renamed). NotFound when no store has it: for restore_command, the normal end
    of the archive.
    """
    if not is_wal_name(name):
        raise NotFound(f"{name!r} is not a WAL segment or history file backupd archives")
    errors: list[str] = []
    candidates = [(store, n) for n in (name, name + PARTIAL_SUFFIX) for store in stores]
    if not SEGMENT_RE.fullmatch(name):
        candidates = [(store, name) for store in stores]
    for store, stored_name in candidates:
        try:
            # A segment that was still growing when last stored: PostgreSQL replays
            # its valid records and ends recovery at the first invalid one.
            raw = await fetch_bytes(store, job, stored_name, identity)
        except NotFound:
            continue
        except (IntegrityError, StorageError) as exc:
            errors.append(f"storage {store.name}: {exc}")
            continue
        await asyncio.to_thread(_write_aside, Path(dest), raw)
        return store.name
    if errors:
        raise IntegrityError("; ".join(errors))
    raise NotFound(f"{name} is not in the WAL archive of job {job}")


PREFETCH_COUNT = 16  # segments fetched ahead by one wal-fetch
PREFETCH_PARALLEL = 4


async def prefetch(job: str, store: Store, name: str, directory: Path, identity: str | None) -> int:
    """Fetch the segments after `name` (same timeline) into `directory`, checked, each
    written aside and renamed; stops at the first one the archive lacks. How many.

    Only complete segments: a growing segment's copy is replaced as it grows, so it
    is always fetched when asked for. Failures are logged, never raised: the
    segment asked for is already delivered.
    """
    if not SEGMENT_RE.fullmatch(name):
        return 0
    tli, segno = segment_number(name)
    names = [segment_of(tli, (segno + i) * SEGMENT_SIZE) for i in range(1, PREFETCH_COUNT + 1)]
    try:
        await asyncio.to_thread(directory.mkdir, mode=0o700, exist_ok=True)
    except OSError as exc:
        log.warning("prefetch_unavailable", directory=str(directory), error=exc.strerror)
        return 0
    gate = asyncio.Semaphore(PREFETCH_PARALLEL)
    # The first position the archive lacks: later segments are not fetched (replay
    # stops there anyway), earlier ones still are, whatever order the tasks run in.
    first_missing = len(names)

    async def one(position: int, next_name: str) -> bool:
        nonlocal first_missing
        dest = directory / next_name
        if await asyncio.to_thread(dest.exists):
            return True
        async with gate:
            if position > first_missing:
                return False
            try:
                raw = await fetch_bytes(store, job, next_name, identity)
            except NotFound:
                first_missing = min(first_missing, position)
                return False
            except BackupdError as exc:
                log.warning("prefetch_failed", segment=next_name, error=str(exc))
                return False
            await asyncio.to_thread(_write_aside, dest, raw)
            return True

    done = await asyncio.gather(*(one(i, n) for i, n in enumerate(names)), return_exceptions=True)
    return sum(1 for d in done if d is True)


def _write_aside(dest: Path, raw: bytes) -> None:
    tmp = dest.with_name(f".{dest.name}.backupd-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BackupdError(f"cannot write {dest}: {exc.strerror}") from None


__all__ = ["PushResult", "delete_partial", "fetch", "fetch_bytes", "prefetch", "push", "push_bytes"]
