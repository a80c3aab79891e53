"""The runner's rules, driven through the real Runner with a fake attempt (no PostgreSQL).

Retries with backoff, no overlap, the concurrency limits, the job timeout,
cancellation and shutdown, and what each run publishes to the log, the
metrics, the socket listeners and the notifications. The fake attempt waits on
an event the test sets, so nothing here sleeps; only the timeout test waits for
its own (0.2 s) timeout to fire.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from backupd.catalog.manifest import Manifest, ObjectEntry, now_utc, rfc3339
from backupd.config.file import parse_config
from backupd.config.model import Config, Job, Source
from backupd.daemon.events import Observer, RunChange, notification
from backupd.daemon.runner import AttemptHooks, JobBusy, Run, Runner, StorePool
from backupd.errors import BackupdError, TransientError
from backupd.observe.metrics import Metrics
from backupd.operations.backup import Trigger
from backupd.storage.base import Store
from tests.test_metrics import value

HOLD = "hold"  # an attempt that waits for `FakeAttempt.release`


def runner_config(tmp_path: Path, *, jobs: int = 1, daemon: str = "", job: str = "") -> Config:
    """`jobs` jobs j0, j1... of one source, to a filesystem store in `tmp_path`."""
    text = (
        f"[daemon]\n{daemon}\n"
        '[source.main]\ntype = "postgres"\ndsn = "postgresql://backup@db1/app"\n'
        f'[storage.local]\ntype = "filesystem"\npath = "{tmp_path / "store"}"\n'
    ) + "".join(f'[job.j{i}]\nsource = "main"\nstorage = ["local"]\n{job}\n' for i in range(jobs))
    return parse_config(tomllib.loads(text))


@dataclass
class FakeAttempt:
    """Stands in for a backup attempt: each call plays the next outcome (an exception
    to raise, HOLD, or None for a success at once). A success writes 100 bytes."""

    outcomes: list[BaseException | str | None] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Queue[str] = field(default_factory=asyncio.Queue)  # job of each attempt
    cancelled: int = 0

    async def __call__(
        self, job: Job, source: Source, stores: Mapping[str, Store], run: Run, hooks: AttemptHooks
    ) -> Manifest:
        outcome = self.outcomes.pop(0) if self.outcomes else None
        self.entered.put_nowait(job.name)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == HOLD:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        hooks.progress({"event": "database", "database": "app"})
        hooks.on_bytes(job.storage[0], 100)
        return fake_manifest(job.name, run.attempts)


def fake_manifest(job: str, attempts: int) -> Manifest:
    started = now_utc()
    return Manifest(
        id="ab12cd34",
        job=job,
        kind="full",
        format="custom",
        compression="none",
        encryption=None,
        source={"type": "postgres", "name": "main"},
        tool={"name": "fake", "version": "1"},
        started_at=rfc3339(started),
        finished_at=rfc3339(started),
        duration_seconds=0.0,
        objects=(ObjectEntry("app", "app.dump", 100, 100, "0" * 64),),
        trigger="manual",
        triggered_by=None,
        attempts=attempts,
        backupd_version="test",
    )


@dataclass
class Harness:
    runner: Runner
    attempt: FakeAttempt
    metrics: Metrics
    delays: list[float]  # the backoff sleeps asked for (none taken)
    changes: list[RunChange]  # everything published, in order

    def submit(self, job: str = "j0") -> tuple[Run, asyncio.Queue[dict[str, Any]]]:
        """A manual run of `job` and its socket listener's queue."""
        run = self.runner.submit(job, Trigger("manual", 0, "root"))
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        run.listeners.append(queue)  # before the run's task first runs
        return run, queue

    def notifications(self) -> list[str]:
        return [n for c in self.changes if (n := notification(c)) is not None]

    def attempts(self, job: str, result: str) -> float | None:
        return value(self.metrics, "backupd_job_attempts_total", job=job, result=result)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    """Builds runners over `runner_config(tmp_path, **config)` with a FakeAttempt
    playing `outcomes`, real Metrics and a recording observer; closes their stores."""
    pools: list[StorePool] = []

    def build(
        *outcomes: BaseException | str | None, observers: Sequence[Observer] = (), **config: Any
    ) -> Harness:
        attempt = FakeAttempt(list(outcomes))
        metrics, delays, changes = Metrics(), list[float](), list[RunChange]()

        async def no_backoff(seconds: float) -> None:
            delays.append(seconds)

        pools.append(StorePool())
        runner = Runner(
            runner_config(tmp_path, **config),
            pools[-1],
            metrics=metrics,
            observers=[*observers, changes.append],
            attempt=attempt,
            sleep=no_backoff,
        )
        return Harness(runner, attempt, metrics, delays, changes)

    yield build
    for pool in pools:
        await pool.aclose()


def drain(queue: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a `trigger --wait` client has been sent so far."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


RETRY = 'retry = { max_attempts = 3, initial_delay = "1s", max_delay = "2s" }'


async def test_transient_errors_are_retried_with_jittered_backoff(
    make: Callable[..., Harness],
) -> None:
    h = make(TransientError("db down"), TransientError("db down"), None, job=RETRY)
    run, queue = h.submit()
    with capture_logs() as logs:
        await h.runner.wait(run)
    assert run.state == "success" and run.attempts == 3 and run.error is None
    assert run.size_bytes == 100 and run.bytes_done == 100
    # full jitter: each delay drawn from [0, min(max_delay, initial * 2**n)]
    assert len(h.delays) == 2 and 0 <= h.delays[0] <= 1 and 0 <= h.delays[1] <= 2
    events = drain(queue)
    assert [e.get("event") for e in events] == [
        "running",
        "attempt_failed",
        "retry",
        "attempt_failed",
        "retry",
        "database",
        None,  # the final {"ok", "run"}
    ]
    assert events[1] == {
        "run_id": run.run_id,
        "job": "j0",
        "event": "attempt_failed",
        "attempt": 1,
        "error": "db down",
        "retrying": True,
    }
    assert events[2]["delay_seconds"] == h.delays[0]
    assert events[-1]["ok"] is True and events[-1]["run"]["attempts"] == 3
    assert [(e["event"], e.get("attempt")) for e in logs if e["log_level"] != "debug"] == [
        ("run_started", None),
        ("attempt_failed", 1),
        ("retry_scheduled", 1),
        ("attempt_failed", 2),
        ("retry_scheduled", 2),
        ("run_finished", None),
    ]
    assert h.attempts("j0", "retry") == 2 and h.attempts("j0", "success") == 1
    assert value(h.metrics, "backupd_job_runs_total", job="j0", result="success") == 1
    assert value(h.metrics, "backupd_bytes_written_total", job="j0", storage="local") == 100
    assert h.notifications() == ["start", "retry", "retry", "success"]


async def test_retries_stop_at_max_attempts_and_permanent_errors_are_not_retried(
    make: Callable[..., Harness],
) -> None:
    h = make(*[TransientError("db down")] * 3, BackupdError("no such database"), job=RETRY)
    run, queue = h.submit()
    await h.runner.wait(run)
    assert run.state == "failure" and run.attempts == 3 and run.error == "db down"
    assert [e.get("retrying") for e in drain(queue) if e.get("event") == "attempt_failed"] == [
        True,
        True,
        False,
    ]
    assert h.attempts("j0", "retry") == 2 and h.attempts("j0", "failure") == 1
    assert h.notifications() == ["start", "retry", "retry", "failure"]

    h.delays.clear()
    run = await h.runner.wait(h.runner.submit("j0", Trigger()))
    assert run.state == "failure" and run.attempts == 1 and h.delays == []
    assert run.error == "no such database"


async def test_a_fire_while_the_job_runs_is_skipped_and_counted(
    make: Callable[..., Harness],
) -> None:
    h = make(HOLD)
    first, _ = h.submit()
    assert await h.attempt.entered.get() == "j0"
    with capture_logs() as logs, pytest.raises(JobBusy) as busy:
        h.runner.submit("j0", Trigger("schedule"))
    assert busy.value.run is first and first.run_id in str(busy.value)
    assert logs == [
        {
            "event": "run_skipped",
            "log_level": "info",
            "job": "j0",
            "reason": "overlap",
            "running": first.run_id,
            "trigger": "schedule",
        }
    ]
    assert value(h.metrics, "backupd_job_skipped_total", job="j0", reason="overlap") == 1
    assert h.runner.busy("j0") and h.runner.active() == [first]

    h.attempt.release.set()
    await h.runner.wait(first)
    assert first.state == "success" and not h.runner.busy("j0")
    second = await h.runner.wait(h.runner.submit("j0", Trigger("schedule")))
    assert second.state == "success"  # the job is free again once its run is recorded
    assert [r.run_id for r in h.runner.history("j0")] == [second.run_id, first.run_id]


async def test_a_run_waits_for_a_global_slot_without_holding_one(
    make: Callable[..., Harness],
) -> None:
    h = make(HOLD, None, jobs=2, daemon="max_concurrent_jobs = 1")
    first, _ = h.submit("j0")
    assert await h.attempt.entered.get() == "j0"
    second, _ = h.submit("j1")
    await asyncio.sleep(0)  # one step of its task: it takes the source slot, waits for the global
    assert [c.kind for c in h.changes if c.run is second] == ["queued"]
    assert (first.state, second.state) == ("running", "queued")
    assert h.attempt.entered.empty()
    h.attempt.release.set()
    await h.runner.wait(second)
    assert first.state == second.state == "success"


async def test_the_job_timeout_stops_the_attempt_and_records_a_failure(
    make: Callable[..., Harness],
) -> None:
    h = make(HOLD, job='timeout = "0.2s"')
    run, queue = h.submit()
    await h.runner.wait(run)
    assert run.state == "failure" and run.error == "timed out after 0.2s (job timeout)"
    assert h.attempt.cancelled == 1  # the attempt was cancelled, so it could clean up
    assert h.attempts("j0", "cancelled") == 1
    assert drain(queue)[-1]["run"]["error"] == run.error
    assert h.notifications() == ["start", "failure"]
    assert value(h.metrics, "backupd_job_running", job="j0") == 0


async def test_a_cancelled_run_is_recorded_as_cancelled_and_notifies_nobody(
    make: Callable[..., Harness],
) -> None:
    h = make(HOLD, jobs=2, daemon="max_concurrent_jobs = 1")
    running, _ = h.submit("j0")
    await h.attempt.entered.get()
    queued, _ = h.submit("j1")
    await asyncio.sleep(0)  # its task starts (the cancel comes in a later socket request)
    h.runner.cancel(queued.run_id)  # while it waits for a slot: no attempt was made
    h.runner.cancel(running.run_id)
    await h.runner.wait(running)
    await h.runner.wait(queued)
    assert (running.state, running.error) == ("cancelled", "cancelled")
    assert (queued.state, queued.attempts) == ("cancelled", 0)
    assert h.attempt.cancelled == 1 and h.attempts("j0", "cancelled") == 1
    for job in ("j0", "j1"):
        assert value(h.metrics, "backupd_job_runs_total", job=job, result="cancelled") == 1
        assert value(h.metrics, "backupd_job_running", job=job) == 0
    assert h.notifications() == ["start"]
    with pytest.raises(BackupdError, match="no run"):
        h.runner.cancel(running.run_id)

    # A success after a cancelled run is a recovery.
    run = await h.runner.wait(h.runner.submit("j0", Trigger()))
    assert run.state == "success" and h.notifications() == ["start", "start", "recovered"]


async def test_a_run_cancelled_in_the_turn_it_was_submitted_ends_and_frees_its_job(
    make: Callable[..., Harness],
) -> None:
    h = make(None, None)
    run, queue = h.submit()
    h.runner.cancel(run.run_id)  # before its task took a step
    await h.runner.wait(run)
    assert (run.state, run.error, run.attempts) == ("cancelled", "cancelled", 0)
    assert drain(queue)[-1] == {"ok": False, "run": run.to_dict()}
    assert value(h.metrics, "backupd_job_runs_total", job="j0", result="cancelled") == 1
    assert value(h.metrics, "backupd_job_running", job="j0") == 0
    assert not h.runner.busy("j0") and h.runner.history("j0")[0] is run

    interrupted, _ = h.submit()
    h.runner.interrupt("interrupted by daemon shutdown")
    await h.runner.wait(interrupted)
    assert (interrupted.state, interrupted.error) == ("failure", "interrupted by daemon shutdown")
    assert await h.runner.wait(h.runner.submit("j0", Trigger())) and not h.runner.busy("j0")


async def test_shutdown_interrupts_runs_past_the_grace_as_failures(
    make: Callable[..., Harness],
) -> None:
    h = make(HOLD)
    run, queue = h.submit()
    await h.attempt.entered.get()
    await h.runner.shutdown(grace=0.0)
    assert run.state == "failure"
    assert run.error == "interrupted by daemon shutdown (after shutdown_grace 0s)"
    assert h.attempt.cancelled == 1
    assert drain(queue)[-1] == {"ok": False, "run": run.to_dict()}
    assert h.notifications() == ["start", "failure"]


async def test_an_observer_that_raises_does_not_stop_the_run_or_the_others(
    make: Callable[..., Harness],
) -> None:
    def broken(change: RunChange) -> None:
        raise RuntimeError("observer bug")

    h = make(observers=[broken])
    run, queue = h.submit()
    with capture_logs() as logs:
        await h.runner.wait(run)
    assert run.state == "success" and drain(queue)[-1]["ok"] is True
    assert value(h.metrics, "backupd_job_runs_total", job="j0", result="success") == 1
    assert {e["event"] for e in logs} >= {"run_observer_failed", "run_finished"}
