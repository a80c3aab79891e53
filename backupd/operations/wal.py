"""The WAL archive of a physical job: layout, per-segment index, push, fetch, the chain.

Layout, keys relative to the storage root (SPEC "Physical backups"):
    {job}/wal/{timeline}/{segment}[.zst|.gz|.lz4][.age]   the segment's bytes
    {job}/wal/{timeline}/{segment}.json                   its index entry
and the same for `{timeline}.history` files. The index entry is written after
the data object and is what makes a segment exist (as a manifest makes a
backup exist): its name, sizes, the SHA-256 of the stored bytes and of the
WAL itself, how it is encoded, and when it was archived. Entries read from
storage are untrusted and validated.

A segment is stored once: pushing a name that exists with the same WAL bytes
(SHA-256 of the raw segment) succeeds without writing; with different bytes
it is refused, never overwritten (archive_command's contract).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from backupd.catalog.manifest import Manifest, now_utc, parse_rfc3339, rfc3339
from backupd.config.model import Job
from backupd.errors import BackupdError, IntegrityError, NotFound, StorageError, UsageError
from backupd.storage.base import Store
from backupd.stream.age import AgeDecryptor, AgeEncryptor, DecryptionError, load_identities
from backupd.stream.codecs import Encoder, algorithm_of, compressor, decompressor

log = structlog.get_logger("backupd.wal")

SEGMENT_SIZE = 16 * 1024 * 1024  # wal_segment_size; checked at preflight
SEGMENTS_PER_XLOGID = 0x100000000 // SEGMENT_SIZE
MAX_ENTRY_BYTES = 4096
MAX_HISTORY_BYTES = 1 << 20
SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")
BACKUP_LABEL_RE = re.compile(r"[0-9A-F]{24}\.[0-9A-F]{8}\.backup")  # archive_command sends these
_COMPRESSION = re.compile(r"(none|gzip|zstd|lz4)(:[0-9]{1,2})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r"(\.(zst|gz|lz4))?(\.age)?")
INDEX_SUFFIX = ".json"


# -- WAL positions ------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """`16/B374D848` -> an integer; UsageError if it is not an LSN."""
    match = re.fullmatch(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})", text.strip())
    if match is None:
        raise UsageError(f"{text!r} is not an LSN (like 0/3000028)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_of(timeline: int, lsn: int) -> str:
    """The name of the segment of `timeline` holding `lsn`."""
    segno = lsn // SEGMENT_SIZE
    return f"{timeline:08X}{segno // SEGMENTS_PER_XLOGID:08X}{segno % SEGMENTS_PER_XLOGID:08X}"


def segment_number(name: str) -> tuple[int, int]:
    """(timeline, segment number) of a segment name."""
    return int(name[:8], 16), int(name[8:16], 16) * SEGMENTS_PER_XLOGID + int(name[16:24], 16)


def is_wal_name(name: str) -> bool:
    return bool(
        SEGMENT_RE.fullmatch(name) or HISTORY_RE.fullmatch(name) or BACKUP_LABEL_RE.fullmatch(name)
    )


# -- layout -------------------------------------------------------------------------------


def wal_prefix(job: str) -> str:
    return f"{job}/wal/"


def folder_of(job: str, name: str) -> str:
    return f"{wal_prefix(job)}{name[:8]}/"


def index_key(job: str, name: str) -> str:
    return f"{folder_of(job, name)}{name}{INDEX_SUFFIX}"


@dataclass(frozen=True, slots=True)
class WalEntry:
    """One archived segment (or history file): its index entry."""

    name: str
    key: str  # the data object's name in the timeline's folder
    size_bytes: int  # stored
    sha256: str  # of the stored bytes
    raw_bytes: int
    raw_sha256: str  # of the WAL itself: what "the same segment" means
    compression: str
    encrypted: bool
    archived_at: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, name: str) -> WalEntry:
        """Validate an index entry read from storage; IntegrityError says why not."""
        try:
            if len(raw) > MAX_ENTRY_BYTES:
                raise ValueError("too large")
            data = json.loads(raw.decode())
            if not isinstance(data, dict):
                raise ValueError("not an object")
            entry = cls(
                name=_str(data, "name"),
                key=_str(data, "key"),
                size_bytes=_int(data, "size_bytes"),
                sha256=_str(data, "sha256"),
                raw_bytes=_int(data, "raw_bytes"),
                raw_sha256=_str(data, "raw_sha256"),
                compression=_str(data, "compression"),
                encrypted=_bool(data, "encrypted"),
                archived_at=_str(data, "archived_at"),
            )
            parse_rfc3339(entry.archived_at)
        except (ValueError, UnicodeDecodeError, TypeError, OverflowError) as exc:
            raise IntegrityError(f"WAL index entry of {name} is invalid: {exc}") from None
        suffix = entry.key.removeprefix(name)
        problems = [
            entry.name != name and "it names another segment",
            (suffix == entry.key or not _SUFFIX.fullmatch(suffix)) and "its key is not its own",
            not _SHA256.fullmatch(entry.sha256) and "sha256 is not a digest",
            not _SHA256.fullmatch(entry.raw_sha256) and "raw_sha256 is not a digest",
            not _COMPRESSION.fullmatch(entry.compression) and "unknown compression",
            SEGMENT_RE.fullmatch(name) and entry.raw_bytes != SEGMENT_SIZE and "wrong size",
        ]
        wrong = [p for p in problems if p]
        if wrong:
            raise IntegrityError(f"WAL index entry of {name} is invalid: {wrong[0]}")
        return entry

    @property
    def archived(self) -> datetime:
        return parse_rfc3339(self.archived_at)


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError(f"{key} is not a short string")
    return value


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 40:
        raise ValueError(f"{key} is not a size")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} is not a boolean")
    return value


# -- push ---------------------------------------------------------------------------------


def _encoders(job: Job) -> list[Encoder]:
    encoders: list[Encoder] = [compressor(job.compression)]
    if job.encryption is not None:
        encoders.append(AgeEncryptor(job.encryption.recipients))
    return encoders


def _encode(job: Job, raw: bytes) -> bytes:
    data = raw
    for enc in _encoders(job):
        data = enc.update(data) + enc.finish()
    return data


async def read_entry(store: Store, job: str, name: str) -> WalEntry:
    """The index entry of `name`; NotFound if it is not archived."""
    raw = await store.read_bytes(index_key(job, name))
    return WalEntry.from_json(raw, name)


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


PARTIAL_SUFFIX = ".partial"


def is_partial_name(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) and bool(SEGMENT_RE.fullmatch(name[:-8]))


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


# -- the archive as a whole ---------------------------------------------------------------


@dataclass
class Archive:
    """What the archive of one job holds in one store (from a listing: names only)."""

    segments: dict[int, list[int]] = field(default_factory=dict)  # segno -> timelines
    histories: set[int] = field(default_factory=set)  # timelines with a .history file
    keys: dict[str, str] = field(default_factory=dict)  # WAL name -> its index key
    partials: dict[int, str] = field(default_factory=dict)  # segno -> growing copy's name
    data_keys: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (name, size)

    @property
    def newest(self) -> tuple[int, int] | None:
        """(segment number, timeline) of the newest segment."""
        if not self.segments:
            return None
        segno = max(self.segments)
        return segno, max(self.segments[segno])

    def chain_end(self, timeline: int, segno: int) -> int | None:
        """The last segment number reachable from `segno` without a gap (timelines >=
        `timeline` count: a promoted server continues on a later one); None if
        `segno` itself is missing."""
        ordered = sorted(self.segments)
        i = bisect.bisect_left(ordered, segno)
        end = None
        expected = segno
        while i < len(ordered) and ordered[i] == expected:
            if not any(t >= timeline for t in self.segments[ordered[i]]):
                break
            end = expected
            expected += 1
            i += 1
        return end

    def gaps(self, timeline: int, segno: int) -> list[int]:
        """Segment numbers missing between `segno` and the newest segment."""
        newest = self.newest
        if newest is None:
            return []
        return [
            n
            for n in range(segno, newest[0] + 1)
            if not any(t >= timeline for t in self.segments.get(n, ()))
        ]

    def name_of(self, segno: int, timeline: int) -> str:
        candidates = sorted(t for t in self.segments.get(segno, ()) if t >= timeline)
        tli = candidates[-1] if candidates else timeline
        return segment_of(tli, segno * SEGMENT_SIZE)


async def scan(store: Store, job: str) -> Archive:
    archive = Archive()
    prefix = wal_prefix(job)
    for info in await store.list(prefix):
        rest = info.key[len(prefix) :]
        folder, _, base = rest.partition("/")
        if base.endswith(INDEX_SUFFIX):
            name = base[: -len(INDEX_SUFFIX)]
            if name[:8] != folder:
                continue
            if SEGMENT_RE.fullmatch(name):
                tli, segno = segment_number(name)
                archive.segments.setdefault(segno, []).append(tli)
                archive.keys[name] = info.key
            elif HISTORY_RE.fullmatch(name):
                archive.histories.add(int(name[:8], 16))
                archive.keys[name] = info.key
            elif BACKUP_LABEL_RE.fullmatch(name):
                archive.keys[name] = info.key
            elif is_partial_name(name):
                archive.partials[segment_number(name[:24])[1]] = name
                archive.keys[name] = info.key
        else:
            archive.data_keys[info.key] = (base, info.size)
    return archive


@dataclass(frozen=True, slots=True)
class Window:
    """The times (and LSNs) a job can be restored to, from its base backups and archive."""

    earliest: datetime | None
    latest: datetime | None
    latest_lsn: int | None  # the end of the newest WAL reachable from a base backup
    until: dict[str, datetime]  # backup id -> the latest time that backup reaches
    broken: dict[str, str]  # backup id -> why its chain ends early (a gap)

    def describe(self) -> str:
        if self.earliest is None or self.latest is None:
            return "restorable: nothing (no physical base backup)"
        return f"restorable: {_utc(self.earliest)} .. {_utc(self.latest)}"


def _utc(ts: datetime) -> str:
    return rfc3339(ts)[:19] + "Z"


async def window(
    store: Store, job: str, backups: Iterable[Manifest], archive: Archive | None = None
) -> Window:
    """What the base backups and the WAL archive in `store` make restorable.

    A base backup reaches its own end without any WAL; with the archive, it
    reaches the newest segment of the unbroken chain from its start segment
    (dated by when that segment was archived).
    """
    archive = archive if archive is not None else await scan(store, job)
    physical = [m for m in backups if m.wal is not None and m.finished is not None]
    until: dict[str, datetime] = {}
    broken: dict[str, str] = {}
    latest_lsn: int | None = None
    times: dict[int, tuple[datetime, int]] = {}  # chain end segno -> (archived, end LSN)
    for m in physical:
        assert m.wal is not None and m.finished is not None
        tli, start = segment_number(m.wal["start_segment"])
        _, stop = segment_number(m.wal["stop_segment"])
        reach = m.finished
        end_lsn = parse_lsn(m.wal["stop_lsn"])
        last = archive.chain_end(tli, start)
        if last is not None and last >= stop:
            if last not in times:
                # the growing copy of the next segment, if any, reaches further
                partial = archive.partials.get(last + 1)
                name = partial if partial is not None else archive.name_of(last, tli)
                try:
                    entry = await read_entry(store, job, name)
                    times[last] = (entry.archived, (last + 1) * SEGMENT_SIZE)
                except (NotFound, IntegrityError, StorageError) as exc:
                    log.warning("wal_entry_unreadable", segment=name, error=str(exc))
            if last in times:
                reach = max(reach, times[last][0])
                end_lsn = max(end_lsn, times[last][1])
        gaps = archive.gaps(tli, start)
        if gaps:
            broken[m.id] = (
                f"segment {archive.name_of(gaps[0], tli)} is missing from the WAL archive"
                f" ({len(gaps)} missing after the backup's start)"
            )
        until[m.id] = reach
        latest_lsn = end_lsn if latest_lsn is None else max(latest_lsn, end_lsn)
    return Window(
        earliest=min((m.finished for m in physical if m.finished), default=None),
        latest=max(until.values(), default=None),
        latest_lsn=latest_lsn,
        until=until,
        broken=broken,
    )


async def prune_wal(
    store: Store, job: str, kept: Iterable[Manifest], *, dry_run: bool = False
) -> list[str]:
    """Delete segments older than the start of the oldest kept base backup.

    Nothing is deleted when no kept backup records its WAL position (the archive
    then serves nothing known). History files are kept: they are tiny and
    recovery needs them to follow timelines.
    """
    starts = [segment_number(m.wal["start_segment"])[1] for m in kept if m.wal is not None]
    if not starts:
        return []
    horizon = min(starts)
    archive = await scan(store, job)
    doomed: list[str] = []

    def old(name: str) -> bool:  # a segment, or a backup history file, before the horizon
        return bool(SEGMENT_RE.fullmatch(name[:24])) and segment_number(name[:24])[1] < horizon

    doomed += [key for key, (base, _) in archive.data_keys.items() if old(base)]
    doomed += [key for name, key in archive.keys.items() if old(name)]
    # index entries first: a segment without its entry no longer exists
    doomed.sort(key=lambda k: not k.endswith(INDEX_SUFFIX))
    if dry_run or not doomed:
        return doomed
    failed = await store.delete([k for k in doomed if k.endswith(INDEX_SUFFIX)])
    failed += await store.delete([k for k in doomed if not k.endswith(INDEX_SUFFIX)])
    if failed:
        log.warning("wal_prune_incomplete", storage=store.name, keys=len(failed))
    return [k for k in doomed if k not in failed]


__all__ = [
    "SEGMENT_SIZE",
    "Archive",
    "PushResult",
    "WalEntry",
    "Window",
    "fetch",
    "fetch_bytes",
    "format_lsn",
    "parse_lsn",
    "prune_wal",
    "push",
    "scan",
    "segment_of",
    "window",
]
