"""Schedules (fire times across DST transitions) and the sleeping loop on a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from backupd.daemon.scheduler import Schedule, ScheduleLoop, next_fire, validate_cron
from backupd.errors import ConfigError
from tests.fakeclock import FakeClock

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"
LORD_HOWE = "Australia/Lord_Howe"  # 30-minute DST shift


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (expr, tz, after (UTC), expected next fire (UTC)); local times in the comments.
NEXT_FIRE_TABLE = [
    ("0 2 * * *", "UTC", "2026-01-01 00:00", "2026-01-01 02:00"),
    ("0 2 * * *", "UTC", "2026-01-01 02:00", "2026-01-02 02:00"),  # strictly after
    ("* * * * *", "UTC", "2026-01-01 12:00:00.5", "2026-01-01 12:01"),
    ("*/10 * * * * *", "UTC", "2026-01-01 12:00:05", "2026-01-01 12:00:10"),  # seconds first
    ("0 9 * * *", "Asia/Kolkata", "2026-01-01 00:00", "2026-01-01 03:30"),
    # Berlin spring forward, 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC)
    ("30 2 * * *", BERLIN, "2026-03-29 00:00", "2026-03-29 01:00"),  # 02:30 absent -> 03:00
    ("30 2 * * *", BERLIN, "2026-03-29 01:00", "2026-03-30 00:30"),  # then 02:30 CEST
    ("0 30 2 * * *", BERLIN, "2026-03-29 00:00", "2026-03-29 01:00"),  # 6 fields, same rule
    ("0,30 2 * * *", BERLIN, "2026-03-29 00:00", "2026-03-29 01:00"),  # both -> one 03:00
    ("0,30 2 * * *", BERLIN, "2026-03-29 01:00", "2026-03-30 00:00"),
    ("0 * * * *", BERLIN, "2026-03-29 00:00", "2026-03-29 01:00"),  # 01:00 CET -> 03:00 CEST
    ("30 * * * *", BERLIN, "2026-03-29 00:30", "2026-03-29 01:30"),  # 01:30 CET -> 03:30 CEST
    # Berlin fall back, 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC)
    ("30 2 * * *", BERLIN, "2026-10-25 00:00", "2026-10-25 00:30"),  # first 02:30 (CEST)
    ("30 2 * * *", BERLIN, "2026-10-25 00:30", "2026-10-26 01:30"),  # not the second 02:30
    ("30 2 * * *", BERLIN, "2026-10-25 01:15", "2026-10-26 01:30"),  # from inside the repeat
    ("0 * * * *", BERLIN, "2026-10-25 00:30", "2026-10-25 01:00"),  # 02:30 CEST -> 02:00 CET
    ("50 * * * *", BERLIN, "2026-10-25 01:10", "2026-10-25 01:50"),  # 02:10 CET -> 02:50 CET
    # New York: 2026-03-08 02:00 EST -> 03:00 EDT, 2026-11-01 02:00 EDT -> 01:00 EST
    ("30 2 * * *", NEW_YORK, "2026-03-08 06:00", "2026-03-08 07:00"),  # 03:00 EDT
    ("30 1 * * *", NEW_YORK, "2026-11-01 05:00", "2026-11-01 05:30"),  # 01:30 EDT
    ("30 1 * * *", NEW_YORK, "2026-11-01 05:30", "2026-11-02 06:30"),  # not 01:30 EST
    ("30 2 * * *", NEW_YORK, "2026-11-01 00:00", "2026-11-01 07:30"),  # 02:30 EST
    ("0 * * * *", NEW_YORK, "2026-11-01 05:00", "2026-11-01 06:00"),  # 01:00 EDT -> 01:00 EST
    # Lord Howe: 2026-10-04 02:00 -> 02:30 (+10:30 -> +11), 2026-04-05 02:00 -> 01:30
    ("15 2 * * *", LORD_HOWE, "2026-10-03 14:00", "2026-10-03 15:30"),  # 02:30 +11
    ("45 1 * * *", LORD_HOWE, "2026-04-04 14:45", "2026-04-05 15:15"),  # once on the 5th
    ("*/15 * * * *", LORD_HOWE, "2026-04-04 14:45", "2026-04-04 15:00"),  # 01:30 +10:30
    # several expressions: the earliest wins
    (("0 6 * * *", "0 18 * * *"), "UTC", "2026-01-01 07:00", "2026-01-01 18:00"),
]


@pytest.mark.parametrize(("expr", "tz", "after", "expected"), NEXT_FIRE_TABLE)
def test_next_fire(expr: str | tuple[str, ...], tz: str, after: str, expected: str) -> None:
    result = next_fire(expr, tz, utc(after))
    assert result == utc(expected)
    assert result.tzinfo is UTC


# (expr, tz, at (UTC), expected latest fire at or before it (UTC))
PREV_FIRE_TABLE = [
    ("0 2 * * *", "UTC", "2026-01-01 02:00", "2026-01-01 02:00"),  # at a slot: that slot
    ("0 2 * * *", "UTC", "2026-01-01 01:59:59", "2025-12-31 02:00"),
    ("0 0 29 2 *", "UTC", "2026-06-01 00:00", "2024-02-29 00:00"),
    ("30 2 * * *", BERLIN, "2026-03-29 01:00", "2026-03-29 01:00"),  # the 03:00 stand-in
    ("30 2 * * *", BERLIN, "2026-03-29 00:59:59", "2026-03-28 01:30"),
    ("30 2 * * *", BERLIN, "2026-10-25 01:45", "2026-10-25 00:30"),  # first 02:30 only
    ("0 * * * *", BERLIN, "2026-10-25 01:30", "2026-10-25 01:00"),  # 02:00 CET
    ("50 * * * *", BERLIN, "2026-10-25 01:10", "2026-10-25 00:50"),  # 02:50 CEST
    ("30 1 * * *", NEW_YORK, "2026-11-01 06:45", "2026-11-01 05:30"),  # 01:30 EDT
]


@pytest.mark.parametrize(("expr", "tz", "at", "expected"), PREV_FIRE_TABLE)
def test_prev_fire(expr: str, tz: str, at: str, expected: str) -> None:
    assert Schedule(expr, tz).prev_fire(utc(at)) == utc(expected)


def fires_between(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    fires, moment = [], start - timedelta(microseconds=1)
    while (moment := schedule.next_fire(moment)) < end:
        fires.append(moment)
    return fires


# (tz, transition day, fixed-time expr touching the changed hour, its fire that day, as local
#  wall time and fold, hourly fires over the two days, quarter-hourly fires over the two days)
TRANSITIONS = [
    (BERLIN, "2026-03-29", "30 2 * * *", "03:00", 0, 24 + 23, 96 + 92),
    (BERLIN, "2026-10-25", "30 2 * * *", "02:30", 0, 24 + 25, 96 + 100),
    (NEW_YORK, "2026-03-08", "30 2 * * *", "03:00", 0, 24 + 23, 96 + 92),
    (NEW_YORK, "2026-11-01", "30 1 * * *", "01:30", 0, 24 + 25, 96 + 100),
    (LORD_HOWE, "2026-10-04", "15 2 * * *", "02:30", 0, 24 + 23, 96 + 94),
    (LORD_HOWE, "2026-04-05", "45 1 * * *", "01:45", 0, 24 + 24, 96 + 98),
]


def local_window(tz: str, day: str) -> tuple[datetime, datetime]:
    """From local midnight the day before `day` to local midnight after it (~48 h)."""
    midnight = datetime.fromisoformat(day).replace(tzinfo=ZoneInfo(tz))
    return midnight - timedelta(days=1), midnight + timedelta(days=1)


@pytest.mark.parametrize(("tz", "day", "expr", "wall", "fold", "hourly", "quarterly"), TRANSITIONS)
def test_fixed_time_job_fires_once_on_transition_day(
    tz: str, day: str, expr: str, wall: str, fold: int, hourly: int, quarterly: int
) -> None:
    start, end = local_window(tz, day)
    fires = fires_between(Schedule(expr, tz), start, end)
    assert len(fires) == 2
    local = fires[1].astimezone(ZoneInfo(tz))
    assert (local.date().isoformat(), f"{local:%H:%M}", local.fold) == (day, wall, fold)


@pytest.mark.parametrize(("tz", "day", "expr", "wall", "fold", "hourly", "quarterly"), TRANSITIONS)
@pytest.mark.parametrize(("periodic", "step"), [("0 * * * *", 60), ("0 */15 * * * *", 15)])
def test_periodic_job_fires_every_real_interval(
    tz: str,
    day: str,
    expr: str,
    wall: str,
    fold: int,
    hourly: int,
    quarterly: int,
    periodic: str,
    step: int,
) -> None:
    start, end = local_window(tz, day)
    fires = fires_between(Schedule(periodic, tz), start, end)
    assert len(fires) == (hourly if step == 60 else quarterly)
    assert len(set(fires)) == len(fires)
    gaps = {later - earlier for earlier, later in itertools.pairwise(fires)}
    if tz == LORD_HOWE and step == 60:  # a 30-minute shift: one gap of 90 minutes
        assert gaps == {timedelta(minutes=60), timedelta(minutes=90)}
    else:
        assert gaps == {timedelta(minutes=step)}


def test_two_fixed_times_in_the_gap_fire_once() -> None:
    start, end = local_window(BERLIN, "2026-03-29")
    fires = fires_between(Schedule("0,30 2 * * *", BERLIN), start, end)
    assert fires == [utc("2026-03-28 01:00"), utc("2026-03-28 01:30"), utc("2026-03-29 01:00")]


EXPRESSIONS = ["30 2 * * *", "0 * * * *", "*/20 * * * *", "45 1 * * *", "0,30 2 * * *"]


@settings(max_examples=300, deadline=None)
@given(
    expr=st.sampled_from(EXPRESSIONS),
    tz=st.sampled_from([BERLIN, NEW_YORK, LORD_HOWE]),
    moment=st.datetimes(
        min_value=datetime(2026, 3, 1), max_value=datetime(2026, 11, 30), timezones=st.just(UTC)
    ),
)
def test_next_and_prev_fire_agree(expr: str, tz: str, moment: datetime) -> None:
    schedule = Schedule(expr, tz)
    upcoming = schedule.next_fire(moment)
    assert upcoming > moment
    assert schedule.prev_fire(upcoming) == upcoming
    before = schedule.prev_fire(upcoming - timedelta(microseconds=1))
    assert before is not None and before <= moment  # nothing fires in between


def test_schedule_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        Schedule(["61 * * * *", "0 0 30 2 *", "* * *"], "Mars/Olympus")
    message = str(caught.value)
    assert len(caught.value.errors) == 4
    assert "'61 * * * *'" in message
    assert "'0 0 30 2 *': matches no date" in message
    assert "got 3" in message
    assert "unknown time zone 'Mars/Olympus'" in message
    with pytest.raises(ConfigError, match="at least one cron expression"):
        Schedule([], "UTC")


def test_validate_cron() -> None:
    assert validate_cron("*/10 * * * * *") is None
    assert validate_cron("0 2 * * 1-5") is None
    assert validate_cron("0 0 30 2 *") == "matches no date (such as February 30)"
    assert validate_cron("0 2 * *") == "expected 5 fields, or 6 with seconds first, got 4"


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Schedule("* * * * *").next_fire(datetime(2026, 1, 1))


def test_schedules_compare_by_expressions_and_zone() -> None:
    assert Schedule("0 2 * * *", BERLIN) == Schedule(["0 2 * * *"], BERLIN)
    assert Schedule("0 2 * * *", BERLIN) != Schedule("0 2 * * *", "UTC")
    assert len({Schedule("0 2 * * *"), Schedule(("0 2 * * *",))}) == 1


# --- the loop, on a fake clock -------------------------------------------------------------

T0 = utc("2026-05-04 12:00")


class Recorder:
    """What the loop told the daemon: fires (with the clock time), skips, next times."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.fired: list[tuple[str, datetime, datetime]] = []
        self.skips: list[tuple[str, str, int]] = []
        self.next: dict[str, datetime | None] = {}

    async def fire(self, job: str, scheduled_at: datetime) -> None:
        self.fired.append((job, scheduled_at, self.clock.now()))

    def skipped(self, job: str, reason: str, count: int) -> None:
        self.skips.append((job, reason, count))

    def on_next(self, job: str, when: datetime | None) -> None:
        self.next[job] = when

    def slots(self, job: str) -> list[datetime]:
        return [slot for name, slot, _ in self.fired if name == job]


def make_loop(
    clock: FakeClock,
    jobs: dict[str, tuple[Schedule, float]],
    rng: random.Random | None = None,
) -> tuple[ScheduleLoop, Recorder]:
    recorder = Recorder(clock)
    loop = ScheduleLoop(
        clock,
        jobs,
        recorder.fire,
        skipped=recorder.skipped,
        on_next=recorder.on_next,
        rng=rng,
    )
    return loop, recorder


@asynccontextmanager
async def running(loop: ScheduleLoop, clock: FakeClock) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(loop.run())
    await clock.wait_for_sleepers()
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def reload(
    loop: ScheduleLoop, clock: FakeClock, jobs: dict[str, tuple[Schedule, float]]
) -> None:
    """Replace the job set and let the woken loop go back to sleep."""
    loop.replace(jobs)
    await clock.wait_for_sleepers()


def minutes(*values: int) -> list[datetime]:
    return [T0 + timedelta(minutes=value) for value in values]


async def test_six_field_schedule_fires_every_ten_seconds() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"ten": (Schedule("*/10 * * * * *"), 0.0)})
    async with running(loop, clock):
        await clock.advance(60)
    expected = [T0 + timedelta(seconds=10 * n) for n in range(1, 7)]
    assert seen.fired == [("ten", at, at) for at in expected]


async def test_late_wake_up_fires_the_slot_without_drift() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"m": (Schedule("* * * * *"), 0.0)})
    async with running(loop, clock):
        await clock.advance(30)
        clock.stall(55)  # the event loop was blocked past the 12:01 slot
        await clock.advance(0)
        await clock.advance(35)
    late = T0 + timedelta(minutes=1, seconds=25)
    assert seen.fired == [("m", minutes(1)[0], late), ("m", minutes(2)[0], minutes(2)[0])]
    assert seen.skips == []


async def test_forward_clock_jump_fires_once_and_counts_the_missed_slots() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"m": (Schedule("* * * * *"), 0.0)})
    async with running(loop, clock):
        await clock.advance(60)
        clock.jump(600)  # NTP step: 12:01 -> 12:11
        await clock.advance(60)
    assert seen.slots("m") == minutes(1, 11, 12)
    assert seen.skips == [("m", "missed", 9)]  # 12:02 .. 12:10


async def test_backward_clock_jump_never_fires_a_slot_twice() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"m": (Schedule("* * * * *"), 0.0)})
    async with running(loop, clock):
        await clock.advance(120)
        clock.jump(-300)  # 12:02 -> 11:57
        await clock.advance(600)  # the wall clock reaches 12:07
    assert seen.slots("m") == minutes(1, 2, 3, 4, 5, 6, 7)
    assert all(fired_at == slot for _, slot, fired_at in seen.fired)


async def test_reload_mid_minute_does_not_fire_a_slot_twice() -> None:
    clock = FakeClock(T0)
    every_minute = Schedule("* * * * *")
    loop, seen = make_loop(clock, {"same": (every_minute, 0.0), "changed": (every_minute, 0.0)})
    async with running(loop, clock):
        await clock.advance(90)
        await reload(
            loop,
            clock,
            {
                "same": (Schedule("* * * * *"), 0.0),
                "changed": (Schedule("*/1 * * * *"), 0.0),
                "new": (every_minute, 0.0),
            },
        )
        await clock.advance(90)
    assert seen.slots("same") == minutes(1, 2, 3)
    assert seen.slots("changed") == minutes(1, 2, 3)
    assert seen.slots("new") == minutes(2, 3)


async def test_reload_after_the_clock_went_back_does_not_refire() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"m": (Schedule("* * * * *"), 0.0)})
    async with running(loop, clock):
        await clock.advance(60)
        clock.jump(-300)  # 12:01 -> 11:56
        await reload(loop, clock, {"m": (Schedule("*/1 * * * *"), 0.0)})  # changed: recomputed
        await clock.advance(360)  # the wall clock reaches 12:02
    assert seen.slots("m") == minutes(1, 2)


class FixedRng(random.Random):
    """Draws `fraction` of the range, every time."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


async def test_reload_keeps_a_pending_jittered_slot() -> None:
    clock = FakeClock(T0)
    jobs = {"m": (Schedule("* * * * *"), 40.0)}
    loop, seen = make_loop(clock, jobs, rng=FixedRng(0.5))
    async with running(loop, clock):
        await clock.advance(70)  # slot 12:01 is due at 12:01:20
        await reload(loop, clock, {"m": (Schedule("* * * * *"), 40.0)})
        await clock.advance(20)
    assert seen.fired == [("m", minutes(1)[0], minutes(1)[0] + timedelta(seconds=20))]


async def test_reload_wakes_the_loop_for_an_earlier_job() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"nightly": (Schedule("0 0 * * *"), 0.0)})
    async with running(loop, clock):
        await clock.advance(1)
        jobs = {"nightly": (Schedule("0 0 * * *"), 0.0), "fast": (Schedule("*/5 * * * * *"), 0.0)}
        await reload(loop, clock, jobs)
        await clock.advance(4)
    fire_time = T0 + timedelta(seconds=5)
    assert seen.fired == [("fast", fire_time, fire_time)]


async def test_jitter_delays_each_slot_by_its_own_draw() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"m": (Schedule("* * * * *"), 30.0)}, rng=random.Random(7))
    async with running(loop, clock):
        await clock.advance(200)
    reference = random.Random(7)
    delays = [timedelta(seconds=reference.uniform(0, 30)) for _ in range(3)]
    assert seen.fired == [
        ("m", slot, slot + delay) for slot, delay in zip(minutes(1, 2, 3), delays, strict=True)
    ]
    assert all(timedelta(0) <= delay <= timedelta(seconds=30) for delay in delays)


async def test_jitter_longer_than_the_period_neither_drifts_nor_drops_slots() -> None:
    clock = FakeClock(T0)
    loop, seen = make_loop(clock, {"m": (Schedule("* * * * *"), 90.0)}, rng=FixedRng(0.8))
    async with running(loop, clock):
        await clock.advance(60 * 4 + 12)
    delay = timedelta(seconds=72)
    assert seen.fired == [("m", slot, slot + delay) for slot in minutes(1, 2, 3)]
    assert seen.skips == []


async def test_next_runs_and_on_next_follow_fires_and_reloads() -> None:
    clock = FakeClock(T0)
    jobs = {"a": (Schedule("* * * * *"), 0.0), "b": (Schedule("0 3 * * *", BERLIN), 0.0)}
    loop, seen = make_loop(clock, jobs)
    expected = {"a": minutes(1)[0], "b": utc("2026-05-05 01:00")}
    assert loop.next_runs() == expected
    assert seen.next == expected
    async with running(loop, clock):
        await clock.advance(60)
        assert loop.next_runs()["a"] == seen.next["a"] == minutes(2)[0]
        await reload(loop, clock, {"a": jobs["a"]})
    assert loop.next_runs() == {"a": minutes(2)[0]}
    assert seen.next["b"] is None


async def test_alive_while_the_loop_wakes() -> None:
    clock = FakeClock(T0)
    loop, _ = make_loop(clock, {"nightly": (Schedule("0 0 * * *"), 0.0)})
    assert not loop.alive()
    async with running(loop, clock):
        await clock.advance(600)
        assert loop.alive()
        assert loop.last_tick is not None and clock.monotonic() - loop.last_tick <= 30
    clock.stall(120)
    assert not loop.alive()


async def test_failing_fire_callback_does_not_stop_the_loop() -> None:
    clock = FakeClock(T0)
    fired: list[str] = []

    async def fire(job: str, scheduled_at: datetime) -> None:
        if job == "bad":
            raise RuntimeError("queue closed")
        fired.append(job)

    every_minute = Schedule("* * * * *")
    loop = ScheduleLoop(clock, {"bad": (every_minute, 0.0), "good": (every_minute, 0.0)}, fire)
    with capture_logs() as logs:
        async with running(loop, clock):
            await clock.advance(120)
    assert fired == ["good", "good"]
    failures = [entry for entry in logs if entry["event"] == "scheduler fire callback failed"]
    assert [entry["job"] for entry in failures] == ["bad", "bad"]


async def test_a_thousand_jobs_in_one_minute_each_fire_once() -> None:
    began = time.perf_counter()
    clock = FakeClock(T0)
    jobs = {f"job{n}": (Schedule(f"{n % 60} 1 12 * * *"), 0.0) for n in range(1000)}
    loop, seen = make_loop(clock, jobs)
    async with running(loop, clock):
        await clock.advance(180)
    elapsed = time.perf_counter() - began
    assert sorted(job for job, _, _ in seen.fired) == sorted(jobs)
    assert all(
        slot == fired_at == T0 + timedelta(minutes=1, seconds=int(job[3:]) % 60)
        for job, slot, fired_at in seen.fired
    )
    # 1.0-2.4 s seen here at load 4-8 on 2 cores; the bound leaves room for a loaded host
    # (1.0 s was exceeded at load 8) while still catching a quadratic scheduler.
    assert elapsed < 3.0
