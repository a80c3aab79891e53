"""Retention plans: which backups survive a policy, and why."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.config import Retention
from backupd.errors import ConfigError
from backupd.retention import BackupRef, plan

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY = 86400.0


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def refs(*specs: str) -> list[BackupRef]:
    """Backups named by their UTC start time; a trailing `!` marks an incomplete one."""
    return [
        BackupRef(
            id=spec.rstrip("!"), started_at=at(spec.rstrip("!")), complete=not spec.endswith("!")
        )
        for spec in specs
    ]


def daily(first: str, last: str, hour: int = 3) -> list[str]:
    day, end, days = datetime.fromisoformat(first), datetime.fromisoformat(last), []
    while day <= end:
        days.append(f"{day:%Y-%m-%d} {hour:02d}:00")
        day += timedelta(days=1)
    return days


GFS = daily("2025-12-20", "2026-01-10")

# (case, backups, policy, tz, now, expected keep {id: reasons}, expected delete, oldest first)
TABLE = [
    (
        "keep_last",
        refs("2026-11-15 02:00", "2026-11-16 02:00", "2026-11-17 02:00", "2026-11-18 02:00"),
        Retention(keep_last=2),
        "UTC",
        NOW,
        {"2026-11-18 02:00": ["newest", "last 2"], "2026-11-17 02:00": ["last 2"]},
        ["2026-11-15 02:00", "2026-11-16 02:00"],
    ),
    (
        "daily keeps the newest of each day, across a month boundary",
        refs(
            "2026-10-30 02:00",
            "2026-10-31 02:00",
            "2026-10-31 14:00",
            "2026-11-01 02:00",
            "2026-11-01 14:00",
        ),
        Retention(keep_daily=2),
        "UTC",
        NOW,
        {
            "2026-11-01 14:00": ["newest", "daily 2026-11-01"],
            "2026-10-31 14:00": ["daily 2026-10-31"],
        },
        ["2026-10-30 02:00", "2026-10-31 02:00", "2026-11-01 02:00"],
    ),
    (
        "GFS tiers across a year boundary (ISO week 2026-W01 starts 2025-12-29)",
        refs(*GFS),
        Retention(keep_daily=3, keep_weekly=2, keep_monthly=2, keep_yearly=2),
        "UTC",
        NOW,
        {
            "2026-01-10 03:00": [
                "newest",
                "daily 2026-01-10",
                "weekly 2026-W02",
                "monthly 2026-01",
                "yearly 2026",
            ],
            "2026-01-09 03:00": ["daily 2026-01-09"],
            "2026-01-08 03:00": ["daily 2026-01-08"],
            "2026-01-04 03:00": ["weekly 2026-W01"],
            "2025-12-31 03:00": ["monthly 2025-12", "yearly 2025"],
        },
        [
            day
            for day in GFS
            if day
            not in {
                "2026-01-10 03:00",
                "2026-01-09 03:00",
                "2026-01-08 03:00",
                "2026-01-04 03:00",
                "2025-12-31 03:00",
            }
        ],
    ),
    (
        "years are counted in the job's zone: 23:30 UTC on new year's eve is 2026 in Berlin",
        refs("2025-12-31 22:30", "2025-12-31 23:30", "2026-06-01 00:00"),
        Retention(keep_yearly=2),
        "Europe/Berlin",
        NOW,
        {"2026-06-01 00:00": ["newest", "yearly 2026"], "2025-12-31 22:30": ["yearly 2025"]},
        ["2025-12-31 23:30"],
    ),
    (
        "fall-back day in Berlin: two UTC days, one local day (2026-10-25)",
        refs("2026-10-24 12:00", "2026-10-24 22:30", "2026-10-25 22:30"),
        Retention(keep_daily=2),
        "Europe/Berlin",
        NOW,
        {
            "2026-10-25 22:30": ["newest", "daily 2026-10-25"],
            "2026-10-24 12:00": ["daily 2026-10-24"],
        },
        ["2026-10-24 22:30"],
    ),
    (
        "spring-forward night in Berlin: one UTC day, two local days",
        refs("2026-03-28 10:00", "2026-03-28 22:30", "2026-03-28 23:30"),
        Retention(keep_daily=2),
        "Europe/Berlin",
        NOW,
        {
            "2026-03-28 23:30": ["newest", "daily 2026-03-29"],
            "2026-03-28 22:30": ["daily 2026-03-28"],
        },
        ["2026-03-28 10:00"],
    ),
    (
        "max_age alone deletes everything older, except the newest",
        refs("2026-11-10 12:00", "2026-11-15 12:00", "2026-11-18 12:00", "2026-11-20 11:00"),
        Retention(max_age=3 * DAY),
        "UTC",
        NOW,
        {"2026-11-20 11:00": ["newest", "within max_age"], "2026-11-18 12:00": ["within max_age"]},
        ["2026-11-10 12:00", "2026-11-15 12:00"],
    ),
    (
        "the newest survives when every rule would delete it",
        refs("2026-11-01 12:00", "2026-11-05 12:00"),
        Retention(max_age=DAY),
        "UTC",
        NOW,
        {"2026-11-05 12:00": ["newest"]},
        ["2026-11-01 12:00"],
    ),
    (
        "rules are a union",
        refs("2026-09-30 12:00", "2026-10-31 12:00", "2026-11-19 12:00", "2026-11-20 10:00"),
        Retention(keep_last=1, keep_monthly=2, max_age=2 * DAY),
        "UTC",
        NOW,
        {
            "2026-11-20 10:00": ["newest", "last 1", "monthly 2026-11", "within max_age"],
            "2026-11-19 12:00": ["within max_age"],
            "2026-10-31 12:00": ["monthly 2026-10"],
        },
        ["2026-09-30 12:00"],
    ),
    (
        "incomplete runs count toward no rule and appear nowhere",
        refs("2026-11-17 02:00", "2026-11-18 02:00", "2026-11-19 02:00!", "2026-11-20 02:00!"),
        Retention(keep_last=1, keep_daily=1),
        "UTC",
        NOW,
        {"2026-11-18 02:00": ["newest", "last 1", "daily 2026-11-18"]},
        ["2026-11-17 02:00"],
    ),
    (
        "an empty policy keeps everything",
        refs("2020-01-01 00:00", "2026-11-19 02:00!", "2026-11-20 02:00"),
        Retention(),
        "UTC",
        NOW,
        {"2026-11-20 02:00": ["newest", "policy empty"], "2020-01-01 00:00": ["policy empty"]},
        [],
    ),
    ("no backups at all", [], Retention(keep_last=3), "UTC", NOW, {}, []),
    ("only failed runs", refs("2026-11-20 02:00!"), Retention(keep_last=3), "UTC", NOW, {}, []),
]


@pytest.mark.parametrize(
    ("backups", "policy", "tz", "now", "keep", "delete"),
    [pytest.param(*case[1:], id=case[0]) for case in TABLE],
)
def test_plan(
    backups: list[BackupRef],
    policy: Retention,
    tz: str,
    now: datetime,
    keep: dict[str, list[str]],
    delete: list[str],
) -> None:
    result = plan(backups, policy, tz, now)
    assert result.keep == keep
    assert result.delete == delete


@dataclass(frozen=True)
class ListedBackup:
    """A backup as a storage listing gives it: no `complete` flag."""

    id: str
    started_at: datetime


def test_any_object_with_id_and_started_at_is_accepted() -> None:
    backups = [ListedBackup("a", at("2026-11-18 02:00")), ListedBackup("b", at("2026-11-19 02:00"))]
    result = plan(backups, Retention(keep_last=1), "UTC", NOW)
    assert result.keep == {"b": ["newest", "last 1"]}
    assert result.delete == ["a"]


def test_confused_input_is_refused_rather_than_pruned() -> None:
    twice = [BackupRef("a", at("2026-11-18 02:00")), BackupRef("a", at("2026-11-19 02:00"))]
    with pytest.raises(ValueError, match="'a' is listed twice"):
        plan(twice, Retention(keep_last=1), "UTC", NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        plan([BackupRef("a", datetime(2026, 11, 18))], Retention(keep_last=1), "UTC", NOW)
    with pytest.raises(ConfigError, match="unknown time zone 'Nowhere/Special'"):
        plan([], Retention(keep_last=1), "Nowhere/Special", NOW)


backup_lists = st.lists(
    st.tuples(
        st.datetimes(
            min_value=datetime(2024, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
        ),
        st.booleans(),
    ),
    max_size=40,
).map(
    lambda rows: [
        BackupRef(id=f"b{n}", started_at=started, complete=complete)
        for n, (started, complete) in enumerate(rows)
    ]
)
policies = st.builds(
    Retention,
    keep_last=st.integers(0, 5),
    keep_daily=st.integers(0, 7),
    keep_weekly=st.integers(0, 4),
    keep_monthly=st.integers(0, 12),
    keep_yearly=st.integers(0, 3),
    max_age=st.none() | st.floats(min_value=0, max_value=400 * DAY),
)


@settings(max_examples=300, deadline=None)
@given(
    backups=backup_lists,
    policy=policies,
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
)
def test_plan_properties(backups: list[BackupRef], policy: Retention, tz: str) -> None:
    result = plan(backups, policy, tz, NOW)
    complete = [b for b in backups if b.complete]
    ids = {b.id for b in complete}
    assert set(result.keep) | set(result.delete) == ids
    assert not set(result.keep) & set(result.delete)
    assert len(result.delete) == len(set(result.delete))
    assert all(result.keep.values())
    if complete:
        newest = max(complete, key=lambda b: (b.started_at, b.id))
        assert "newest" in result.keep[newest.id]
    started = {b.id: b.started_at for b in complete}
    assert [started[i] for i in result.delete] == sorted(started[i] for i in result.delete)
    assert len(result.keep) >= min(policy.keep_last, len(complete))
    if policy.is_empty:
        assert result.delete == []
