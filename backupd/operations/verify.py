"""`backupd verify`: prove a backup is intact, and optionally that it restores.

Without `--restore`, each data object is read back once (`readback.py`, the
path restore and download take too): its size and SHA-256 are checked
against the manifest and, unless it is encrypted and no identity is given,
it is decrypted, decompressed and, for custom-format dumps, read whole by
`pg_restore` (its SQL output discarded). `pg_restore --list` alone stops
after the table of contents and so passes a truncated archive. The first
problem found is reported, the most basic first: missing, size, SHA-256,
decoding, archive.

With `--restore` (a restore drill), each database is restored into a scratch
database on `verify.target`, created and dropped by backupd (also when the
drill fails or is cancelled); its tables and row counts are compared with the
counts recorded at backup time, and every table answers a smoke query.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import asyncpg
import structlog

from backupd.catalog.manifest import Manifest, ObjectEntry
from backupd.config.dsn import dsn_params, redact_dsn
from backupd.config.model import Config, Job
from backupd.errors import BackupdError, SourceError, UsageError
from backupd.operations.pgclient import Feeder, psql_argv, tool_path
from backupd.operations.plainsql import PlainFilter
from backupd.operations.readback import read_back
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.verify")


@dataclass
class VerifyReport:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    rto_seconds: float | None = None  # physical drills: restore until promoted (issue 16)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAILED: {line}")

    @property
    def failures(self) -> list[str]:
        return [line.removeprefix("FAILED: ") for line in self.lines if line.startswith("FAILED")]


async def verify_backup(
    config: Config,
    job: Job,
    store: Store,
    manifest: Manifest,
    *,
    identity: str | None,
    restore: bool,
) -> VerifyReport:
    """Check every data object of `manifest` in `store`; with `restore`, run a restore drill.

    Raises UsageError when `restore` is asked of a job without `verify.target`.
    """
    if job.kind == "physical":  # issue 16: base backup, WAL chain, drill (backupd/pitr_verify.py)
        from backupd.operations.pitr_verify import verify_physical

        return await verify_physical(config, job, store, manifest, identity, restore)
    target = job.verify.target if job.verify else None
    if restore and not target:
        raise UsageError(
            f'job {job.name}: a restore drill needs `verify = {{ target = "DSN" }}` in the job '
            "(a server where backupd may create and drop scratch databases)"
        )
    report = VerifyReport()
    count = len(manifest.objects)
    report.lines.append(
        f"backup {manifest.stem} of job {manifest.job} in storage {store.name} "
        f"({count} data object{'' if count == 1 else 's'}, started {manifest.started_at})"
    )
    pg_bin_dir = config.sources[job.source].pg_bin_dir
    for entry in manifest.objects:
        try:
            what = await _check_object(store, manifest, entry, identity, pg_bin_dir)
        except BackupdError as exc:
            report.fail(f"{entry.key}: {exc}")
            continue
        report.lines.append(f"ok: {entry.key}: {what}")
    if restore and target and report.ok:
        if manifest.encryption and identity is None:
            report.fail(f"backup {manifest.stem} is encrypted: a restore drill needs --identity")
        else:
            await _drill(config, job, target, store, manifest, identity, report)
    report.lines.append("verified: ok" if report.ok else "verified: FAILED")
    return report


# -- reading an object back --------------------------------------------------------------


async def _discard(data: bytes) -> None:
    pass


async def _check_object(
    store: Store, manifest: Manifest, entry: ObjectEntry, identity: str | None, pg_bin_dir: str
) -> str:
    """Read one object back and check it; returns what was proven."""
    if manifest.encryption and identity is None:
        await read_back(store, manifest, entry, None, None)
        return (
            f"{entry.size_bytes} bytes, SHA-256 matches; encrypted: not decrypted "
            "(pass --identity FILE to decrypt and read the archive)"
        )
    if entry.format != "custom":
        read = await read_back(store, manifest, entry, identity, _discard)
        what = "plain SQL"
    else:
        argv = [tool_path("pg_restore", pg_bin_dir, manifest), f"--file={os.devnull}"]
        async with Feeder.start(argv, None) as feeder:
            read = await read_back(store, manifest, entry, identity, feeder.write)
            await feeder.finish()
        what = "archive read whole by pg_restore"
    return f"{entry.size_bytes} bytes, SHA-256 matches; decoded to {read.raw_bytes} bytes; {what}"


# -- the restore drill -------------------------------------------------------------------


def scratch_name(manifest: Manifest, index: int, database: str) -> str:
    """The scratch database for one object: recognisable, and the same on every attempt."""
    name = f"backupd_verify_{manifest.id}_{index}_{database}".lower()
    return re.sub(r"[^a-z0-9_]", "_", name)[:63]


async def _drill(
    config: Config,
    job: Job,
    target: str,
    store: Store,
    manifest: Manifest,
    identity: str | None,
    report: VerifyReport,
) -> None:
    password = _target_password(config, job, target)
    pg_bin_dir = config.sources[job.source].pg_bin_dir
    for index, entry in enumerate(manifest.objects):
        if entry.kind == "globals":
            report.lines.append(
                "skipped: globals: roles and tablespaces are cluster-wide, "
                "not restored into a scratch database"
            )
            continue
        if manifest.kind == "data-only":
            report.lines.append(
                f"skipped: {entry.database}: a data-only dump needs its schema first, "
                "not restored into an empty scratch database"
            )
            continue
        scratch = scratch_name(manifest, index, entry.database)
        try:
            async with _scratch_database(target, password, scratch):
                await _restore(
                    store, manifest, entry, identity, target, scratch, password, pg_bin_dir
                )
                restored = await postgres.table_row_counts(target, password, scratch)
                _compare(entry.database, scratch, manifest, restored, report)
                await _smoke(target, password, entry.database, scratch, restored, report)
            report.lines.append(f"ok: {entry.database}: scratch database {scratch} dropped")
        except BackupdError as exc:
            report.fail(f"{entry.database}: restore drill in scratch database {scratch}: {exc}")
        log.info("restore_drill_done", backup=manifest.stem, database=entry.database)


def _target_password(config: Config, job: Job, target: str) -> str | None:
    """The source's password, only when `target` is the same login on the same server;
    any other target authenticates as libpq does (PGPASSFILE, ~/.pgpass, PGPASSWORD)."""
    source = config.sources[job.source]
    if source.password is None or _login(source.dsn) != _login(target):
        return None
    return source.password.resolve()


def _login(dsn: str) -> tuple[str, str, str]:
    params = dsn_params(dsn)
    host = params.get("host") or params.get("hostaddr") or ""
    return host, params.get("port") or "5432", params.get("user") or ""


@contextlib.asynccontextmanager
async def _scratch_database(target: str, password: str | None, name: str) -> AsyncIterator[None]:
    """A fresh empty database on `target`, dropped when the block ends however it ends.

    A leftover of a crashed drill (same backup, same name) is dropped first.
    """
    # `name` is made of [a-z0-9_] only (scratch_name): safe to quote as an identifier.
    drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    await _admin(target, password, drop, f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield
    finally:
        await _admin(target, password, drop)


async def _admin(target: str, password: str | None, *statements: str) -> None:
    conn = await postgres.connect(target, password)
    try:
        for statement in statements:
            await conn.execute(statement)
    except asyncpg.PostgresError as exc:
        raise SourceError(f"verify target {redact_dsn(target)}: {exc}") from None
    finally:
        await conn.close()


async def _restore(
    store: Store,
    manifest: Manifest,
    entry: ObjectEntry,
    identity: str | None,
    target: str,
    scratch: str,
    password: str | None,
    pg_bin_dir: str,
) -> None:
    """Stream the object into pg_restore (custom) or psql (plain) on the scratch database.

    Ownership and privileges are not restored: the drill target need not have
    the source's roles. A plain dump restores as written, owners included.
    """
    dsn = postgres.with_database(target, scratch)
    # A plain dump made with --create connects to its own database name: the
    # filter drops that (and the database-level entries) so all of it goes into
    # the scratch database.
    filt = None
    if entry.format == "custom":
        argv = [tool_path("pg_restore", pg_bin_dir, manifest), "--no-password", "--exit-on-error"]
        argv += ["--no-owner", "--no-privileges", f"--dbname={dsn}"]
    else:
        argv = psql_argv(tool_path("psql", pg_bin_dir, manifest), dsn)
        filt = PlainFilter(entry.database)
    with _auth_env(password, target) as env:
        async with Feeder.start(argv, env) as feeder:

            async def sink(data: bytes) -> None:
                await feeder.write(filt.feed(data) if filt is not None else data)

            await read_back(store, manifest, entry, identity, sink)
            if filt is not None:
                await feeder.write(filt.finish())
            await feeder.finish()


@contextlib.contextmanager
def _auth_env(password: str | None, target: str) -> Iterator[dict[str, str] | None]:
    """The tool's environment: a passfile with `password` for `target`'s hosts, else
    backupd's own environment."""
    if password is None:
        yield None
        return
    with postgres.passfile_env(password, target) as env:
        yield env


def _compare(
    database: str,
    scratch: str,
    manifest: Manifest,
    restored: dict[str, int],
    report: VerifyReport,
) -> None:
    total = sum(restored.values())
    done = f"{database}: restored into {scratch}: {len(restored)} tables, {total} rows"
    expected = manifest.tables.get(database)
    if expected is None:
        report.lines.append(
            f"ok: {done} (the backup recorded no row counts to compare: "
            "only full dumps without table filters record them)"
        )
        return
    problems = []
    for table in sorted(set(expected) | set(restored)):
        if table not in restored:
            problems.append(f"{table} is missing ({expected[table]} rows recorded)")
        elif table not in expected:
            problems.append(f"{table} was not in the backup's record")
        elif expected[table] != restored[table]:
            problems.append(
                f"{table}: restored {restored[table]} rows, the backup recorded {expected[table]}"
            )
    if problems:
        report.fail(f"{done}; tables or row counts differ from the backup: " + "; ".join(problems))
    else:
        report.lines.append(f"ok: {done}; row counts match those recorded at backup time")


async def _smoke(
    dsn: str,
    password: str | None,
    database: str,
    scratch: str,
    tables: dict[str, int],
    report: VerifyReport,
) -> None:
    conn = await postgres.connect(dsn, password, scratch)
    try:
        failed = 0
        for table in tables:
            try:
                # Names from table_row_counts: already quoted by format('%I.%I').
                # Each row is turned into text by the server (every column's output
                # function runs) and only a count comes back: no client-side decoding
                # of user-defined types.
                await conn.fetchval(
                    f"SELECT count(length(t::text)) FROM (SELECT * FROM {table} LIMIT 1) t"  # noqa: S608
                )
            except asyncpg.PostgresError as exc:
                failed += 1
                report.fail(f"{database}: smoke query on {table}: {exc}")
        if not failed:
            report.lines.append(f"ok: {database}: smoke query answered by all {len(tables)} tables")
    finally:
        await conn.close()
