"""The daemon's background work on storage: the start-up scan, catch-up, the sweeper,
and scheduled verification.

Storage is the source of truth: the last success and size a restarted daemon
reports, and whether a missed schedule needs a catch-up run, come from the
manifests, never from local state. Only valid manifests dated up to now count:
a backup stamped in the future by a wrong clock is never the newest, so it can
neither hide a missed run from catch-up nor hold the last-success gauge ahead.

The sweeper runs at start and then every SWEEP_INTERVAL seconds over every
storage. Scheduled verification (`verify.schedule`) checks the newest backup
in each of the job's storages, with a restore drill from the first when
`verify.restore` is set, under the runner's global concurrency limit; its
result goes to `backupd_last_verify_timestamp_seconds{job,result}`, and a
failure to the job's notifiers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from backupd.catalog.listing import find_backup, scan_backups
from backupd.catalog.manifest import Manifest, now_utc
from backupd.config.model import Config, Job
from backupd.daemon.ha import Coordinator
from backupd.daemon.runner import JobBusy, Runner, StorePool
from backupd.daemon.scheduler import Schedule
from backupd.errors import BackupdError
from backupd.observe.overview import Inventory
from backupd.operations.backup import Trigger
from backupd.operations.prune import (
    DATA_KEY,
    MANIFEST_KEY,
    PruneMetrics,
    delete_orphans,
    orphaned_data,
    report_listing,
)
from backupd.operations.verify import verify_backup
from backupd.storage.base import Store

log = structlog.get_logger("backupd.maintenance")

SWEEP_INTERVAL = 3600.0


class MaintenanceMetrics(PruneMetrics, Protocol):
    def verified(self, job: str, result: str, ts: float) -> None: ...
    def restore_drill(self, job: str, rto_seconds: float) -> None: ...  # issue 16


# Starts a catch-up run of (job, trigger, the missed slot); HA claims the slot first.
StartRun = Callable[[str, Trigger, datetime | None], None]

# Told when a scheduled verification fails: (job, one line saying why).
VerifyFailed = Callable[[Job, str], None]


@dataclass
class SweepResult:
    aborted_uploads: int = 0
    deleted_orphans: int = 0
    failed: int = 0
    # What was removed (or, in a dry run, would be): ("upload" | "orphan", key).
    removed: list[tuple[str, str]] = field(default_factory=list)


def is_backupd_key(key: str) -> bool:
    """Whether backupd wrote `key` (a data object or a manifest): nothing else is swept."""
    return bool(DATA_KEY.match(key) or MANIFEST_KEY.match(key))


async def sweep(
    store: Store,
    grace: float,
    protect: Collection[str] = (),
    now: datetime | None = None,
    dry_run: bool = False,
) -> SweepResult:
    """Remove leftovers last written more than `grace` seconds before `now`: incomplete
    uploads, and data objects without a manifest (a crash mid-run or mid-prune).

    Only keys of backupd's layout are touched, and none under a `protect`
    prefix (the folders of jobs with a run in progress). `dry_run`: only list
    what would be removed (`backupd sweep --dry-run`).
    """
    cutoff = (now or now_utc()) - timedelta(seconds=grace)
    result = SweepResult()
    for upload in await store.list_incomplete_uploads():
        if (
            upload.started >= cutoff
            or not is_backupd_key(upload.key)
            or any(upload.key.startswith(p) for p in protect)
        ):
            continue
        try:
            if not dry_run:
                await store.abort_incomplete(upload)
            result.aborted_uploads += 1
            result.removed.append(("upload", upload.key))
        except BackupdError as exc:
            result.failed += 1
            log.warning("sweep_abort_failed", storage=store.name, key=upload.key, error=str(exc))
    if dry_run:
        orphans = orphaned_data(await store.list(""), cutoff, protect)
        result.deleted_orphans = len(orphans)
        result.removed += [("orphan", key) for key in orphans]
        return result
    deleted, failed = await delete_orphans(store, "", cutoff, protect, removed=result.removed)
    result.deleted_orphans = deleted
    result.failed += len(failed)
    if result.aborted_uploads or result.deleted_orphans or result.failed:
        log.info(
            "sweep_done",
            storage=store.name,
            aborted_uploads=result.aborted_uploads,
            deleted_orphans=result.deleted_orphans,
            failed=result.failed,
        )
    return result


class Maintenance:
    def __init__(
        self,
        runner: Runner,
        pool: StorePool,
        metrics: MaintenanceMetrics,
        on_verify_failed: VerifyFailed | None = None,
        inventory: Inventory | None = None,
        start_run: StartRun | None = None,
        ha: Coordinator | None = None,
    ) -> None:
        self.start_run = start_run
        self.ha = ha
        self.runner = runner
        self.inventory = inventory
        self.pool = pool
        self.metrics = metrics
        self.on_verify_failed = on_verify_failed
        self._verifying: dict[str, asyncio.Task[None]] = {}

    async def startup(self, config: Config) -> None:
        """Report what storage holds, then start catch-up runs where a fire was missed."""
        now = now_utc()
        for job in list(config.jobs.values()):
            newest: Manifest | None = None
            for name in job.storage:
                try:
                    store = await self.pool.get(config.storages[name])
                    listing = await scan_backups(store, job.name, now)
                except BackupdError as exc:
                    log.warning("startup_scan_failed", job=job.name, storage=name, error=str(exc))
                    continue
                report_listing(self.metrics, job.name, name, listing)
                if self.inventory is not None:
                    self.inventory.record_listing(job.name, name, listing)
                found = listing.newest
                if found is not None and (newest is None or found.started > newest.started):
                    newest = found
            if job.catch_up and job.schedule:
                self._catch_up(job, newest, now)

    def _catch_up(self, job: Job, newest: Manifest | None, now: datetime) -> None:
        expected = Schedule(job.schedule, job.timezone).prev_fire(now)
        if expected is None or (newest is not None and newest.started >= expected):
            return
        log.info(
            "catch_up",
            job=job.name,
            missed=expected.isoformat(),
            newest=newest.started_at if newest else None,
        )
        if self.start_run is not None:
            self.start_run(job.name, Trigger("catch-up"), expected)
            return
        with contextlib.suppress(JobBusy):
            self.runner.submit(job.name, Trigger("catch-up"), scheduled_for=expected)

    def protected_prefixes(self) -> set[str]:
        """Jobs with a run in progress: their folders are not swept."""
        return {f"{run.job}/" for run in self.runner.active()}

    async def sweep_all(self, config: Config, now: datetime | None = None) -> None:
        """Sweep every storage once; a storage that fails is logged and skipped.

        HA: one node at a time, under the sweeper's claim, and the folders of jobs
        with a live claim on any node are protected too."""
        if self.ha is None:
            await self._sweep_storages(config, self.protected_prefixes(), now)
            return
        async with self.ha.duty(config, None, "_sweeper") as claim:
            if claim is None:
                log.info("sweep_skipped", reason="claimed by another node")
                return
            live = await self.ha.live_claims(config)
            protect = self.protected_prefixes() | {f"{c.job}/" for c in live}
            await self._sweep_storages(config, protect, now)
            try:
                await self.ha.forget_old_claims(config)
            except BackupdError as exc:
                log.warning("old_claims_not_deleted", error=str(exc))

    async def _sweep_storages(
        self, config: Config, protect: set[str], now: datetime | None
    ) -> None:
        for cfg in config.storages.values():
            try:
                store = await self.pool.get(cfg)
                await sweep(store, cfg.abandoned_upload_grace, protect, now)
            except BackupdError as exc:
                log.warning("sweep_failed", storage=cfg.name, error=str(exc))

    async def sweep_forever(self, config: Callable[[], Config]) -> None:
        while True:
            try:
                await self.sweep_all(config())
            except Exception:  # the sweeper must outlive any one bad pass
                log.error("sweep_crashed", exc_info=True)
            await asyncio.sleep(SWEEP_INTERVAL)

    def start_verify(self, config: Config, job_name: str) -> asyncio.Task[None] | None:
        """Start a scheduled verification; None if one of this job is still going."""
        if job_name in self._verifying or job_name not in config.jobs:
            return None
        task = asyncio.create_task(
            self._verify(config, config.jobs[job_name]), name=f"verify-{job_name}"
        )
        self._verifying[job_name] = task
        task.add_done_callback(lambda _: self._verifying.pop(job_name, None))
        return task

    async def _verify(self, config: Config, job: Job) -> None:
        structlog.contextvars.bind_contextvars(job=job.name)
        try:
            async with self.runner.global_slot():
                problems = await self._verify_storages(config, job)
        finally:
            structlog.contextvars.unbind_contextvars("job")
        result = "failure" if problems else "success"
        self.metrics.verified(job.name, result, now_utc().timestamp())
        if problems and self.on_verify_failed is not None:
            self.on_verify_failed(job, "verification failed: " + "; ".join(problems))

    async def _verify_storages(self, config: Config, job: Job) -> list[str]:
        """Verify the newest backup in each of the job's storages; returns what failed."""
        restore = job.verify is not None and job.verify.restore
        problems = []
        for index, name in enumerate(job.storage):
            try:
                store = await self.pool.get(config.storages[name])
                manifest = await find_backup(store, job.name, "latest")
                report = await verify_backup(
                    config, job, store, manifest, identity=None, restore=restore and index == 0
                )
            except BackupdError as exc:
                problems.append(f"storage {name}: {exc}")
                log.error("verify_failed", storage=name, error=str(exc))
                continue
            except Exception as exc:
                problems.append(f"storage {name}: {exc!r}")
                log.error("verify_crashed", storage=name, exc_info=True)
                continue
            problems += [f"storage {name}: {line}" for line in report.failures]
            if report.rto_seconds is not None:  # a physical drill (issue 16)
                self.metrics.restore_drill(job.name, report.rto_seconds)
            log_fn = log.info if report.ok else log.error
            log_fn(
                "verify_finished",
                storage=name,
                backup=manifest.stem,
                result="success" if report.ok else "failure",
                failures=report.failures,
            )
        return problems

    async def shutdown(self) -> None:
        tasks = list(self._verifying.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
