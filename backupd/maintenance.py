"""The daemon's background work on storage: the start-up scan, catch-up, the sweeper,
and scheduled verification.

Storage is the source of truth: the last success and size a restarted daemon
reports, and whether a missed schedule needs a catch-up run, come from the
manifests, never from local state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from backupd.backup import Trigger
from backupd.config import Config, Job
from backupd.errors import BackupdError
from backupd.manifest import MANIFEST_SUFFIX, Manifest, list_backups, now_utc
from backupd.retention_apply import PruneMetrics, report_listing
from backupd.runner import JobBusy, Runner, StorePool
from backupd.scheduler import Schedule
from backupd.storage.base import Store

log = structlog.get_logger("backupd.maintenance")

SWEEP_INTERVAL = 3600.0


class MaintenanceMetrics(PruneMetrics, Protocol):
    def verified(self, job: str, result: str, ts: float) -> None: ...


@dataclass
class SweepResult:
    aborted_uploads: int = 0
    deleted_orphans: int = 0
    failed: int = 0


async def sweep(
    store: Store, grace: float, protect: set[str], now: datetime | None = None
) -> SweepResult:
    """Remove leftovers older than `grace` seconds: incomplete uploads, and data objects
    without a manifest. Keys under a `protect` prefix (runs in progress) are never touched.
    """
    now = now or now_utc()
    cutoff = now - timedelta(seconds=grace)
    result = SweepResult()

    def protected(key: str) -> bool:
        return any(key.startswith(p) for p in protect)

    for upload in await store.list_incomplete_uploads():
        if upload.started < cutoff and not protected(upload.key):
            try:
                await store.abort_incomplete(upload)
                result.aborted_uploads += 1
            except BackupdError as exc:
                result.failed += 1
                log.warning(
                    "sweep_abort_failed", storage=store.name, key=upload.key, error=str(exc)
                )
    objects = await store.list("")
    stems = {o.key[: -len(MANIFEST_SUFFIX)] for o in objects if o.key.endswith(MANIFEST_SUFFIX)}
    orphans = [
        o.key
        for o in objects
        if not o.key.endswith(MANIFEST_SUFFIX)
        and o.key.rsplit("/", 1)[0] not in stems
        and o.modified < cutoff
        and not protected(o.key)
    ]
    if orphans:
        failed = await store.delete(orphans)
        result.deleted_orphans = len(orphans) - len(failed)
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
    def __init__(self, runner: Runner, pool: StorePool, metrics: MaintenanceMetrics) -> None:
        self.runner = runner
        self.pool = pool
        self.metrics = metrics
        self._verifying: dict[str, asyncio.Task[None]] = {}

    async def startup(self, config: Config) -> None:
        """Report what storage holds, then start catch-up runs where a fire was missed."""
        now = now_utc()
        for job in list(config.jobs.values()):
            newest: Manifest | None = None
            for name in job.storage:
                try:
                    store = await self.pool.get(config.storages[name])
                    backups = await list_backups(store, job.name)
                except BackupdError as exc:
                    log.warning("startup_scan_failed", job=job.name, storage=name, error=str(exc))
                    continue
                report_listing(self.metrics, job.name, name, backups)
                if backups and (newest is None or backups[0].started_at > newest.started_at):
                    newest = backups[0]
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
        with contextlib.suppress(JobBusy):
            self.runner.submit(job.name, Trigger("catch-up"))

    def protected_prefixes(self) -> set[str]:
        """Jobs with a run in progress: their folders are not swept."""
        return {f"{run.job}/" for run in self.runner.active()}

    async def sweep_all(self, config: Config) -> None:
        for cfg in config.storages.values():
            try:
                store = await self.pool.get(cfg)
                await sweep(store, cfg.abandoned_upload_grace, self.protected_prefixes())
            except BackupdError as exc:
                log.warning("sweep_failed", storage=cfg.name, error=str(exc))

    async def sweep_forever(self, config: Callable[[], Config]) -> None:
        while True:
            await self.sweep_all(config())
            await asyncio.sleep(SWEEP_INTERVAL)

    def start_verify(self, config: Config, job_name: str) -> None:
        """A scheduled verification; one at a time per job, under the runner's global limit."""
        if job_name in self._verifying or job_name not in config.jobs:
            return
        task = asyncio.create_task(self._verify(config, config.jobs[job_name]))
        self._verifying[job_name] = task
        task.add_done_callback(lambda _: self._verifying.pop(job_name, None))

    async def _verify(self, config: Config, job: Job) -> None:
        from backupd.manifest import find_backup
        from backupd.verify import verify_backup

        restore = job.verify is not None and job.verify.restore
        async with self.runner.global_slot():
            result = "failure"
            try:
                store = await self.pool.get(config.storages[job.storage[0]])
                manifest = await find_backup(store, job.name, "latest")
                report = await verify_backup(
                    config, job, store, manifest, identity=None, restore=restore
                )
                result = "success" if report.ok else "failure"
                log.info(
                    "verify_finished",
                    job=job.name,
                    backup=manifest.stem,
                    result=result,
                    detail=report.lines[-1] if report.lines else "",
                )
            except BackupdError as exc:
                log.error("verify_failed", job=job.name, error=str(exc))
            self.metrics.verified(job.name, result, now_utc().timestamp())

    async def shutdown(self) -> None:
        tasks = list(self._verifying.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
