"""Cron schedules and the sleeping loop: the only module that imports croniter.

Daylight saving time is the hard part. croniter (7.0) iterating over aware
datetimes fires a fixed-time daily job twice on an autumn fall-back day in some
zones (Europe/Berlin "30 2 * * *": 02:30 CEST and again 02:30 CET) and once in
others, depending on where iteration starts. So `Schedule` asks croniter only
for *wall-clock* candidates (naive datetimes, pure calendar arithmetic) and maps
each one to UTC itself, following Vixie cron's documented rule:

* A **fixed-time** expression (neither the minute nor the hour field starts
  with `*`, e.g. "30 2 * * *") fires once per matching wall time. A wall time
  skipped by spring-forward fires at the first instant after the gap (03:00 on
  a 02:00->03:00 day); a wall time repeated by fall-back fires only at its
  first occurrence.
* A **wall-clock periodic** expression (minute or hour starts with `*`, e.g.
  "0 * * * *", "*/10 * * * * *") follows the clock: wall times in a gap do not
  exist and do not fire, repeated wall times fire at both occurrences. An
  hourly job thus runs every real hour: 23 times on a spring-forward day, 25
  times on a fall-back day, never twice at the same instant.

The loop (`ScheduleLoop`) sleeps on an injectable `Clock`, so tests drive it
with a fake clock and never sleep for real.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from croniter import CroniterBadDateError, croniter

from backupd.config.values import validate_cron
from backupd.errors import ConfigError

log = structlog.get_logger("backupd.scheduler")

_SECOND = timedelta(seconds=1)
_PROBE_START = datetime(2000, 1, 1)


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")


class _Expr:
    """One parsed expression with a reusable croniter over naive wall times."""

    __slots__ = ("cron", "text", "wall_periodic")

    def __init__(self, text: str) -> None:
        fields = text.split()
        six = len(fields) == 6
        minute, hour = fields[1:3] if six else fields[0:2]
        self.text = text
        self.wall_periodic = minute.startswith("*") or hour.startswith("*")
        self.cron = croniter(text, _PROBE_START, second_at_beginning=six)


class Schedule:
    """One or more cron expressions evaluated in one IANA time zone.

    Fire times around DST transitions follow the module doc: a fixed-time
    expression fires once a day (a skipped wall time at the end of the gap,
    a repeated one at its first occurrence); a wall-clock periodic one fires
    at every wall time that exists, at each of its occurrences.

    Equal when the expressions and the zone are equal (a reload keeps the
    state of a job whose schedule did not change). Not thread-safe: the
    parsed expressions keep a croniter cursor.
    """

    __slots__ = ("_exprs", "_zone", "exprs", "tz")

    def __init__(self, exprs: str | Iterable[str], tz: str = "UTC") -> None:
        texts = (exprs,) if isinstance(exprs, str) else tuple(exprs)
        errors = [] if texts else ["a schedule needs at least one cron expression"]
        for text in texts:
            problem = validate_cron(text)
            if problem is not None:
                errors.append(f"cron expression {text!r}: {problem}")
        zone: ZoneInfo | None = None
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            errors.append(f"unknown time zone {tz!r}")
        if errors or zone is None:
            raise ConfigError(errors)
        self.exprs: tuple[str, ...] = texts
        self.tz = tz
        self._zone = zone
        self._exprs = tuple(_Expr(text) for text in texts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.exprs, self.tz) == (other.exprs, other.tz)

    def __hash__(self) -> int:
        return hash((self.exprs, self.tz))

    def __repr__(self) -> str:
        return f"Schedule({self.exprs!r}, {self.tz!r})"

    def next_fire(self, after: datetime) -> datetime:
        """The earliest fire time strictly after `after`, in UTC."""
        _require_aware(after, "after")
        return min(self._next_one(expr, after) for expr in self._exprs)

    def prev_fire(self, at: datetime) -> datetime | None:
        """The latest fire time at or before `at`, in UTC (None if croniter finds none)."""
        _require_aware(at, "at")
        found = [fire for expr in self._exprs if (fire := self._prev_one(expr, at)) is not None]
        return max(found, default=None)

    def _next_one(self, expr: _Expr, after: datetime) -> datetime:
        # Instants only grow with wall time (taking each wall time's first
        # occurrence), except the second occurrence of a repeated hour. Start
        # early enough to see those, stop at the first candidate whose first
        # instant is already past `after`: no later candidate can beat it.
        wall = self._wall(after)
        expr.cron.set_current(wall - self._fold_span(wall) - _SECOND, force=True)
        best: datetime | None = None
        while True:
            instants = self._instants(expr.cron.get_next(datetime), expr.wall_periodic)
            for instant in instants:
                if instant > after and (best is None or instant < best):
                    best = instant
            if instants and instants[0] > after and best is not None:
                return best

    def _prev_one(self, expr: _Expr, at: datetime) -> datetime | None:
        wall = self._wall(at)
        expr.cron.set_current(wall + self._fold_span(wall) + _SECOND, force=True)
        best: datetime | None = None
        while True:
            try:
                candidate = expr.cron.get_prev(datetime)
            except CroniterBadDateError:
                return best
            instants = self._instants(candidate, expr.wall_periodic)
            for instant in instants:
                if instant <= at and (best is None or instant > best):
                    best = instant
            if instants and instants[-1] <= at:
                return best

    def _wall(self, moment: datetime) -> datetime:
        """The naive local wall time of `moment`, whole seconds."""
        return moment.astimezone(self._zone).replace(tzinfo=None, fold=0, microsecond=0)

    def _fold_span(self, wall: datetime) -> timedelta:
        """How long the hour around `wall` repeats (zero unless `wall` is ambiguous)."""
        first = wall.replace(tzinfo=self._zone, fold=0).utcoffset()
        second = wall.replace(tzinfo=self._zone, fold=1).utcoffset()
        assert first is not None and second is not None
        return abs(first - second)

    def _instants(self, wall: datetime, wall_periodic: bool) -> tuple[datetime, ...]:
        """The UTC instants a wall-time candidate fires at, ascending (see module doc)."""
        first = wall.replace(tzinfo=self._zone, fold=0)
        second = wall.replace(tzinfo=self._zone, fold=1)
        offset_first, offset_second = first.utcoffset(), second.utcoffset()
        assert offset_first is not None and offset_second is not None
        early = first.astimezone(UTC)
        if offset_first == offset_second:
            return (early,)
        late = second.astimezone(UTC)
        if offset_first > offset_second:  # clocks went back: wall time occurs twice
            return (early, late) if wall_periodic else (early,)
        # Clocks went forward: wall time does not exist. PEP 495 maps fold=1
        # with the new offset (before the gap) and fold=0 with the old one
        # (after it), so the transition lies between `late` and `early`.
        return () if wall_periodic else (self._transition(late, early, offset_first),)

    def _transition(self, before: datetime, after: datetime, old_offset: timedelta) -> datetime:
        """The first instant in (before, after] whose offset is no longer `old_offset`."""
        while after - before > _SECOND:
            mid = before + timedelta(seconds=int((after - before).total_seconds()) // 2)
            if mid.astimezone(self._zone).utcoffset() == old_offset:
                before = mid
            else:
                after = mid
        return after


def next_fire(exprs: str | Iterable[str], tz: str, after: datetime) -> datetime:
    """The earliest fire time of `exprs` in zone `tz` strictly after `after`, in UTC."""
    return Schedule(exprs, tz).next_fire(after)


class Clock(Protocol):
    """Time as the loop sees it; tests substitute a fake one."""

    def now(self) -> datetime:
        """Wall time, aware, UTC. May jump (NTP steps, manual changes)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never jump; what `sleep` counts."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: `datetime.now(UTC)`, `time.monotonic`, `asyncio.sleep`."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


FireCallback = Callable[[str, datetime], Awaitable[None]]
SkippedCallback = Callable[[str, str, int], None]
NextCallback = Callable[[str, datetime | None], None]


@dataclass(slots=True)
class _JobState:
    schedule: Schedule
    jitter: float
    next_at: datetime  # the next scheduled slot
    due_at: datetime  # next_at plus this slot's jitter: when it actually fires
    last_fired: datetime | None  # no slot at or before this fires again


class ScheduleLoop:
    """Sleeps until the next slot of any job and hands each slot to `fire`.

    `fire(job, scheduled_at)` must only enqueue: the loop awaits it. Each
    job's next slot is computed from its previous *scheduled* slot, so a late
    wake-up neither drifts nor repeats a slot. When the wall clock jumps
    forward past several slots (or the loop wakes that late), the job fires
    once, for the latest passed slot, and the others are reported through
    `skipped(job, "missed", count)` (counted up to `MAX_SKIP_COUNT`). When it
    jumps back, slots at or before the last fired one never fire again.

    `jitter` delays each slot by a random amount in [0, jitter] seconds,
    drawn per slot from `rng`; `fire` still receives the slot itself.
    """

    MAX_SLEEP = 30.0  # seconds of monotonic time between wall-clock checks
    MAX_SKIP_COUNT = 10_000

    def __init__(
        self,
        clock: Clock,
        jobs: Mapping[str, tuple[Schedule, float]],
        fire: FireCallback,
        *,
        skipped: SkippedCallback | None = None,
        on_next: NextCallback | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._fire = fire
        self._skipped = skipped
        self._on_next = on_next
        self._rng = rng or random.Random()
        self._states: dict[str, _JobState] = {}
        self._sleeper: asyncio.Task[None] | None = None
        self.last_tick: float | None = None
        """`clock.monotonic()` when `run` last woke; None before it starts."""
        self.replace(jobs)

    def next_runs(self) -> dict[str, datetime]:
        """When each job fires next (its next slot plus that slot's jitter), UTC."""
        return {name: state.due_at for name, state in self._states.items()}

    def alive(self) -> bool:
        """Whether `run` woke recently enough (for /healthz)."""
        if self.last_tick is None:
            return False
        return self._clock.monotonic() - self.last_tick <= 2 * self.MAX_SLEEP

    def replace(self, jobs: Mapping[str, tuple[Schedule, float]]) -> None:
        """Swap the job set (config reload) and wake the loop.

        A job whose schedule did not change keeps its pending slot and its
        last fired slot; a changed or new one gets its next slot after now,
        and never one at or before the slot it last fired. `on_next` gets
        None for a removed job.
        """
        for name, (_, jitter) in jobs.items():
            if jitter < 0:
                raise ValueError(f"job {name}: jitter must be >= 0, got {jitter}")
        now = self._clock.now()
        states: dict[str, _JobState] = {}
        for name, (schedule, jitter) in jobs.items():
            old = self._states.get(name)
            if old is not None and old.schedule == schedule:
                states[name] = old
                if old.jitter != jitter:
                    old.jitter = jitter
                    self._plan(name, old, old.next_at)
                continue
            last = old.last_fired if old is not None else None
            start = now if last is None else max(now, last)
            state = _JobState(schedule, jitter, start, start, last)
            self._plan(name, state, schedule.next_fire(start))
            states[name] = state
        removed = self._states.keys() - states.keys()
        self._states = states
        if self._on_next is not None:
            for name in sorted(removed):
                self._on_next(name, None)
        if self._sleeper is not None:
            self._sleeper.cancel()

    async def run(self) -> None:
        """Fire jobs until cancelled."""
        while True:
            self.last_tick = self._clock.monotonic()
            await self._fire_due(self._clock.now())
            now = self._clock.now()
            wake = min((state.due_at for state in self._states.values()), default=None)
            delay = self.MAX_SLEEP if wake is None else (wake - now).total_seconds()
            if delay > 0:
                await self._sleep(min(delay, self.MAX_SLEEP))

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the clock; `replace` cuts it short by cancelling the sleeper."""
        self._sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await self._sleeper
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self._sleeper = None

    async def _fire_due(self, now: datetime) -> None:
        due = sorted(
            (state.due_at, name, state)
            for name, state in self._states.items()
            if state.due_at <= now
        )
        for _, name, state in due:
            if self._states.get(name) is not state:  # removed by a reload meanwhile
                continue
            slot = state.next_at
            latest = state.schedule.prev_fire(now - (state.due_at - state.next_at))
            missed = 0
            if latest is not None and latest > slot:
                missed = self._count_slots(state.schedule, slot, latest)
                slot = latest
            state.last_fired = slot
            self._plan(name, state, state.schedule.next_fire(slot))
            if missed and self._skipped is not None:
                self._skipped(name, "missed", missed)
            try:
                await self._fire(name, slot)
            except Exception:
                log.exception("scheduler fire callback failed", job=name, scheduled_at=slot)

    def _count_slots(self, schedule: Schedule, first: datetime, end: datetime) -> int:
        """How many slots lie in [first, end), up to MAX_SKIP_COUNT."""
        count, slot = 0, first
        while slot < end and count < self.MAX_SKIP_COUNT:
            count += 1
            slot = schedule.next_fire(slot)
        return count

    def _plan(self, name: str, state: _JobState, slot: datetime) -> None:
        """Make `slot` the job's next one, draw its jitter, report the change."""
        delay = self._rng.uniform(0, state.jitter) if state.jitter else 0.0
        state.next_at = slot
        state.due_at = slot + timedelta(seconds=delay)
        if self._on_next is not None:
            self._on_next(name, state.due_at)
