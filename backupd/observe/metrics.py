"""Every Prometheus metric backupd exposes, on one object that owns its registry.

The names, types and labels of the SPEC's metrics are a contract with
dashboards and alert rules (`config/grafana-dashboard.json`,
`config/prometheus-rules.yml`): change them only on purpose. Callers report
domain events (`run_started`, `run_finished`, ...) and never touch a metric
directly, so the label vocabulary stays in this module.

Label values are bounded: `job`, `storage` and `notifier` come from the config,
`result` and `reason` from the tuples below (an unknown one is a programming
error and raises `ValueError`). Never a run id, a DSN or a URL.

Metrics beyond the SPEC:

- `backupd_retention_delete_errors_total{job,storage}`: backups retention
  wanted to delete but could not; old backups pile up and cost money.
- `backupd_notify_failures_total{notifier}`: notifications given up on after
  their retries; a silent notifier hides failed backups.
- `backupd_manifests_invalid{job,storage}`: manifests the last listing of that
  storage skipped as invalid (unparseable, wrong types, too large, stored
  under a key that is not theirs). A gauge, not a counter: each listing sees
  the same bad objects again. They are not backups and nothing deletes them.
- `backupd_backups_future{job,storage}`: backups in the last listing dated
  more than 5 minutes ahead of the clock (a host with a wrong clock). They are
  kept, count toward no retention rule, and never set the last success.
- `backupd_config_last_reload_successful`: 1 if the last reload applied (or no
  reload happened yet), 0 if the daemon is running an older config than the
  file on disk.
- the standard `process_*` metrics (memory, open fds, start time) of the daemon.

`backupd_job_attempts_total` results: `success`; `retry` (the attempt failed
and another one follows); `failure` (the attempt failed and the run gives up);
`cancelled`. Retries per job are therefore `attempts_total{result="retry"}`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from backupd import __version__
from backupd.observe.exposition import TextExposition

RUN_RESULTS = ("success", "failure", "cancelled")
ATTEMPT_RESULTS = ("success", "retry", "failure", "cancelled")
SKIP_REASONS = ("overlap", "missed")  # job still running; fire time missed without catch_up
VERIFY_RESULTS = ("success", "failure")
CLAIM_RESULTS = ("won", "lost", "taken_over")
RELOAD_RESULTS = ("success", "failure")

# Backups take seconds (a small schema) to hours (a large cluster): 10 s .. 12 h, nine
# buckets: every one is a series per job, and a daemon may have a thousand jobs.
DURATION_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0)


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


class Metrics:
    """backupd's metrics in a registry of their own (a fresh one per instance)."""

    def __init__(self, version: str = __version__) -> None:
        self.wal_lags: dict[str, float] = {}  # the last lag measured per physical job
        # No `*_created` series: they double the counters' exposition (a thousand jobs
        # make tens of thousands of lines) and nothing here uses them. The switch is
        # prometheus_client's, process-wide; backupd is the only user in its process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self._runs = Counter(
            "backupd_job_runs_total", "Runs finished, by result.", ["job", "result"], registry=r
        )
        self._attempts = Counter(
            "backupd_job_attempts_total",
            "Attempts finished inside runs, by result (retry: another attempt follows).",
            ["job", "result"],
            registry=r,
        )
        self._duration = Histogram(
            "backupd_job_duration_seconds",
            "Wall-clock duration of finished runs, retries included.",
            ["job"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._last_success = Gauge(
            "backupd_job_last_success_timestamp_seconds",
            "Finish time of the newest successful backup (from storage at start-up).",
            ["job"],
            registry=r,
        )
        self._last_failure = Gauge(
            "backupd_job_last_failure_timestamp_seconds",
            "Finish time of the newest failed run of this daemon.",
            ["job"],
            registry=r,
        )
        self._last_size = Gauge(
            "backupd_job_last_size_bytes",
            "Stored size of the newest successful backup.",
            ["job"],
            registry=r,
        )
        self._next_run = Gauge(
            "backupd_job_next_run_timestamp_seconds",
            "When the scheduler will next start this job; absent for jobs without a schedule.",
            ["job"],
            registry=r,
        )
        self._running = Gauge(
            "backupd_job_running", "Runs of this job in progress.", ["job"], registry=r
        )
        self._skipped = Counter(
            "backupd_job_skipped_total",
            "Fire times that did not start a run, by reason.",
            ["job", "reason"],
            registry=r,
        )
        self._claims = Counter(  # HA (issue 17)
            "backupd_claims_total",
            "Claims of (job, slot) in HA mode: won, lost to another node, taken over.",
            ["job", "result"],
            registry=r,
        )
        self._bytes_written = Counter(
            "backupd_bytes_written_total",
            "Bytes written to storage (after compression and encryption).",
            ["job", "storage"],
            registry=r,
        )
        self._backups = Gauge(
            "backupd_backups",
            "Backups in storage after the last listing.",
            ["job", "storage"],
            registry=r,
        )
        self._manifests_invalid = Gauge(
            "backupd_manifests_invalid",
            "Manifests the last listing skipped as invalid (not backups; never deleted).",
            ["job", "storage"],
            registry=r,
        )
        self._backups_future = Gauge(
            "backupd_backups_future",
            "Backups in the last listing dated more than 5 minutes ahead of the clock.",
            ["job", "storage"],
            registry=r,
        )
        self._retention_deleted = Counter(
            "backupd_retention_deleted_total",
            "Backups deleted by retention.",
            ["job", "storage"],
            registry=r,
        )
        self._retention_errors = Counter(
            "backupd_retention_delete_errors_total",
            "Backups retention failed to delete.",
            ["job", "storage"],
            registry=r,
        )
        self._last_verify = Gauge(
            "backupd_last_verify_timestamp_seconds",
            "When a backup of this job was last verified, by result.",
            ["job", "result"],
            registry=r,
        )
        # -- physical jobs (issue 16): the WAL archive and the restorable window --
        self._wal_segments = Counter(
            "backupd_wal_archived_segments_total",
            "WAL segments (and timeline history files) stored in every storage of the job.",
            ["job"],
            registry=r,
        )
        self._wal_last = Gauge(
            "backupd_wal_last_archived_timestamp_seconds",
            "When the newest WAL was stored (completed segments and the growing one).",
            ["job"],
            registry=r,
        )
        self._wal_lag = Gauge(
            "backupd_wal_archive_lag_seconds",
            "How far the newest WAL in storage is behind the server (live RPO); 0 when "
            "everything the server wrote is stored.",
            ["job"],
            registry=r,
        )
        self._wal_max_lag = Gauge(
            "backupd_wal_max_lag_seconds",
            "The job's wal.max_lag: the archive lag above which the alert fires.",
            ["job"],
            registry=r,
        )
        self._drill_rto = Gauge(
            "backupd_restore_drill_rto_seconds",
            "Physical jobs: how long the last restore drill took from the start of the "
            "restore until the server was promoted (a measured RTO).",
            ["job"],
            registry=r,
        )
        self._window = Gauge(
            "backupd_restorable_window_seconds",
            "Unix time of the earliest and latest moment the job can be restored to.",
            ["job", "edge"],
            registry=r,
        )
        self._reloads = Counter(
            "backupd_config_reload_total", "Config reloads, by result.", ["result"], registry=r
        )
        self._reload_ok = Gauge(
            "backupd_config_last_reload_successful",
            "1 if the last config reload was applied, 0 if it was rejected.",
            registry=r,
        )
        self._notify_failures = Counter(
            "backupd_notify_failures_total",
            "Notifications given up on after their retries.",
            ["notifier"],
            registry=r,
        )
        build_info = Gauge(
            "backupd_build_info", "Always 1; the version as a label.", ["version"], registry=r
        )
        build_info.labels(version).set(1)
        for result in RELOAD_RESULTS:
            self._reloads.labels(result)
        self._reload_ok.set(1)
        process = ProcessCollector(registry=r)
        self._last_success_ts: dict[str, float] = {}
        # The metrics with a `job` label, in the order registered.
        self._per_job = (
            self._runs,
            self._attempts,
            self._duration,
            self._last_success,
            self._last_failure,
            self._last_size,
            self._next_run,
            self._running,
            self._skipped,
            self._claims,
            self._bytes_written,
            self._backups,
            self._manifests_invalid,
            self._backups_future,
            self._retention_deleted,
            self._retention_errors,
            self._last_verify,
            self._wal_segments,
            self._wal_last,
            self._wal_lag,
            self._wal_max_lag,
            self._drill_rto,
            self._window,
        )
        # Every collector above, in the order registered: /metrics renders them so.
        self._text = TextExposition(
            [
                *self._per_job,
                self._reloads,
                self._reload_ok,
                self._notify_failures,
                build_info,
                process,
            ]
        )

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what /metrics serves)."""
        return self._text.render()

    # -- configuration -------------------------------------------------------------

    def jobs_configured(self, names: Iterable[str]) -> None:
        """Create the per-job series at 0 so `increase()` and absence checks work at once.

        Timestamps are not created: absent means "not known yet", which alert
        rules treat differently from a 1970 timestamp.
        """
        for job in names:
            for result in RUN_RESULTS:
                self._runs.labels(job, result)
            for result in ATTEMPT_RESULTS:
                self._attempts.labels(job, result)
            for reason in SKIP_REASONS:
                self._skipped.labels(job, reason)
            self._duration.labels(job)
            self._running.labels(job).set(0)

    def forget_job(self, job: str) -> None:
        """Drop every series of a job a reload removed, so it stops being alerted on."""
        for metric in self._per_job:
            metric.remove_by_labels({"job": job})
        self._last_success_ts.pop(job, None)
        self.wal_lags.pop(job, None)

    def notifiers_configured(self, names: Iterable[str]) -> None:
        """Create each notifier's failure counter at 0."""
        for name in names:
            self._notify_failures.labels(name)

    def config_reloaded(self, result: str) -> None:
        _check(result, RELOAD_RESULTS, "reload result")
        self._reloads.labels(result).inc()
        self._reload_ok.set(1 if result == "success" else 0)

    # -- runs ----------------------------------------------------------------------

    def run_started(self, job: str) -> None:
        self._running.labels(job).inc()

    def attempt(self, job: str, result: str) -> None:
        """One attempt inside a run ended; see the module docstring for `result`."""
        self._attempts.labels(job, _check(result, ATTEMPT_RESULTS, "attempt result")).inc()

    def run_finished(
        self,
        job: str,
        result: str,
        duration: float,
        size_bytes: int | None,
        finished_at: float,
    ) -> None:
        """A run ended. `size_bytes` is the stored size of the backup a success left."""
        self._runs.labels(job, _check(result, RUN_RESULTS, "run result")).inc()
        self._duration.labels(job).observe(duration)
        self._running.labels(job).dec()
        if result == "success":
            self._record_success(job, finished_at, size_bytes)
        elif result == "failure":
            self._last_failure.labels(job).set(finished_at)

    def claim(self, job: str, result: str) -> None:
        """HA (issue 17): a claim won, lost or taken over."""
        self._claims.labels(job, _check(result, CLAIM_RESULTS, "claim result")).inc()

    def skipped(self, job: str, reason: str, n: int = 1) -> None:
        self._skipped.labels(job, _check(reason, SKIP_REASONS, "skip reason")).inc(n)

    def next_run(self, job: str, ts: float | None) -> None:
        """The scheduler's next fire time; None removes it (no schedule, or stopping)."""
        if ts is None:
            self._next_run.remove_by_labels({"job": job})
        else:
            self._next_run.labels(job).set(ts)

    def bytes_written(self, job: str, storage: str, n: int) -> None:
        self._bytes_written.labels(job, storage).inc(n)

    # -- storage -------------------------------------------------------------------

    def backups_in_storage(
        self,
        job: str,
        storage: str,
        count: int,
        last_success_ts: float | None,
        last_size: int | None,
        invalid: int = 0,
        future: int = 0,
    ) -> None:
        """What a listing of one storage found for one job.

        Called at start-up so a restarted daemon reports its real last
        success instead of "never", and after each listing. The newest
        success across storages wins; a listing never moves it back.
        `invalid` manifests were skipped; `future` backups (counted in
        `count`) are dated ahead of the clock.
        """
        self._backups.labels(job, storage).set(count)
        self._manifests_invalid.labels(job, storage).set(invalid)
        self._backups_future.labels(job, storage).set(future)
        self._bytes_written.labels(job, storage)
        self._retention_deleted.labels(job, storage)
        self._retention_errors.labels(job, storage)
        if last_success_ts is not None:
            self._record_success(job, last_success_ts, last_size)

    def retention_deleted(self, job: str, storage: str, n: int) -> None:
        self._retention_deleted.labels(job, storage).inc(n)

    def retention_delete_failed(self, job: str, storage: str, n: int = 1) -> None:
        self._retention_errors.labels(job, storage).inc(n)

    def verified(self, job: str, result: str, ts: float) -> None:
        self._last_verify.labels(job, _check(result, VERIFY_RESULTS, "verify result")).set(ts)

    # -- notifications -------------------------------------------------------------

    # -- physical jobs (issue 16) ----------------------------------------------------

    def wal_archived(self, job: str, segments: int, ts: float) -> None:
        if segments:
            self._wal_segments.labels(job).inc(segments)
        self._wal_last.labels(job).set(ts)

    def wal_configured(self, job: str, max_lag: float) -> None:
        self._wal_max_lag.labels(job).set(max_lag)

    def wal_lag(self, job: str, seconds: float) -> None:
        self._wal_lag.labels(job).set(max(0.0, seconds))
        self.wal_lags[job] = max(0.0, seconds)

    def restore_drill(self, job: str, rto_seconds: float) -> None:
        self._drill_rto.labels(job).set(rto_seconds)

    def restorable_window(self, job: str, earliest: float | None, latest: float | None) -> None:
        for edge, value in (("earliest", earliest), ("latest", latest)):
            if value is not None:
                self._window.labels(job, edge).set(value)

    def notify_failed(self, notifier: str) -> None:
        self._notify_failures.labels(notifier).inc()

    def _record_success(self, job: str, ts: float, size_bytes: int | None) -> None:
        if ts < self._last_success_ts.get(job, float("-inf")):
            return
        self._last_success_ts[job] = ts
        self._last_success.labels(job).set(ts)
        if size_bytes is not None:
            self._last_size.labels(job).set(size_bytes)
