"""What the daemon knows about each job's backups in storage, for `status` and the status page.

Storage is the source of truth: the start-up scan records every job's newest
backups per storage (so a restarted daemon shows them at once), and each
successful run adds the backup it published. Nothing here lists storage by
itself: `status` stays cheap however large a bucket is. A backup deleted by
another process (`backupd delete` or `prune` run by hand) stays shown until
the next restart or the job's next run.

Also the few formatting helpers the command line and the page share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backupd.catalog.listing import Listing
from backupd.catalog.manifest import Manifest, now_utc, rfc3339

RECENT = 20
"""Backups kept per job for the status page's table and chart."""


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """One backup as `status` and the page show it (no database names: they may be private)."""

    stem: str
    id: str
    storage: str
    started: datetime
    finished: datetime | None
    size_bytes: int
    duration_seconds: float | None
    partial: bool

    @classmethod
    def of(cls, manifest: Manifest, storage: str) -> BackupSummary:
        return cls(
            stem=manifest.stem,
            id=manifest.id,
            storage=storage,
            started=manifest.started,
            finished=manifest.finished,
            size_bytes=manifest.size_bytes,
            duration_seconds=manifest.duration_seconds,
            partial=bool(manifest.failed),
        )

    def to_dict(self, now: datetime) -> dict[str, Any]:
        done = self.finished or self.started
        return {
            "stem": self.stem,
            "id": self.id,
            "storage": self.storage,
            "started_at": rfc3339(self.started),
            "finished_at": rfc3339(self.finished) if self.finished else None,
            "age_seconds": round(max(0.0, (now - done).total_seconds()), 1),
            "size_bytes": self.size_bytes,
            "duration_seconds": self.duration_seconds,
            "partial": self.partial,
        }


class Inventory:
    """The newest backups of each job, across its storages, newest first."""

    def __init__(self) -> None:
        self._recent: dict[str, list[BackupSummary]] = {}

    def record_listing(self, job: str, storage: str, listing: Listing) -> None:
        """What a listing found: backups dated in the future are left out (a wrong clock)."""
        self._add(job, [BackupSummary.of(m, storage) for m in listing.current[:RECENT]])

    def record_backup(self, job: str, storage: str, manifest: Manifest) -> None:
        """A backup a run has just published."""
        self._add(job, [BackupSummary.of(manifest, storage)])

    def _add(self, job: str, found: list[BackupSummary]) -> None:
        merged = {b.stem: b for b in self._recent.get(job, [])}
        for b in found:
            merged.setdefault(b.stem, b)  # the first storage that reported it names it
        ordered = sorted(merged.values(), key=lambda b: (b.started, b.id), reverse=True)
        self._recent[job] = ordered[:RECENT]

    def replace_storage(self, job: str, storage: str, backups: list[Manifest]) -> None:
        """What one storage holds now (after a prune): its other entries are gone."""
        kept = [b for b in self._recent.get(job, []) if b.storage != storage]
        self._recent[job] = kept
        self._add(job, [BackupSummary.of(m, storage) for m in backups[:RECENT]])

    def latest(self, job: str) -> BackupSummary | None:
        recent = self._recent.get(job)
        return recent[0] if recent else None

    def recent(self, job: str) -> list[BackupSummary]:
        return list(self._recent.get(job, []))

    def forget(self, job: str) -> None:
        self._recent.pop(job, None)


def one_line(error: str | None, limit: int = 300) -> str | None:
    """The line of an error message that says what went wrong, for a table cell.

    pg_dump and psql put the cause on a line of its own (`pg_dump: error: ...`,
    `FATAL: ...`, `ERROR: ...`): that line, else the first one, whitespace
    collapsed and cut at `limit` characters; control characters become `?`.
    """
    if not error:
        return error
    lines = [" ".join(line.split()) for line in error.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    chosen = lines[0]
    if len(lines) > 1:
        markers = ("error:", "fatal:", "error ", "fatal ")
        cause = next((line for line in lines[1:] if any(m in line.lower() for m in markers)), None)
        if cause is not None and not any(m in chosen.lower() for m in markers):
            chosen = f"{chosen} {cause}"
    chosen = "".join(c if c.isprintable() else "?" for c in chosen)
    return chosen if len(chosen) <= limit else chosen[: limit - 1] + "…"


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_duration(seconds: float | None) -> str:
    """12s, 3m04s, 2h05m, 3d04h: rounded to the unit a person reads."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, round(seconds))
    if seconds < 10 and seconds != s:
        return f"{max(seconds, 0):.1f}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_rate(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else human_size(bytes_per_second) + "/s"


def age_of(when: datetime | None, now: datetime | None = None) -> float | None:
    if when is None:
        return None
    return max(0.0, ((now or now_utc()) - when).total_seconds())
