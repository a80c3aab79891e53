"""Which backups to keep: pure, given the backups in storage and a job's policy.

Semantics follow `restic forget`: every rule picks backups to keep and a
backup survives if *any* rule picks it. `keep_daily = N` keeps the newest
backup of each of the N newest days that have a backup (likewise ISO weeks,
months and years), with days taken from `started_at` in the job's time zone,
never from object names. Incomplete backups take no part: they neither count
toward a rule nor appear in the plan; the sweeper owns them.

Whatever the policy, these always survive:

- the newest backup ("newest"), so no policy can leave a job without one;
- for every database any backup holds, the newest backup holding it
  ("newest of database X"), so a partial backup that lacks a database never
  lets retention delete that database's last copy (the newest backup needs
  no such reason: "newest" already keeps it);
- the ids in `protect` ("just published"): the backup a run has just written;
- backups dated more than FUTURE_TOLERANCE ahead of `now` ("dated in the
  future"): written under a wrong clock, they are kept, count toward no rule
  and are never "newest", so one of them cannot push the real backups out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from backupd.config.model import Retention
from backupd.errors import ConfigError

# How far ahead of the clock a backup may be dated before it counts as "in the future":
# clocks of hosts sharing a bucket drift by seconds under NTP, never by minutes.
FUTURE_TOLERANCE = timedelta(minutes=5)


class Backup(Protocol):
    """What retention needs to know of a backup (a manifest fits)."""

    @property
    def id(self) -> str: ...

    @property
    def started_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class BackupRef:
    id: str
    started_at: datetime  # aware
    complete: bool = True
    databases: frozenset[str] = frozenset()
    finished_at: datetime | None = None  # aware; in the future too makes the backup "future"


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    keep: dict[str, list[str]]  # id -> why, newest first
    delete: list[str]  # oldest first


_CALENDAR_RULES: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_daily", "daily", lambda local: local.date().isoformat()),
    ("keep_weekly", "weekly", lambda local: "{}-W{:02d}".format(*local.isocalendar()[:2])),
    ("keep_monthly", "monthly", lambda local: f"{local:%Y-%m}"),
    ("keep_yearly", "yearly", lambda local: f"{local:%Y}"),
)


def in_future(backup: Backup, now: datetime) -> bool:
    """Whether `backup` is dated more than FUTURE_TOLERANCE after `now`."""
    limit = now + FUTURE_TOLERANCE
    finished: datetime | None = getattr(backup, "finished_at", None)
    return backup.started_at > limit or (finished is not None and finished > limit)


def plan(
    backups: Sequence[Backup],
    policy: Retention,
    tz: str,
    now: datetime,
    protect: Collection[str] = (),
) -> RetentionPlan:
    """Decide, for every complete backup, whether to keep it (and why) or delete it.

    An object without a `complete` attribute counts as complete, without
    `databases` as holding none. Ids in `protect` are kept. Raises
    ValueError on naive datetimes or duplicate ids: deleting on confused
    input is the one thing retention must never do.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError([f"unknown time zone {tz!r}"]) from None
    seen: set[str] = set()
    for backup in backups:
        if backup.id in seen:
            raise ValueError(f"backup id {backup.id!r} is listed twice")
        if backup.started_at.tzinfo is None:
            raise ValueError(f"backup {backup.id}: started_at must be timezone-aware")
        seen.add(backup.id)

    complete = [backup for backup in backups if getattr(backup, "complete", True)]
    everything = sorted(complete, key=lambda backup: (backup.started_at, backup.id), reverse=True)
    reasons: dict[str, list[str]] = {backup.id: [] for backup in everything}
    # Rules see only backups dated up to now (and the tolerance); the others are kept.
    newest_first = [backup for backup in everything if not in_future(backup, now)]
    for backup in everything:
        if in_future(backup, now):
            reasons[backup.id].append("dated in the future")

    if newest_first:
        reasons[newest_first[0].id].append("newest")
        covered: set[str] = set(getattr(newest_first[0], "databases", ()))
        for backup in newest_first[1:]:
            for database in sorted(set(getattr(backup, "databases", ())) - covered):
                reasons[backup.id].append(f"newest of database {database}")
                covered.add(database)
    for backup in everything:
        if backup.id in protect:
            reasons[backup.id].append("just published")
    if policy.is_empty:
        for why in reasons.values():
            why.append("policy empty")
    for backup in newest_first[: policy.keep_last]:
        reasons[backup.id].append(f"last {policy.keep_last}")
    for setting, label, bucket_of in _CALENDAR_RULES:
        wanted: int = getattr(policy, setting)
        buckets: set[str] = set()
        for backup in newest_first:
            if len(buckets) >= wanted:
                break
            bucket = bucket_of(backup.started_at.astimezone(zone))
            if bucket not in buckets:
                buckets.add(bucket)
                reasons[backup.id].append(f"{label} {bucket}")
    if policy.max_age is not None:
        for backup in newest_first:
            if (now - backup.started_at).total_seconds() < policy.max_age:
                reasons[backup.id].append("within max_age")

    keep = {backup_id: why for backup_id, why in reasons.items() if why}
    delete = [backup.id for backup in reversed(everything) if not reasons[backup.id]]
    return RetentionPlan(keep=keep, delete=delete)
