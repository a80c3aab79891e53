"""`backupd verify`: prove a backup is intact, and optionally that it restores.

Without `--restore`: every data object is read back, its size and SHA-256
checked against the manifest, decrypted (given an identity) and decompressed,
and custom-format dumps are fed to `pg_restore --list`. With `--restore`:
each database is restored into a scratch database on `verify.target`
(created and dropped by backupd), and its tables and row counts are compared
with those recorded at backup time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import asyncpg
import structlog

from backupd import restore as restoring
from backupd.config import Config, Job
from backupd.errors import BackupdError, UsageError
from backupd.manifest import Manifest, ObjectEntry
from backupd.sources import postgres
from backupd.storage.base import Store

log = structlog.get_logger("backupd.verify")


@dataclass
class VerifyReport:
    ok: bool = True
    lines: list[str] = field(default_factory=list)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAILED: {line}")


async def verify_backup(
    config: Config,
    job: Job,
    store: Store,
    manifest: Manifest,
    *,
    identity: str | None,
    restore: bool,
) -> VerifyReport:
    report = VerifyReport()
    report.lines.append(f"backup {manifest.stem} in storage {store.name}")
    decodable = not manifest.encryption or identity is not None
    for entry in manifest.objects:
        try:
            await _check_object(store, manifest, entry, identity if decodable else None, decodable)
        except BackupdError as exc:
            report.fail(f"{entry.key}: {exc}")
            continue
        what = "archive listed by pg_restore" if entry.format == "custom" else "decoded"
        if not decodable:
            what = "encrypted: not decoded without --identity"
        report.lines.append(f"ok: {entry.key}: {entry.size_bytes} bytes, SHA-256 matches; {what}")
    if restore and report.ok:
        if not decodable:
            report.fail("--restore needs --identity for an encrypted backup")
        else:
            await _restore_and_compare(config, job, store, manifest, identity, report)
    report.lines.append("verified: ok" if report.ok else "verified: FAILED")
    return report


async def _check_object(
    store: Store, manifest: Manifest, entry: ObjectEntry, identity: str | None, decode: bool
) -> None:
    if not decode:
        await restoring.read_object(store, manifest, entry, None, None)
    elif entry.format == "custom":
        await restoring.list_archive(store, manifest, entry, identity)
    else:

        async def discard(_: bytes) -> None:
            return None

        await restoring.read_object(store, manifest, entry, identity, discard)


def scratch_name(manifest: Manifest, database: str) -> str:
    base = re.sub(r"[^a-z0-9_]", "_", f"backupd_verify_{manifest.id}_{database}".lower())
    return base[:63]


async def _restore_and_compare(
    config: Config,
    job: Job,
    store: Store,
    manifest: Manifest,
    identity: str | None,
    report: VerifyReport,
) -> None:
    target = job.verify.target if job.verify else None
    if not target:
        raise UsageError(
            f'job {job.name}: verify --restore needs `verify = {{ target = "DSN" }}` in the job '
            "(a server where backupd may create and drop scratch databases)"
        )
    source = config.sources[job.source]
    password = source.password.resolve() if source.password else None
    for entry in manifest.objects:
        if entry.database == "globals" or entry.format != "custom":
            continue
        scratch = scratch_name(manifest, entry.database)
        admin = await postgres.connect(target, password)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{scratch}"')
        finally:
            await admin.close()
        try:
            with postgres.passfile_env(password) as env:
                await restoring.restore(
                    store,
                    manifest,
                    database=entry.database,
                    target_dsn=postgres.with_database(target, scratch),
                    identity=identity,
                    pg_bin_dir=source.pg_bin_dir,
                    env=env,
                )
            restored = await postgres.table_row_counts(target, password, scratch)
            _compare(entry.database, manifest.tables.get(entry.database), restored, report)
            await _smoke(target, password, scratch, restored, report)
        except BackupdError as exc:
            report.fail(f"restore of {entry.database} into {scratch}: {exc}")
        finally:
            admin = await postgres.connect(target, password)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            finally:
                await admin.close()


def _compare(
    database: str, expected: dict[str, int] | None, restored: dict[str, int], report: VerifyReport
) -> None:
    if expected is None:
        report.lines.append(
            f"ok: {database}: restored {len(restored)} tables "
            "(no row counts recorded at backup time to compare)"
        )
        return
    problems = []
    for table in sorted(set(expected) | set(restored)):
        if table not in restored:
            problems.append(f"{table} missing")
        elif table not in expected:
            problems.append(f"{table} unexpected")
        elif expected[table] != restored[table]:
            problems.append(f"{table}: {restored[table]} rows, expected {expected[table]}")
    if problems:
        report.fail(f"{database}: " + "; ".join(problems))
    else:
        total = sum(restored.values())
        report.lines.append(
            f"ok: {database}: restored {len(restored)} tables, {total} rows, "
            "row counts match the backup"
        )


async def _smoke(
    dsn: str, password: str | None, database: str, tables: dict[str, int], report: VerifyReport
) -> None:
    conn = await postgres.connect(dsn, password, database)
    try:
        for table in tables:
            try:
                # Names from table_row_counts: already quoted by format('%I.%I').
                await conn.fetch(f"SELECT * FROM {table} LIMIT 1")  # noqa: S608
            except asyncpg.PostgresError as exc:
                report.fail(f"{database}: smoke query on {table}: {exc}")
    finally:
        await conn.close()
