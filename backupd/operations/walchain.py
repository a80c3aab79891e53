"""The WAL archive of a physical job as a whole: what one store holds (`scan`, from a
listing: names only), what the base backups and the archive make restorable
(`window`), and WAL retention (`prune_wal`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from backupd.catalog.manifest import Manifest, rfc3339
from backupd.catalog.walindex import (
    BACKUP_LABEL_RE,
    HISTORY_RE,
    INDEX_SUFFIX,
    SEGMENT_RE,
    SEGMENT_SIZE,
    is_partial_name,
    parse_lsn,
    read_entry,
    segment_number,
    segment_of,
    wal_prefix,
)
from backupd.errors import IntegrityError, NotFound, StorageError
from backupd.storage.base import Store

log = structlog.get_logger("backupd.wal")


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
