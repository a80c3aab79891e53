"""Runs jobs: concurrency limits, no overlap, retries with backoff, timeouts, cancellation.

A *run* is one execution of a job; it makes up to `retry.max_attempts`
*attempts*, retrying only transient errors with exponential backoff and full
jitter (tenacity's `wait_random_exponential`), all inside the job's `timeout`.
A run first takes a slot of its source (`max_concurrent`), then one of the
daemon (`max_concurrent_jobs`), so a run waiting for a busy source never holds
a global slot. A job never runs twice at once: a fire during a run is skipped
and counted.

A run that times out or is cancelled ends within `STOP_DEADLINE` of it, however
stuck its storage is: its attempt is cancelled, gets `CLEANUP_DEADLINE` to
abort its uploads, and the run is recorded (failure "timed out after ...",
cancelled, or failure "interrupted by daemon shutdown") when the attempt has
ended or the deadline has passed, whichever comes first.

The runner decides; what it decides is published once, as a `RunChange`
(`events.py`), to the log, the metrics, the socket listeners and the
notifications. The attempt itself is injected (`backup_attempt` by default),
so these rules are tested with a fake one (tests/test_runner.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
import tenacity

from backupd.catalog.manifest import Manifest, now_utc, rfc3339
from backupd.config.model import Config, Job, Source, Storage
from backupd.daemon.events import (
    ChangeKind,
    Observer,
    RunChange,
    RunMetrics,
    log_change,
    metrics_observer,
    to_listeners,
)
from backupd.errors import BackupdError, UsageError
from backupd.operations.backup import PartialBackup, Trigger, run_backup
from backupd.operations.physical import run_base_backup
from backupd.storage import RetrySettings, open_store
from backupd.storage.base import CLEANUP_DEADLINE, Store
from backupd.storage.opening import OpeningStore

log = structlog.get_logger("backupd.runner")

RunState = Literal["queued", "running", "success", "failure", "cancelled"]

HISTORY_SIZE = 200  # runs kept for `status` and `history`
STOP_DEADLINE = CLEANUP_DEADLINE + 2.0
"""Seconds from a timeout or cancel to the run being recorded and its job free again."""
NODE = socket.gethostname()  # the node a run ran on, in `history`


class StorePool:
    """One open Store per storage config, shared by runs; closed together at the end.

    Keyed by the (frozen) storage config, so a reload that changes a storage
    gets a new client while runs still using the old one keep it. `s3_retry`
    overrides how S3 requests are retried (tests use zero waits).

    A store is opened once, in a task that concurrent callers share (a caller
    cancelled meanwhile does not cancel it); an opening that fails is forgotten,
    so the next call tries again. `opening()` does not wait for it at all.
    """

    def __init__(self, *, s3_retry: RetrySettings | None = None) -> None:
        self._stores: dict[Storage, Store] = {}
        self._openings: dict[Storage, asyncio.Task[Store]] = {}
        self._s3_retry = s3_retry

    def _open(self, cfg: Storage) -> asyncio.Task[Store]:
        task = self._openings.get(cfg)
        if task is None:
            task = asyncio.create_task(self._opened(cfg), name=f"open-storage-{cfg.name}")
            # retrieved here too, for an opening nobody awaited (its run ended first)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._openings[cfg] = task
        return task

    async def _opened(self, cfg: Storage) -> Store:
        try:
            store = self._stores[cfg] = await open_store(cfg, s3_retry=self._s3_retry)
        finally:
            self._openings.pop(cfg, None)
        return store

    async def get(self, cfg: Storage) -> Store:
        store = self._stores.get(cfg)
        return store if store is not None else await asyncio.shield(self._open(cfg))

    def opening(self, cfg: Storage) -> Store:
        """The store for `cfg` at once: the open one, or one still opening, whose calls
        wait for it (and whose uploads hold their first bytes meanwhile: `OpeningStore`)."""
        store = self._stores.get(cfg)
        return store if store is not None else OpeningStore(cfg.name, self._open(cfg))

    async def for_job(self, config: Config, job: Job) -> dict[str, Store]:
        return {name: await self.get(config.storages[name]) for name in job.storage}

    def opening_for_job(self, config: Config, job: Job) -> dict[str, Store]:
        return {name: self.opening(config.storages[name]) for name in job.storage}

    async def aclose(self) -> None:
        if self._openings:  # bounded: an opening makes no request
            _, late = await asyncio.wait(list(self._openings.values()), timeout=CLEANUP_DEADLINE)
            for task in late:
                task.cancel()
        stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            try:
                await store.aclose()
            except Exception as exc:  # cleanup failures are logged, never raised
                log.warning("storage_close_failed", storage=store.name, error=str(exc))


@dataclass
class Run:
    run_id: str
    job: str
    trigger: Trigger
    submitted_at: datetime
    state: RunState = "queued"
    attempts: int = 0
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float | None = None
    backup: str | None = None  # the published backup's stem
    size_bytes: int | None = None
    bytes_done: int = 0  # written so far to the job's first storage (this attempt)
    manifest: Manifest | None = field(default=None, repr=False)  # what the run published
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    interrupted: str | None = field(default=None, repr=False)  # why the daemon stopped it
    node: str = ""  # the daemon running it ([daemon] node)
    scheduled_for: datetime | None = None  # the slot of a scheduled or catch-up run
    claim: Any = field(default=None, repr=False)  # HA: its ha.Claim, kept while it runs
    listeners: list[asyncio.Queue[dict[str, Any]]] = field(default_factory=list, repr=False)

    @property
    def done(self) -> bool:
        return self.state in ("success", "failure", "cancelled")

    def elapsed_seconds(self) -> float | None:
        """Seconds since the run started (None while queued), up to its end once done."""
        if self.started_at is None:
            return None
        end = self.finished_at or now_utc()
        return max(0.0, (end - self.started_at).total_seconds())

    def progress(self) -> dict[str, Any]:
        """Bytes written, elapsed time and rate of a running run."""
        elapsed = self.elapsed_seconds()
        rate = self.bytes_done / elapsed if elapsed else None
        return {
            "bytes_done": self.bytes_done,
            "elapsed_seconds": round(elapsed, 3) if elapsed is not None else None,
            "rate_bytes_per_second": round(rate, 1) if rate is not None else None,
        }

    def to_dict(self) -> dict[str, Any]:
        extra = self.progress() if self.state == "running" else {}
        return extra | {
            "run_id": self.run_id,
            "job": self.job,
            "trigger": self.trigger.kind,
            "triggered_by": self.trigger.who(),
            "state": self.state,
            "result": self.state if self.done else None,
            "attempts": self.attempts,
            "error": self.error,
            "submitted_at": rfc3339(self.submitted_at),
            "started_at": rfc3339(self.started_at) if self.started_at else None,
            "finished_at": rfc3339(self.finished_at) if self.finished_at else None,
            "duration_seconds": self.duration_seconds,
            "backup": self.backup,
            "size_bytes": self.size_bytes,
            "node": self.node,
            "scheduled_for": slot_time(self.scheduled_for) or None,
        }

    def emit(self, event: Mapping[str, Any]) -> None:
        payload = {"run_id": self.run_id, "job": self.job, **event}
        for queue in self.listeners:
            queue.put_nowait(payload)


def slot_time(when: datetime | None) -> str:
    """A slot as manifests record it (`scheduled_for`): RFC 3339 UTC, whole seconds."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else ""


class _JobTimeout(Exception):
    """The job's `timeout` fired (and the attempts were stopped)."""


class JobBusy(BackupdError):
    """The job already has a run queued or in progress."""

    def __init__(self, run: Run) -> None:
        super().__init__(f"job {run.job} is already running (run {run.run_id})")
        self.run = run


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, BackupdError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError))


PostRun = Callable[[Config, Job, Manifest, Mapping[str, Store]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class AttemptHooks:
    """What an attempt reports as it goes: bytes reaching a storage, and the events
    a `trigger --wait` client sees."""

    on_bytes: Callable[[str, int], None]
    progress: Callable[[dict[str, Any]], None]


Attempt = Callable[[Job, Source, Mapping[str, Store], Run, AttemptHooks], Awaitable[Manifest]]
"""One attempt of a run: makes and publishes a backup of the job, or raises. The
runner counts, retries, times out and cancels attempts; tests give it a fake one."""


async def backup_attempt(
    job: Job, source: Source, stores: Mapping[str, Store], run: Run, hooks: AttemptHooks
) -> Manifest:
    """The real attempt: a logical backup, or a base backup for `kind = "physical"` (issue 16)."""
    backup_fn = run_base_backup if job.kind == "physical" else run_backup
    return await backup_fn(
        job,
        source,
        stores,
        trigger=run.trigger,
        scheduled_for=slot_time(run.scheduled_for),
        attempt=run.attempts,
        on_bytes=hooks.on_bytes,
        progress=hooks.progress,
        node=run.node,
        before_publish=run.claim.confirm if run.claim is not None else None,
    )


class Runner:
    """Runs jobs and publishes what happens to each run as `RunChange`s.

    The log and the socket listeners always observe them; `metrics` (when given)
    and `observers` (the daemon's notifications) too, in that order.
    """

    def __init__(
        self,
        config: Config,
        stores: StorePool,
        *,
        metrics: RunMetrics | None = None,
        observers: Sequence[Observer] = (),
        attempt: Attempt = backup_attempt,
        after_success: PostRun | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        node: str = "",
    ) -> None:
        self.node = node or NODE
        self.config = config
        self.stores = stores
        self.after_success = after_success
        self._attempt = attempt
        self._sleep = sleep
        self._observers: list[Observer] = [
            log_change,
            *([metrics_observer(metrics)] if metrics is not None else []),
            *observers,
            to_listeners,
        ]
        self._global = asyncio.Semaphore(config.daemon.max_concurrent_jobs)
        self._sources: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._active: dict[str, Run] = {}  # job -> its queued or running run
        self._runs: dict[str, Run] = {}
        self._history: collections.deque[Run] = collections.deque(maxlen=HISTORY_SIZE)
        self._last_result: dict[str, str] = {}

    # -- queries -------------------------------------------------------------------------

    def active(self) -> list[Run]:
        return list(self._active.values())

    def history(self, job: str | None = None, limit: int = 20) -> list[Run]:
        runs = [r for r in reversed(self._history) if job is None or r.job == job]
        return runs[:limit]

    def last_run(self, job: str) -> Run | None:
        return next((r for r in reversed(self._history) if r.job == job), None)

    # -- control -------------------------------------------------------------------------

    def global_slot(self) -> asyncio.Semaphore:
        """The daemon-wide concurrency limit, for other work that must respect it (verify)."""
        return self._global

    def update_config(self, config: Config) -> None:
        """Runs started from now use `config`; running ones finish on the old one."""
        if config.daemon.max_concurrent_jobs != self.config.daemon.max_concurrent_jobs:
            self._global = asyncio.Semaphore(config.daemon.max_concurrent_jobs)
        self.config = config

    def busy(self, job_name: str) -> bool:
        return job_name in self._active

    def submit(
        self,
        job_name: str,
        trigger: Trigger,
        *,
        scheduled_for: datetime | None = None,
        claim: Any = None,
        run_id: str | None = None,
    ) -> Run:
        """Start a run of `job_name`; raises JobBusy if one is queued or running.

        HA: `claim` (an `ha.Claim` already won) is renewed while the run lasts;
        if it is lost the run stops (failure, saying why) and publishes nothing.
        """
        job = self.config.jobs.get(job_name)
        if job is None:
            raise UsageError(f"unknown job {job_name!r}")
        busy = self._active.get(job_name)
        if busy is not None:
            self._publish(RunChange("skipped", job, busy, trigger=trigger))
            raise JobBusy(busy)
        run = Run(
            run_id=run_id or secrets.token_hex(6),
            job=job_name,
            trigger=trigger,
            submitted_at=now_utc(),
            node=self.node,
            scheduled_for=scheduled_for,
            claim=claim,
        )
        self._active[job_name] = run
        self._runs[run.run_id] = run
        run.task = asyncio.create_task(self._run(self.config, job, run), name=f"run-{run.run_id}")
        run.task.add_done_callback(lambda _: self._if_never_started(job, run))
        return run

    def _if_never_started(self, job: Job, run: Run) -> None:
        """A run cancelled in the same loop turn as its submission ends without `_run`
        taking a step, so nothing of it ran: record it here as `_run` would have
        (queued, then cancelled or interrupted), so its job is free again and its
        listeners hear the end. A run whose `_run` started is already done here."""
        if run.done:
            return
        with structlog.contextvars.bound_contextvars(job=job.name, run_id=run.run_id):
            self._publish(RunChange("queued", job, run))
            if run.interrupted is not None:
                run.state, run.error = "failure", run.interrupted
            else:
                run.state, run.error = "cancelled", "cancelled"
            self._finish(job, run, 0.0)

    def cancel(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None or run.done or run.task is None:
            raise UsageError(f"no run {run_id!r} in progress")
        run.task.cancel()
        return run

    async def wait(self, run: Run) -> Run:
        if run.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.task)
        return run

    def interrupt(self, reason: str) -> None:
        """Stop every queued or running run now; each is recorded as a failure: `reason`."""
        for run in self._active.values():
            if run.task is not None and not run.task.done():
                run.interrupted = reason
                run.task.cancel()

    async def shutdown(self, grace: float) -> None:
        """Let running runs finish within `grace` seconds, then stop the rest.

        A run stopped by the shutdown did not make its backup: it is recorded as a
        failure ("interrupted by daemon shutdown"), not as a cancel by an operator.
        Each ends within `STOP_DEADLINE`, so this returns within `grace + STOP_DEADLINE`.
        """
        tasks = [r.task for r in self._active.values() if r.task is not None]
        if not tasks:
            return
        log.info("shutdown_waiting", runs=len(tasks), grace_seconds=grace)
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            log.warning("shutdown_cancelling", runs=len(pending))
            self.interrupt(f"interrupted by daemon shutdown (after shutdown_grace {grace:g}s)")
            await asyncio.wait(pending)

    # -- one run -------------------------------------------------------------------------

    def _source_slot(self, config: Config, job: Job) -> asyncio.Semaphore:
        limit = config.sources[job.source].max_concurrent
        key = (job.source, limit)
        sem = self._sources.get(key)
        if sem is None:
            sem = self._sources[key] = asyncio.Semaphore(limit)
        return sem

    async def _run(self, config: Config, job: Job, run: Run) -> None:
        structlog.contextvars.bind_contextvars(job=job.name, run_id=run.run_id)
        t0 = time.monotonic()
        # Counted from submission, like `status` and the duration: `_finish` always
        # reports the run, so a run cancelled while queued must have been counted.
        self._publish(RunChange("queued", job, run))
        keeper = self._keep_claim(run)
        try:
            async with self._source_slot(config, job), self._global:
                run.state = "running"
                run.started_at = now_utc()
                self._publish(RunChange("started", job, run))
                manifest = await self._within_timeout(job, run, self._attempts(config, job, run))
            run.backup, run.size_bytes = manifest.stem, manifest.size_bytes
            run.manifest = manifest
            run.state = "success"
        except asyncio.CancelledError:
            if run.interrupted is not None:
                run.state, run.error = "failure", run.interrupted
            else:
                run.state, run.error = "cancelled", "cancelled"
            raise
        except _JobTimeout:
            run.state = "failure"
            run.error = f"timed out after {job.timeout:g}s (job timeout)"
        except Exception as exc:
            run.state = "failure"
            run.error = str(exc) or type(exc).__name__
            if isinstance(exc, PartialBackup):  # published, but lacking some databases
                run.manifest = exc.manifest
                run.backup, run.size_bytes = exc.manifest.stem, exc.manifest.size_bytes
            if not isinstance(exc, BackupdError):
                log.error("run_crashed", error=run.error, exc_info=True)
        finally:
            await self._end_claim(run, keeper)
            self._finish(job, run, time.monotonic() - t0)
            structlog.contextvars.unbind_contextvars("job", "run_id")
        if run.state == "success" and self.after_success is not None:
            try:
                stores = await self.stores.for_job(config, job)
                await self.after_success(config, job, manifest, stores)
            except Exception as exc:
                log.warning("after_success_failed", job=job.name, error=str(exc))

    def _keep_claim(self, run: Run) -> asyncio.Task[None] | None:
        """HA: renew the run's claim while it lasts; a lost claim stops the run."""
        if run.claim is None:
            return None

        def lost(why: str) -> None:
            if run.task is not None and not run.task.done():
                run.interrupted = f"stopped: {why}"
                run.task.cancel()

        return asyncio.create_task(run.claim.keep(lost), name=f"claim-{run.run_id}")

    async def _end_claim(self, run: Run, keeper: asyncio.Task[None] | None) -> None:
        """HA: the slot is done (any result), or released for another node if this
        daemon is shutting down; a lost claim is left to its new holder."""
        if keeper is None:
            return
        keeper.cancel()
        await asyncio.wait([keeper])
        shutdown = (run.interrupted or "").startswith("interrupted by daemon shutdown")
        with contextlib.suppress(Exception):
            await asyncio.shield(run.claim.finish("released" if shutdown else "done"))

    async def _within_timeout(
        self, job: Job, run: Run, attempts: Coroutine[Any, Any, Manifest]
    ) -> Manifest:
        """The attempts, in their own task, within the job's timeout.

        Raises _JobTimeout when the timeout fires, CancelledError when the run is
        cancelled; either way only after the attempts have ended or `STOP_DEADLINE`
        has passed, so a cleanup stuck on a hung store cannot hold the run.
        """
        work = asyncio.create_task(attempts, name=f"attempts-{run.run_id}")
        try:
            done, _ = await asyncio.wait([work], timeout=job.timeout)
        except asyncio.CancelledError:
            await self._stop(work)
            raise
        if not done:
            await self._stop(work)
            raise _JobTimeout
        return work.result()

    async def _stop(self, work: asyncio.Task[Manifest]) -> None:
        work.cancel()
        work.add_done_callback(_retrieved)
        done, _ = await asyncio.wait([work], timeout=STOP_DEADLINE)
        if not done:
            log.error(
                "run_stop_overdue",
                deadline_seconds=STOP_DEADLINE,
                note="the attempt still runs its cleanup; the run is recorded now",
            )

    async def _attempts(self, config: Config, job: Job, run: Run) -> Manifest:
        # Not waited for: the attempt's preflight and dump start while a store opens.
        stores = self.stores.opening_for_job(config, job)
        source = config.sources[job.source]
        first = job.storage[0]

        def on_bytes(storage: str, n: int) -> None:
            if storage == first:
                run.bytes_done += n
            self._publish(RunChange("bytes", job, run, storage=storage, n=n))

        def progress(event: dict[str, Any]) -> None:
            self._publish(RunChange("progress", job, run, detail=event))

        hooks = AttemptHooks(on_bytes, progress)

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(job.retry.max_attempts),
            wait=tenacity.wait_random_exponential(
                multiplier=job.retry.initial_delay,
                exp_base=job.retry.multiplier,
                max=job.retry.max_delay,
            ),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=lambda state: self._before_sleep(job, run, state),
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                run.attempts = attempt.retry_state.attempt_number
                run.bytes_done = 0
                try:
                    manifest = await self._attempt(job, source, stores, run, hooks)
                except asyncio.CancelledError:
                    self._attempt_ended("attempt_cancelled", job, run)
                    raise
                except Exception as exc:
                    self._publish(
                        RunChange(
                            "attempt_failed",
                            job,
                            run,
                            attempt=run.attempts,
                            error=str(exc),
                            transient=is_transient(exc),
                            retrying=is_transient(exc) and run.attempts < job.retry.max_attempts,
                        )
                    )
                    raise
                self._attempt_ended("attempt_succeeded", job, run)
                return manifest
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _attempt_ended(self, kind: ChangeKind, job: Job, run: Run) -> None:
        self._publish(RunChange(kind, job, run, attempt=run.attempts))

    def _before_sleep(self, job: Job, run: Run, state: tenacity.RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        self._publish(
            RunChange("retrying", job, run, attempt=state.attempt_number, delay_seconds=delay)
        )

    def _finish(self, job: Job, run: Run, duration: float) -> None:
        run.finished_at = now_utc()
        run.duration_seconds = round(duration, 3)
        self._active.pop(job.name, None)
        self._history.append(run)
        if len(self._runs) > HISTORY_SIZE * 2:
            keep = {r.run_id for r in self._history} | {r.run_id for r in self._active.values()}
            self._runs = {k: v for k, v in self._runs.items() if k in keep}
        previous = self._last_result.get(job.name)
        self._last_result[job.name] = run.state
        recovered = run.state == "success" and previous in ("failure", "cancelled")
        self._publish(RunChange("finished", job, run, duration=duration, recovered=recovered))

    def _publish(self, change: RunChange) -> None:
        """The one place a run's changes go out: to each observer, in order.

        An observer that raises is a bug in it: logged, and the others still hear
        the change; the run goes on.
        """
        for observer in self._observers:
            try:
                observer(change)
            except Exception:
                log.exception("run_observer_failed", change=change.kind)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """The stopped attempt's outcome, seen (the run already recorded its own)."""
    if not task.cancelled():
        task.exception()
