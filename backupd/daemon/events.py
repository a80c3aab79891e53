"""What happens to a run, as one stream of changes, and the observers that turn it into output.

The runner decides (a fire is skipped, an attempt failed and is retried, a run
ended and is a recovery); it publishes each decision once, as a `RunChange`,
and knows nothing of who listens. Each output is an observer here: the log
(`log_change`), the Prometheus metrics (`metrics_observer`), the `trigger
--wait` clients on the control socket (`to_listeners`), and the notifications
(`notification` says which notification event a change is; the daemon sends
it). An observer is called synchronously, in the run's task and log context,
in the order the runner was given them; one that raises is logged and skipped.

Kind -> log line; metric; socket event; notification:

- `skipped` (a fire while the job runs): `run_skipped`; skipped{reason="overlap"}
- `queued` (the run's task started): running + 1
- `started` (slots taken): `run_started`; socket `running`; notification `start`
- `progress` (the operation's own events): socket, as sent
- `bytes`: bytes written
- `attempt_succeeded`, `attempt_cancelled`: attempts{result}
- `attempt_failed`: `attempt_failed`; attempts{retry or failure}; socket `attempt_failed`
- `retrying` (the backoff sleep begins): `retry_scheduled`; socket `retry`; notification `retry`
- `finished` (recorded in the history): `run_finished`; runs, duration, last
  success or failure, running - 1; the socket's final `{"ok", "run"}`;
  notification `success`, `recovered` or `failure` (a cancel notifies nobody)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog

from backupd.config.model import Job
from backupd.observe.notify import Event

if TYPE_CHECKING:
    from backupd.daemon.runner import Run
    from backupd.operations.backup import Trigger

log = structlog.get_logger("backupd.runner")

ChangeKind = Literal[
    "skipped",
    "queued",
    "started",
    "progress",
    "bytes",
    "attempt_succeeded",
    "attempt_failed",
    "attempt_cancelled",
    "retrying",
    "finished",
]


@dataclass(frozen=True, slots=True)
class RunChange:
    """One thing that happened to `run` (a run of `job`); the other fields are per kind."""

    kind: ChangeKind
    job: Job
    run: Run
    attempt: int = 0  # attempt_*, retrying: the attempt's number
    error: str | None = None  # attempt_failed
    transient: bool = False  # attempt_failed: the error may go away
    retrying: bool = False  # attempt_failed: another attempt follows
    delay_seconds: float = 0.0  # retrying: the backoff before the next attempt
    storage: str = ""  # bytes: written to this storage...
    n: int = 0  # ...this many
    detail: Mapping[str, Any] = field(default_factory=dict)  # progress: the operation's event
    trigger: Trigger | None = None  # skipped: the trigger refused (`run` is the one running)
    duration: float = 0.0  # finished: seconds since submission
    recovered: bool = False  # finished: a success after a failed or cancelled run


Observer = Callable[[RunChange], None]


def log_change(change: RunChange) -> None:
    """The structured log lines of a run (`job` and `run_id` come from the run's context)."""
    run = change.run
    match change.kind:
        case "skipped":
            log.info(
                "run_skipped",
                job=run.job,
                reason="overlap",
                running=run.run_id,
                trigger=change.trigger.kind if change.trigger is not None else None,
            )
        case "started":
            log.info("run_started", trigger=run.trigger.kind, triggered_by=run.trigger.who())
        case "attempt_failed":
            log.warning(
                "attempt_failed",
                attempt=change.attempt,
                error=change.error,
                transient=change.transient,
            )
        case "retrying":
            log.info(
                "retry_scheduled",
                attempt=change.attempt,
                delay_seconds=round(change.delay_seconds, 3),
            )
        case "finished":
            log_fn = log.info if run.state == "success" else log.error
            log_fn(
                "run_finished",
                result=run.state,
                attempts=run.attempts,
                error=run.error,
                backup=run.backup,
                size_bytes=run.size_bytes,
                duration_seconds=run.duration_seconds,
            )


class RunMetrics(Protocol):
    def run_started(self, job: str) -> None: ...
    def run_finished(
        self, job: str, result: str, duration: float, size_bytes: int | None, finished_at: float
    ) -> None: ...
    def attempt(self, job: str, result: str) -> None: ...
    def bytes_written(self, job: str, storage: str, n: int) -> None: ...
    def skipped(self, job: str, reason: str, n: int = 1) -> None: ...


def metrics_observer(metrics: RunMetrics) -> Observer:
    """The run metrics (`observe/metrics.py` documents each)."""

    def observe(change: RunChange) -> None:
        job, run = change.job.name, change.run
        match change.kind:
            case "skipped":
                metrics.skipped(job, "overlap")
            case "queued":  # counted from submission, like `status` and the duration
                metrics.run_started(job)
            case "bytes":
                metrics.bytes_written(job, change.storage, change.n)
            case "attempt_succeeded":
                metrics.attempt(job, "success")
            case "attempt_cancelled":
                metrics.attempt(job, "cancelled")
            case "attempt_failed":
                metrics.attempt(job, "retry" if change.retrying else "failure")
            case "finished":
                finished_at = run.finished_at.timestamp() if run.finished_at else 0.0
                metrics.run_finished(job, run.state, change.duration, run.size_bytes, finished_at)

    return observe


def to_listeners(change: RunChange) -> None:
    """The events a `trigger --wait` client reads from the control socket, in order."""
    run = change.run
    match change.kind:
        case "started":
            run.emit({"event": "running"})
        case "progress":
            run.emit(dict(change.detail))
        case "attempt_failed":
            run.emit(
                {
                    "event": "attempt_failed",
                    "attempt": change.attempt,
                    "error": change.error,
                    "retrying": change.retrying,
                }
            )
        case "retrying":
            run.emit(
                {"event": "retry", "attempt": change.attempt, "delay_seconds": change.delay_seconds}
            )
        case "finished":
            final = {"ok": run.state == "success", "run": run.to_dict()}
            for queue in run.listeners:
                queue.put_nowait(final)


def notification(change: RunChange) -> Event | None:
    """The notification event a change is, if any (a cancel by an operator notifies nobody)."""
    match change.kind:
        case "started":
            return "start"
        case "retrying":
            return "retry"
        case "finished" if change.run.state == "success":
            return "recovered" if change.recovered else "success"
        case "finished" if change.run.state == "failure":
            return "failure"
    return None
