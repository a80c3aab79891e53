"""Which backups to keep: pure, given the backups in storage and a job's policy.

Semantics follow `restic forget`: every rule picks backups to keep and a
backup survives if *any* rule picks it. `keep_daily = N` keeps the newest
backup of each of the N newest days that have a backup (likewise ISO weeks,
months and years), with days taken from `started_at` in the job's time zone,
never from object names. The newest complete backup always survives, so no
policy can leave a job without a backup. Incomplete backups take no part:
they neither count toward a rule nor appear in the plan; the sweeper owns them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from backupd.config import Retention
from backupd.errors import ConfigError


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


def plan(backups: Sequence[Backup], policy: Retention, tz: str, now: datetime) -> RetentionPlan:
    """Decide, for every complete backup, whether to keep it (and why) or delete it.

    An object without a `complete` attribute counts as complete. Raises
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
    newest_first = sorted(complete, key=lambda backup: (backup.started_at, backup.id), reverse=True)
    reasons: dict[str, list[str]] = {backup.id: [] for backup in newest_first}

    if newest_first:
        reasons[newest_first[0].id].append("newest")
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
    delete = [backup.id for backup in reversed(newest_first) if not reasons[backup.id]]
    return RetentionPlan(keep=keep, delete=delete)
