"""One backup attempt: preflight, dump every database to every target, publish.

Publishing is the manifest, written to each target only after every data
object of the run is complete on every target and every dump tool exited 0.
Any failure (cancellation included) aborts open uploads and deletes the data
objects this attempt already completed, so nothing is half-published and
nothing is left for the sweeper in the common case. That cleanup takes at most
`CLEANUP_DEADLINE` in all (a hung store cannot hold a cancelled run): what it
could not remove by then is logged and left to the sweeper. The publishing
steps, shared with physical base backups, are in `publish.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Required, TypedDict, Unpack

import structlog

from backupd import __version__
from backupd.catalog.manifest import (
    FailedDatabase,
    Manifest,
    ObjectEntry,
    data_name,
    globals_name,
    now_utc,
    rfc3339,
)
from backupd.config.model import Job, PostgresSource
from backupd.errors import DumpFailed, SourceError
from backupd.operations import publish
from backupd.operations.publish import Progress
from backupd.sources import postgres
from backupd.storage.base import Store
from backupd.stream.pipeline import StreamResult

log = structlog.get_logger("backupd.backup")

TriggerKind = Literal["schedule", "manual", "catch-up"]


@dataclass(frozen=True, slots=True)
class Trigger:
    kind: TriggerKind = "manual"
    uid: int | None = None
    user: str | None = None

    def who(self) -> dict[str, Any] | None:
        if self.uid is None and self.user is None:
            return None
        return {"uid": self.uid, "user": self.user}


class RunOptions(TypedDict, total=False):
    """How the runner calls one attempt of a job, logical (`run_backup`) or physical
    (`physical.run_base_backup`): only `trigger` is required."""

    trigger: Required[Trigger]
    attempt: int  # 1, 2, ... within the run (default 1)
    on_bytes: Callable[[str, int], None] | None  # (storage name, bytes) as they are written
    progress: Progress | None  # events for `backupd run --progress` and the control socket
    node: str  # HA: the node that ran it, recorded in the manifest
    scheduled_for: str  # the schedule slot it ran for, recorded in the manifest
    # HA: confirm the run's claim; runs just before the manifest is written, and if it
    # raises, nothing is published and the attempt's objects are removed
    before_publish: Callable[[], Awaitable[None]] | None


@dataclass(frozen=True, slots=True)
class _Dump:
    name: str  # database name, or "globals"
    argv: list[str]
    tool: str  # pg_dump | pg_dumpall
    fmt: str  # custom | plain


async def run_backup(
    job: Job,
    source: PostgresSource,
    stores: Mapping[str, Store],
    **run: Unpack[RunOptions],
) -> Manifest:
    """Run one attempt of `job`; returns the published manifest or raises."""
    trigger, attempt = run["trigger"], run.get("attempt", 1)
    on_bytes, progress = run.get("on_bytes"), run.get("progress")
    password = source.password.resolve() if source.password else None
    server = await postgres.preflight(source, job, password)
    pg_dump = postgres.find_tool("pg_dump", source.pg_bin_dir, server.major)
    if attempt == 1:  # once per run, not on every retry
        postgres.warn_if_outdated(pg_dump)
    dumps = [
        _Dump(db, postgres.dump_argv(pg_dump, job, source.dsn, db), "pg_dump", job.format)
        for db in server.databases
    ]
    for db in server.databases:
        if postgres.has_line_break(db) and job.kind != "data-only":
            log.warning(
                "database_properties_not_dumped",
                database=db,
                reason="pg_dump refuses --create for a database name with a line break; its "
                "contents are dumped, its comment, settings and grants are not",
            )
    if job.globals:
        dumpall = postgres.find_tool("pg_dumpall", source.pg_bin_dir, server.major)
        dumps.append(
            _Dump(
                globals_name(server.databases, job.format),
                postgres.dumpall_globals_argv(dumpall, source.dsn),
                "pg_dumpall",
                "plain",
            )
        )

    new = publish.NewBackup.start(job.name)
    folder, stem = new.folder, new.stem
    log.info("backup_started", stem=stem, databases=list(server.databases), attempt=attempt)
    publish.emit(progress, {"event": "started", "stem": stem, "attempt": attempt})

    completed: dict[str, list[str]] = {name: [] for name in stores}
    cleanup = publish.Cleanup()
    objects: list[ObjectEntry] = []
    tables: dict[str, dict[str, int]] = {}
    failed: list[FailedDatabase] = [FailedDatabase(name, why) for name, why in server.unusable]
    for name, why in server.unusable:
        log.error("database_failed", database=name, error=why)
    try:
        with postgres.passfile_env(password, source.dsn) as env:
            for dump in dumps:
                try:
                    entry, counts = await _dump_database(
                        job,
                        source,
                        dump,
                        env,
                        stores,
                        stem,
                        folder,
                        completed,
                        cleanup,
                        on_bytes,
                        password,
                    )
                except (DumpFailed, SourceError) as exc:
                    if exc.transient or dump.tool != "pg_dump":
                        raise  # the server is down, or the globals: the whole attempt fails
                    # This database cannot be dumped; the others still can.
                    log.error("database_failed", database=dump.name, error=str(exc))
                    failed.append(FailedDatabase(dump.name, str(exc)))
                    publish.emit(progress, {"event": "database_failed", "database": dump.name})
                    # its aborts are done: a later failure gets a whole budget
                    cleanup = publish.Cleanup()
                    continue
                objects.append(entry)
                if counts is not None:
                    tables[dump.name] = counts
                publish.emit(
                    progress,
                    {"event": "object", "database": dump.name, "size_bytes": entry.size_bytes},
                )
        dumped = [o for o in objects if o.database in server.databases]
        if failed and not dumped:
            raise DumpFailed(
                "no database could be backed up: " + "; ".join(f.summary() for f in failed)
            )
        if job.databases == ("*",):
            total = sum(o.raw_bytes for o in dumped)
            if total < job.min_size:
                raise DumpFailed(
                    f"the dumps of all {len(dumped)} databases total {total} bytes, below "
                    f"min_size {job.min_size}: refusing to call it a backup"
                )
        finished = now_utc()
        manifest = Manifest(
            id=new.id,
            job=job.name,
            kind=job.kind,
            format=job.format,
            compression=job.compression.spec,
            encryption=publish.encryption_field(job),
            source=publish.source_field(source, server.host, server.version),
            tool={"name": "pg_dump", "version": pg_dump.version, "path": str(pg_dump.path)}
            # the row counts in `tables` were taken in the snapshot pg_dump dumped
            | ({"snapshot": "exported"} if tables else {}),
            started_at=rfc3339(new.started),
            finished_at=rfc3339(finished),
            duration_seconds=new.duration(),
            objects=tuple(objects),
            trigger=trigger.kind,
            triggered_by=trigger.who(),
            attempts=attempt,
            backupd_version=__version__,
            tables=tables,
            failed=tuple(failed),
            node=run.get("node", ""),
            scheduled_for=run.get("scheduled_for", ""),
        )
        await publish.publish(stores, manifest, cleanup, run.get("before_publish"))
    except BaseException:
        await cleanup.run(
            "delete the objects of the failed attempt", publish.discard(stores, completed)
        )
        raise
    if failed:
        log.error(
            "backup_partial",
            stem=stem,
            databases=[o.database for o in objects],
            failed=[f.database for f in failed],
        )
        raise PartialBackup(manifest)
    log.info(
        "backup_published",
        stem=stem,
        size_bytes=manifest.size_bytes,
        duration_seconds=manifest.duration_seconds,
    )
    return manifest


class PartialBackup(DumpFailed):
    """Some databases were backed up and published, others failed: the run is a failure
    (alerts fire), the backup exists and its manifest says what it lacks."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        failures = "; ".join(f.summary() for f in manifest.failed)
        super().__init__(
            f"{len(manifest.failed)} of {len(manifest.failed) + len(manifest.objects)} "
            f"databases failed ({failures}); the others are published as backup {manifest.stem}"
        )


async def _dump_database(
    job: Job,
    source: PostgresSource,
    dump: _Dump,
    env: dict[str, str],
    stores: Mapping[str, Store],
    stem: str,
    folder: str,
    completed: dict[str, list[str]],
    cleanup: publish.Cleanup,
    on_bytes: Callable[[str, int], None] | None,
    password: str | None,
) -> tuple[ObjectEntry, dict[str, int] | None]:
    """Dump one database (or the globals) to every store; its entry and row counts."""
    encrypted = job.encryption is not None
    key = f"{stem}/{data_name(dump.name, dump.fmt, job.compression.extension, encrypted)}"
    counts: dict[str, int] | None = None
    async with _in_snapshot(job, dump, source.dsn, password) as (dump, snapshot):
        dumping = _dump_one(job, dump, env, stores, folder + key, completed, cleanup, on_bytes)
        if snapshot is None:
            result = await dumping
        else:
            result, counts = await _while_counting(dumping, snapshot)
    # min_size guards each database a job names; with databases = ["*"] it guards the
    # run's total (run_backup), since a cluster's `postgres` database is rightly tiny.
    # The globals are small by nature.
    floor = job.min_size if dump.tool == "pg_dump" and job.databases != ("*",) else 1
    if result.raw_bytes < floor:
        # The attempt goes on: this discard gets its own deadline, not the attempt's.
        await publish.Cleanup().run(
            f"delete {key} (below min_size)",
            publish.discard(stores, {name: [folder + key] for name in stores}, completed),
        )
        raise DumpFailed(
            f"{dump.tool} output for {dump.name} is {result.raw_bytes} bytes, below "
            f"min_size {floor}: refusing to call it a backup"
        )
    entry = ObjectEntry(
        database="" if dump.tool == "pg_dumpall" else dump.name,
        key=key,
        size_bytes=result.size_bytes,
        raw_bytes=result.raw_bytes,
        sha256=result.sha256,
        format=dump.fmt,
        kind="globals" if dump.tool == "pg_dumpall" else "database",
    )
    return entry, counts


def records_row_counts(job: Job) -> bool:
    """Whether a backup of `job` records exact row counts for `verify --restore`.

    Only full, unfiltered dumps: a filtered dump holds a subset of the tables
    chosen by pg_dump's own pattern rules, which backupd does not re-implement.
    """
    return job.kind == "full" and not (job.tables or job.exclude_tables or job.exclude_table_data)


@contextlib.asynccontextmanager
async def _in_snapshot(
    job: Job, dump: _Dump, dsn: str, password: str | None
) -> AsyncIterator[tuple[_Dump, postgres.Snapshot | None]]:
    """Run a database's pg_dump inside a snapshot exported by backupd, so that rows can
    be counted in that same snapshot; other dumps run as they are (no snapshot)."""
    if dump.tool != "pg_dump" or not records_row_counts(job):
        yield dump, None
        return
    async with postgres.exported_snapshot(dsn, password, dump.name) as snapshot:
        yield replace(dump, argv=[*dump.argv, f"--snapshot={snapshot.id}"]), snapshot


async def _while_counting(
    dumping: Coroutine[Any, Any, StreamResult], snapshot: postgres.Snapshot
) -> tuple[StreamResult, dict[str, int]]:
    """Run the dump and count rows in its snapshot at the same time (not one after the
    other: on a 1 GB database the counts alone take ~0.6 s)."""
    counting = asyncio.create_task(snapshot.count_rows())
    try:
        result = await dumping
    except BaseException:
        counting.cancel()
        await asyncio.wait([counting])
        if not counting.cancelled():
            counting.exception()  # retrieved and dropped: the dump's error is the one to report
        raise
    return result, await counting


async def _dump_one(
    job: Job,
    dump: _Dump,
    env: dict[str, str],
    stores: Mapping[str, Store],
    key: str,
    completed: dict[str, list[str]],
    cleanup: publish.Cleanup,
    on_bytes: Callable[[str, int], None] | None,
) -> StreamResult:
    """Dump one database into one new object on every store; completes them only on success."""
    result, _ = await publish.stream_to_stores(
        dump.argv,
        env,
        dump.tool,
        publish.job_encoders(job),
        stores,
        key,
        completed,
        cleanup,
        on_bytes,
    )
    return result
