"""Applying retention to one storage: the plan from `retention.plan`, then deletion.

Deletion removes a backup's manifest first, then its data objects, so a crash
mid-prune never leaves a manifest pointing at missing data; data left behind
without a manifest is the sweeper's to remove. Keys that fail to delete are
counted and retried by the next prune.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import structlog

from backupd import retention
from backupd.config import Config, Job
from backupd.manifest import Manifest, list_backups, now_utc
from backupd.storage.base import Store

log = structlog.get_logger("backupd.retention")


class PruneMetrics(Protocol):
    def retention_deleted(self, job: str, storage: str, n: int) -> None: ...
    def retention_delete_failed(self, job: str, storage: str, n: int = 1) -> None: ...
    def backups_in_storage(
        self,
        job: str,
        storage: str,
        count: int,
        last_success_ts: float | None,
        last_size: int | None,
    ) -> None: ...


@dataclass
class PruneOutcome:
    job: str
    storage: str
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)  # stem -> reasons
    deleted: list[str] = field(default_factory=list)  # stems
    failed: list[str] = field(default_factory=list)  # stems not (fully) deleted
    remaining: list[Manifest] = field(default_factory=list)

    def describe(self) -> list[str]:
        head = f"job {self.job}, storage {self.storage}"
        lines = [
            f"{head}: {'plan (dry run)' if self.dry_run else 'pruned'}: keep "
            f"{len(self.kept)}, delete {len(self.deleted) + len(self.failed)}"
        ]
        lines += [
            f"  keep    {stem}  ({', '.join(reasons)})" for stem, reasons in self.kept.items()
        ]
        verb = "would delete" if self.dry_run else "deleted"
        lines += [f"  {verb:<7} {stem}" for stem in self.deleted]
        lines += [f"  FAILED  {stem} (retried at the next prune)" for stem in self.failed]
        return lines


async def prune_job(
    job: Job,
    store: Store,
    *,
    dry_run: bool = False,
    metrics: PruneMetrics | None = None,
    now: datetime | None = None,
) -> PruneOutcome:
    backups = await list_backups(store, job.name)
    by_stem = {m.stem: m for m in backups}
    refs = [retention.BackupRef(id=m.stem, started_at=m.started) for m in backups]
    plan = retention.plan(refs, job.retention, job.timezone, now or now_utc())
    outcome = PruneOutcome(job.name, store.name, dry_run, kept=dict(plan.keep))
    for stem in plan.delete:
        manifest = by_stem[stem]
        if dry_run:
            outcome.deleted.append(stem)
            continue
        if await _delete_backup(store, manifest):
            outcome.deleted.append(stem)
        else:
            outcome.failed.append(stem)
    outcome.remaining = [m for m in backups if m.stem not in outcome.deleted or dry_run]
    if not dry_run:
        if outcome.deleted or outcome.failed:
            log.info(
                "retention_applied",
                job=job.name,
                storage=store.name,
                deleted=len(outcome.deleted),
                failed=len(outcome.failed),
                kept=len(plan.keep),
            )
        if metrics is not None:
            if outcome.deleted:
                metrics.retention_deleted(job.name, store.name, len(outcome.deleted))
            if outcome.failed:
                metrics.retention_delete_failed(job.name, store.name, len(outcome.failed))
            report_listing(metrics, job.name, store.name, outcome.remaining)
    return outcome


async def _delete_backup(store: Store, manifest: Manifest) -> bool:
    """Manifest first (the backup stops existing), then its data; True if all is gone."""
    failed = await store.delete([manifest.manifest_key])
    if failed:
        log.warning("retention_delete_failed", backup=manifest.stem, keys=failed)
        return False
    data = [manifest.object_key(o) for o in manifest.objects]
    failed = await store.delete(data)
    if failed:
        # The backup is gone (no manifest); leftover data is swept after its grace period.
        log.warning("retention_data_left", backup=manifest.stem, keys=failed)
    return True


def report_listing(metrics: PruneMetrics, job: str, storage: str, backups: list[Manifest]) -> None:
    newest = max(backups, key=lambda m: m.started_at, default=None)
    metrics.backups_in_storage(
        job,
        storage,
        len(backups),
        _ts(newest.finished_at) if newest and newest.finished_at else None,
        newest.size_bytes if newest else None,
    )


def _ts(text: str) -> float:
    from backupd.manifest import parse_rfc3339

    return parse_rfc3339(text).timestamp()


async def prune_after_success(
    config: Config,
    job: Job,
    manifest: Manifest,
    stores: Mapping[str, Store],
    metrics: PruneMetrics | None = None,
) -> None:
    """After a successful run: apply the job's retention on each of its storages."""
    for store in stores.values():
        try:
            await prune_job(job, store, metrics=metrics)
        except Exception as exc:  # a prune failure never turns a good backup into a failure
            log.warning("retention_failed", job=job.name, storage=store.name, error=str(exc))
