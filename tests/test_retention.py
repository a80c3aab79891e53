"""Retention plans: which backups survive a policy, and why."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.catalog.retention import FUTURE_TOLERANCE, BackupRef, in_future, plan
from backupd.config.model import Retention
from backupd.errors import ConfigError

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
        st.frozensets(st.sampled_from(["app", "billing", "globals"]), max_size=3),
    ),
    max_size=40,
).map(
    lambda rows: [
        BackupRef(id=f"b{n}", started_at=started, complete=complete, databases=databases)
        for n, (started, complete, databases) in enumerate(rows)
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
    published=st.integers(0, 40),
)
def test_plan_properties(
    backups: list[BackupRef], policy: Retention, tz: str, published: int
) -> None:
    protect = {f"b{published}"}
    result = plan(backups, policy, tz, NOW, protect)
    complete = [b for b in backups if b.complete]
    ids = {b.id for b in complete}
    assert set(result.keep) | set(result.delete) == ids
    assert not set(result.keep) & set(result.delete)
    assert len(result.delete) == len(set(result.delete))
    assert all(result.keep.values())
    # The just-published backup and every backup dated in the future survive.
    assert not protect & set(result.delete)
    future = [b for b in complete if b.started_at > NOW + FUTURE_TOLERANCE]
    for b in future:
        assert "dated in the future" in result.keep[b.id]
        assert "newest" not in result.keep[b.id]
    current = [b for b in complete if b not in future]
    if current:
        newest = max(current, key=lambda b: (b.started_at, b.id))
        assert "newest" in result.keep[newest.id]
    # For every database, the newest (not future) backup holding it survives.
    for database in {d for b in current for d in b.databases}:
        holder = max(
            (b for b in current if database in b.databases), key=lambda b: (b.started_at, b.id)
        )
        assert holder.id in result.keep
    started = {b.id: b.started_at for b in complete}
    assert [started[i] for i in result.delete] == sorted(started[i] for i in result.delete)
    assert len(result.keep) >= min(policy.keep_last, len(current)) + len(future)
    if policy.is_empty:
        assert result.delete == []


# -- issue 12: a wrong clock, a just-published backup, partial backups ------------------------


def test_a_backup_dated_200_days_ahead_is_kept_and_pushes_no_real_backup_out() -> None:
    backups = refs("2026-11-18 02:00", "2026-11-19 02:00", "2026-11-20 02:00", "2027-06-08 02:00")
    result = plan(backups, Retention(keep_last=1, keep_daily=1), "UTC", NOW)
    assert result.keep == {
        "2027-06-08 02:00": ["dated in the future"],
        "2026-11-20 02:00": ["newest", "last 1", "daily 2026-11-20"],
    }
    assert result.delete == ["2026-11-18 02:00", "2026-11-19 02:00"]


def test_the_future_starts_after_the_tolerance() -> None:
    near = BackupRef("near", NOW + FUTURE_TOLERANCE)
    far = BackupRef("far", NOW + FUTURE_TOLERANCE + timedelta(seconds=1))
    assert not in_future(near, NOW) and in_future(far, NOW)
    result = plan(
        [BackupRef("old", NOW - timedelta(days=1)), near], Retention(keep_last=1), "UTC", NOW
    )
    assert result.keep == {"near": ["newest", "last 1"]} and result.delete == ["old"]
    # A finish time far ahead (a clock stepped mid-run) makes a backup future too.
    stepped = BackupRef("stepped", NOW, finished_at=NOW + timedelta(days=200))
    result = plan(
        [BackupRef("old", NOW - timedelta(days=1)), stepped], Retention(keep_last=1), "UTC", NOW
    )
    assert result.keep == {"stepped": ["dated in the future"], "old": ["newest", "last 1"]}


def test_every_run_under_a_future_backup_keeps_what_it_published() -> None:
    """The issue's scenario, run by run: keep_last = 1 and one backup 200 days ahead."""
    stored = [BackupRef("future", NOW + timedelta(days=200))]
    for hour in range(5):
        published = BackupRef(f"run{hour}", NOW + timedelta(hours=hour))
        stored.append(published)
        result = plan(
            stored, Retention(keep_last=1), "UTC", NOW + timedelta(hours=hour), {published.id}
        )
        assert published.id in result.keep
        assert "future" in result.keep
        stored = [b for b in stored if b.id not in result.delete]
    assert [b.id for b in stored] == ["future", "run4"]


def test_the_published_backup_is_kept_even_when_older_than_the_newest() -> None:
    # A run whose clock lagged publishes a backup older than one already there.
    backups = [
        BackupRef("other", at("2026-11-20 03:00")),
        BackupRef("mine", at("2026-11-20 02:00")),
    ]
    result = plan(backups, Retention(keep_last=1), "UTC", NOW, {"mine"})
    assert result.keep == {"other": ["newest", "last 1"], "mine": ["just published"]}
    assert result.delete == []


def test_the_newest_backup_of_each_database_survives_partial_backups() -> None:
    both = frozenset({"app", "billing", "globals"})
    backups = [
        BackupRef("mon", at("2026-11-16 02:00"), databases=both),
        BackupRef("tue", at("2026-11-17 02:00"), databases=both),
        BackupRef("wed", at("2026-11-18 02:00"), databases=frozenset({"app", "globals"})),
        BackupRef("thu", at("2026-11-19 02:00"), databases=frozenset({"app", "globals"})),
        BackupRef("fri", at("2026-11-20 02:00"), databases=frozenset({"globals"})),
    ]
    result = plan(backups, Retention(keep_last=1), "UTC", NOW)
    assert result.keep == {
        "fri": ["newest", "last 1"],
        "thu": ["newest of database app"],
        "tue": ["newest of database billing"],
    }
    assert result.delete == ["mon", "wed"]
    # A backup dated in the future never stands in for a database's newest copy.
    ahead = BackupRef("ahead", NOW + timedelta(days=200), databases=both)
    result = plan([*backups, ahead], Retention(keep_last=1), "UTC", NOW)
    assert result.keep["tue"] == ["newest of database billing"]
    assert result.keep["ahead"] == ["dated in the future"]
