"""Applying retention to one storage: the plan from `retention.plan`, then deletion.

Deletion removes a backup's manifest first, then its data objects, so a crash
mid-prune never leaves a manifest pointing at missing data: the backup stops
existing the moment its manifest is gone. What a failure leaves is retried:
a manifest that could not be deleted is still a backup and is planned again
by the next prune; data objects left behind after their manifest went are
removed by the next prune of the job (and by the sweeper) once they are older
than the storage's `abandoned_upload_grace`. Both kinds are counted.

Only valid manifests take part (`listing.scan_backups`): an invalid one is
reported, counted in `backupd_manifests_invalid`, and neither it nor the data
folder next to it is ever deleted here. Backups dated in the future are kept
and counted in `backupd_backups_future`; the backup a run has just published
is never deleted by the prune that follows it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from backupd.catalog import retention
from backupd.catalog.listing import Listing, SkippedManifest, scan_backups
from backupd.catalog.manifest import MANIFEST_SUFFIX, Manifest, now_utc
from backupd.config.model import Config, Job
from backupd.operations.walchain import prune_wal
from backupd.storage.base import ObjectInfo, Store

log = structlog.get_logger("backupd.retention")

# Keys backupd writes (SPEC "Storage layout"); nothing else in a storage is ever deleted.
_FOLDER = r"(?P<job>[^/]+)/\d{4}/\d{2}/\d{2}/(?P=job)-\d{8}T\d{6}Z-[0-9a-z]+"
DATA_KEY = re.compile(rf"^{_FOLDER}/[^/]+$")
MANIFEST_KEY = re.compile(rf"^{_FOLDER}{re.escape(MANIFEST_SUFFIX)}$")


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
        invalid: int = 0,
        future: int = 0,
    ) -> None: ...


@dataclass
class PruneOutcome:
    job: str
    storage: str
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)  # stem -> reasons
    deleted: list[str] = field(default_factory=list)  # stems (to delete, in a dry run)
    failed: list[str] = field(default_factory=list)  # stems whose manifest could not be deleted
    left: dict[str, list[str]] = field(default_factory=dict)  # deleted stem -> data keys left
    swept: int = 0  # data objects of earlier prunes' deleted backups removed now
    remaining: list[Manifest] = field(default_factory=list)
    invalid: list[SkippedManifest] = field(default_factory=list)  # skipped, never deleted
    future: list[str] = field(default_factory=list)  # stems dated ahead of the clock (kept)
    wal_deleted: int = 0  # physical jobs: WAL objects no kept base backup needs (issue 16)

    @property
    def errors(self) -> int:
        """Backups not wholly deleted: counted, and retried by the next prune."""
        return len(self.failed) + len(self.left)

    def describe(self) -> list[str]:
        head = f"job {self.job}, storage {self.storage}"
        planned = len(self.deleted) + len(self.failed)
        lines = [
            f"{head}: {'plan (dry run)' if self.dry_run else 'pruned'}: "
            f"keep {len(self.kept)}, delete {planned}"
        ]
        lines += [f"  keep          {stem}  ({', '.join(why)})" for stem, why in self.kept.items()]
        verb = "would delete" if self.dry_run else "deleted"
        lines += [f"  {verb:<13} {stem}" for stem in self.deleted]
        lines += [
            f"  FAILED        {stem}  (manifest not deleted: still a backup, retried at the "
            "next prune)"
            for stem in self.failed
        ]
        for stem, keys in self.left.items():
            lines += [
                f"  LEFT          {key}  (data of deleted {stem}; retried at the next prune)"
                for key in keys
            ]
        lines += [
            f"  INVALID       {skipped.key}  ({skipped.reason}; not a backup, not deleted)"
            for skipped in self.invalid
        ]
        if self.swept:
            lines.append(f"  swept {self.swept} data object(s) left by an earlier prune")
        if self.wal_deleted:
            verb = "would delete" if self.dry_run else "deleted"
            lines.append(
                f"  {verb} {self.wal_deleted} WAL object(s) older than every kept base backup"
            )
        return lines


async def prune_job(
    job: Job,
    store: Store,
    *,
    dry_run: bool = False,
    metrics: PruneMetrics | None = None,
    now: datetime | None = None,
    grace: float | None = None,
    published: Manifest | None = None,
) -> PruneOutcome:
    """Apply `job`'s retention to `store` (or only plan it, with `dry_run`).

    `published` is the manifest of the backup the calling run has just written:
    it is kept whatever its date says, and not read back.

    With `grace` (the storage's `abandoned_upload_grace`), data objects of this
    job that have no manifest and were last written more than `grace` seconds
    before `now` are deleted too: what earlier prunes failed to remove.
    """
    now = now or now_utc()
    listing = await scan_backups(store, job.name, now, written=published)
    backups = listing.backups
    by_stem = {m.stem: m for m in backups}
    refs = [
        retention.BackupRef(
            id=m.stem, started_at=m.started, databases=m.databases, finished_at=m.finished
        )
        for m in backups
    ]
    protect = (published.stem,) if published else ()
    plan = retention.plan(refs, job.retention, job.timezone, now, protect)
    outcome = PruneOutcome(
        job.name,
        store.name,
        dry_run,
        kept=dict(plan.keep),
        invalid=list(listing.invalid),
        future=[m.stem for m in listing.future],
    )
    if dry_run:
        outcome.deleted = list(plan.delete)
        outcome.remaining = backups
        if job.kind == "physical":  # issue 16
            kept = [m for m in backups if m.stem not in set(plan.delete)]
            outcome.wal_deleted = len(await prune_wal(store, job.name, kept, dry_run=True))
        return outcome
    for stem in plan.delete:
        deleted_manifest, left = await delete_backup(store, by_stem[stem])
        if not deleted_manifest:
            outcome.failed.append(stem)
            continue
        outcome.deleted.append(stem)
        if left:
            outcome.left[stem] = left
    if grace is not None:
        just_left = {key for keys in outcome.left.values() for key in keys}
        # The listing scan_backups made, less what was just deleted: what a new listing
        # would show (objects written since are newer than the cutoff anyway).
        gone = {
            key
            for stem in outcome.deleted
            for key in (by_stem[stem].manifest_key, *by_stem[stem].data_keys)
        }
        deleted, _ = await delete_orphans(
            store,
            f"{job.name}/",
            now - timedelta(seconds=grace),
            skip=just_left,
            objects=[o for o in listing.objects if o.key not in gone],
        )
        outcome.swept = deleted
    gone = set(outcome.deleted)
    outcome.remaining = [m for m in backups if m.stem not in gone]
    if job.kind == "physical" and not outcome.failed:  # issue 16: WAL goes with its backups
        outcome.wal_deleted = len(await prune_wal(store, job.name, outcome.remaining))
    if outcome.deleted or outcome.errors or outcome.swept:
        log.info(
            "retention_applied",
            job=job.name,
            storage=store.name,
            deleted=len(outcome.deleted),
            errors=outcome.errors,
            swept=outcome.swept,
            kept=len(plan.keep),
        )
    if metrics is not None:
        if outcome.deleted:
            metrics.retention_deleted(job.name, store.name, len(outcome.deleted))
        if outcome.errors:
            metrics.retention_delete_failed(job.name, store.name, outcome.errors)
        report_listing(
            metrics,
            job.name,
            store.name,
            Listing(outcome.remaining, listing.invalid, listing.now),
        )
    return outcome


async def delete_backup(store: Store, manifest: Manifest) -> tuple[bool, list[str]]:
    """Delete one backup: its manifest first, then its data objects.

    Returns (whether the manifest went, data keys left behind). Once the
    manifest is gone the backup no longer exists; data left behind is an
    orphan that the next prune of the job, or the sweeper, removes after the
    storage's `abandoned_upload_grace`.
    """
    if await store.delete([manifest.manifest_key]):
        log.warning(
            "backup_delete_failed", job=manifest.job, storage=store.name, backup=manifest.stem
        )
        return False, []
    left = await store.delete(manifest.data_keys)
    if left:
        log.warning("backup_data_left", job=manifest.job, storage=store.name, keys=left)
    return True, left


def orphaned_data(
    objects: Sequence[ObjectInfo], cutoff: datetime, protect: Collection[str] = ()
) -> list[str]:
    """Keys of backupd data objects whose backup has no manifest, last written before `cutoff`.

    `objects` must be a complete listing of the folders it covers (manifests
    included). Keys under a `protect` prefix (jobs with a run in progress) and
    keys outside backupd's layout are never returned.
    """
    stems = {o.key[: -len(MANIFEST_SUFFIX)] for o in objects if MANIFEST_KEY.match(o.key)}
    return [
        o.key
        for o in objects
        if DATA_KEY.match(o.key)
        and o.key.rsplit("/", 1)[0] not in stems
        and o.modified < cutoff
        and not any(o.key.startswith(p) for p in protect)
    ]


async def delete_orphans(
    store: Store,
    prefix: str,
    cutoff: datetime,
    protect: Collection[str] = (),
    skip: Collection[str] = (),
    removed: list[tuple[str, str]] | None = None,
    objects: Sequence[ObjectInfo] | None = None,
) -> tuple[int, list[str]]:
    """Delete `orphaned_data` under `prefix` (except `skip`); returns (deleted, failed keys).

    `removed` gets ("orphan", key) for each key deleted. `objects`: a listing of
    `prefix` the caller already has, instead of a new one.
    """
    if objects is None:
        objects = await store.list(prefix)
    orphans = [key for key in orphaned_data(objects, cutoff, protect) if key not in skip]
    if not orphans:
        return 0, []
    failed = await store.delete(orphans)
    if removed is not None:
        removed += [("orphan", key) for key in orphans if key not in failed]
    return len(orphans) - len(failed), failed


def report_listing(metrics: PruneMetrics, job: str, storage: str, listing: Listing) -> None:
    """Report a listing: counts, and the newest backup not dated in the future as the
    last success (a backup stamped ahead by a wrong clock would hold that gauge in the
    future, and the "no recent success" alert could never fire). A partial backup is
    not a success: its run failed."""
    newest = listing.newest_complete
    finished = newest.finished if newest is not None else None
    metrics.backups_in_storage(
        job,
        storage,
        len(listing.backups),
        finished.timestamp() if finished is not None else None,
        newest.size_bytes if newest is not None else None,
        invalid=len(listing.invalid),
        future=len(listing.future),
    )


async def prune_after_success(
    config: Config,
    job: Job,
    manifest: Manifest,
    stores: Mapping[str, Store],
    metrics: PruneMetrics | None = None,
) -> list[PruneOutcome]:
    """After a successful run: apply the job's retention on each of its storages.

    Returns the outcome of each storage's prune (none for a prune that failed)."""
    outcomes = []
    for name, store in stores.items():
        cfg = config.storages.get(name)
        try:
            outcomes.append(
                await prune_job(
                    job,
                    store,
                    metrics=metrics,
                    grace=cfg.abandoned_upload_grace if cfg is not None else None,
                    published=manifest,
                )
            )
        except Exception as exc:  # a prune failure never turns a good backup into a failure
            log.warning("retention_failed", job=job.name, storage=store.name, error=str(exc))
    return outcomes
