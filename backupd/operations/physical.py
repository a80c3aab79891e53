"""Physical base backups (`kind = "physical"`): pg_basebackup, streamed like a dump.

`pg_basebackup -D - -Ft -X fetch` writes the whole cluster as one tar stream to
stdout: the data directory, the WAL needed to make it consistent (`pg_wal/`),
and PostgreSQL's own `backup_manifest` as the last member (with a tar to
stdout pg_basebackup cannot write the manifest anywhere else; see README
"Point-in-time recovery"). That stream goes through the same pipeline as a
dump (compression, age, SHA-256, every store at once) into one object
`{stem}/base.tar[.zst][.age]`; the backupd manifest is written last and
records where the backup sits in the WAL (start/stop LSN and segment,
timeline), which restore and WAL retention need.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Unpack

import structlog

from backupd import __version__
from backupd.catalog.manifest import Manifest, ObjectEntry, now_utc, rfc3339
from backupd.catalog.walindex import SEGMENT_SIZE, format_lsn, parse_lsn, segment_of
from backupd.config.dsn import dsn_host, redact_dsn
from backupd.config.model import Job, PostgresSource
from backupd.errors import DumpFailed, SourceError, SourceUnavailable
from backupd.operations import servercompress
from backupd.operations.backup import RunOptions
from backupd.operations.publish import (
    Cleanup,
    NewBackup,
    discard,
    emit,
    encryption_field,
    publish,
    source_field,
    stream_to_stores,
)
from backupd.sources import postgres
from backupd.storage.base import Store
from backupd.stream.age import AgeEncryptor
from backupd.stream.codecs import Encoder, compressor

log = structlog.get_logger("backupd.physical")

_START = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_STOP = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


@dataclass(frozen=True, slots=True)
class PhysicalServer:
    version: str
    major: int
    host: str
    wal_level: str
    free_walsenders: int
    max_slot_wal_keep_size: int  # MB; -1: unlimited


async def preflight(source: PostgresSource, password: str | None) -> PhysicalServer:
    """What a physical job needs of the server: REPLICATION, wal_level, a free walsender.

    Each missing piece is an error that says what to change on the server.
    """
    where = redact_dsn(source.dsn)
    async with postgres.settings_connection(source.dsn, password) as conn:
        row = await conn.fetchrow(
            "SELECT current_setting('server_version_num')::int AS num, "
            "current_setting('server_version') AS version, "
            "current_setting('wal_level') AS wal_level, "
            "current_setting('max_wal_senders')::int AS senders, "
            "current_setting('wal_segment_size') AS segsize, "
            "current_setting('max_slot_wal_keep_size')::int AS keep, "
            "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) "
            "AS replication, current_user AS role, "
            "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int "
            "AS walsenders"
        )
    assert row is not None
    if not row["replication"]:
        raise SourceError(
            f"role {row['role']} on {where} lacks REPLICATION, which pg_basebackup and "
            f"pg_receivewal need: ALTER ROLE {row['role']} REPLICATION"
        )
    if row["wal_level"] not in ("replica", "logical"):
        raise SourceError(
            f"wal_level is {row['wal_level']} on {where}: a physical backup needs replica "
            "(or logical); set it in postgresql.conf and restart PostgreSQL"
        )
    if row["segsize"] != "16MB":
        raise SourceError(
            f"wal_segment_size is {row['segsize']} on {where}: backupd supports 16MB only"
        )
    free = int(row["senders"]) - int(row["walsenders"])
    if free < 1:
        raise SourceUnavailable(
            f"no free walsender on {where} (max_wal_senders = {row['senders']}, all in use)"
        )
    return PhysicalServer(
        version=str(row["version"]).split()[0],
        major=int(row["num"]) // 10000,
        host=dsn_host(source.dsn) or "localhost",
        wal_level=str(row["wal_level"]),
        free_walsenders=free,
        max_slot_wal_keep_size=int(row["keep"]),
    )


def basebackup_argv(tool: postgres.DumpTool, dsn: str) -> list[str]:
    """pg_basebackup as a tar stream on stdout with the WAL it needs; never a password."""
    return [
        str(tool.path),
        "--no-password",
        f"--dbname={dsn}",
        "--pgdata=-",
        "--format=tar",
        "--wal-method=fetch",
        "--checkpoint=fast",
        "--verbose",  # the start and end LSN, parsed from stderr
    ]


def _encoders(job: Job, server: servercompress.MeasuredPassThrough | None) -> list[Encoder]:
    encoders: list[Encoder] = [server or compressor(job.compression)]
    if job.encryption is not None:
        encoders.append(AgeEncryptor(job.encryption.recipients))
    return encoders


async def run_base_backup(
    job: Job,
    source: PostgresSource,
    stores: Mapping[str, Store],
    **run: Unpack[RunOptions],
) -> Manifest:
    """One attempt of a physical job: a base backup to every store, manifest last."""
    attempt, on_bytes, progress = run.get("attempt", 1), run.get("on_bytes"), run.get("progress")
    cleanup = Cleanup()
    password = source.password.resolve() if source.password else None
    server = await preflight(source, password)
    tool = postgres.find_tool("pg_basebackup", source.pg_bin_dir, server.major)
    server_side = await servercompress.plan(job, source, password)
    argv = basebackup_argv(tool, source.dsn)
    argv += servercompress.argv_options(job) if server_side else []
    new = NewBackup.start(job.name)
    folder, stem = new.folder, new.stem
    encrypted = job.encryption is not None
    key = f"{stem}/base.tar{job.compression.extension}{'.age' if encrypted else ''}"
    log.info("base_backup_started", stem=stem, attempt=attempt)
    emit(progress, {"event": "started", "stem": stem, "attempt": attempt})
    completed: dict[str, list[str]] = {name: [] for name in stores}
    try:
        with postgres.passfile_env(password, source.dsn) as env:
            result, stderr = await stream_to_stores(
                argv,
                env,
                "pg_basebackup",
                _encoders(job, server_side),
                stores,
                folder + key,
                completed,
                cleanup,
                on_bytes,
            )
        position = wal_position(stderr)
        finished = now_utc()
        manifest = Manifest(
            id=new.id,
            job=job.name,
            kind="physical",
            format="tar",
            compression=job.compression.spec,
            encryption=encryption_field(job),
            source=source_field(source, server.host, server.version),
            tool={
                "name": "pg_basebackup",
                "version": tool.version,
                "path": str(tool.path),
                "compressed_by": "server" if server_side else "client",
            },
            started_at=rfc3339(new.started),
            finished_at=rfc3339(finished),
            duration_seconds=new.duration(),
            objects=(
                ObjectEntry(
                    database="",
                    key=key,
                    size_bytes=result.size_bytes,
                    raw_bytes=server_side.raw_bytes if server_side else result.raw_bytes,
                    sha256=result.sha256,
                    format="tar",
                    kind="base",
                ),
            ),
            trigger=run["trigger"].kind,
            triggered_by=run["trigger"].who(),
            attempts=attempt,
            backupd_version=__version__,
            node=run.get("node", ""),
            scheduled_for=run.get("scheduled_for", ""),
            wal=position,
            # consistent once pg_basebackup ended; the WAL archive extends the window
            restorable_from=rfc3339(finished),
            restorable_until=rfc3339(finished),
        )
        await publish(stores, manifest, cleanup, run.get("before_publish"))
    except BaseException:
        await cleanup.run("delete the objects of the failed attempt", discard(stores, completed))
        raise
    log.info(
        "backup_published",
        stem=stem,
        size_bytes=manifest.size_bytes,
        duration_seconds=manifest.duration_seconds,
        start_lsn=position["start_lsn"],
        stop_lsn=position["stop_lsn"],
    )
    return manifest


def wal_position(stderr: str) -> dict[str, object]:
    """Start/stop LSN and timeline from `pg_basebackup --verbose`'s stderr."""
    start, stop = _START.search(stderr), _STOP.search(stderr)
    if start is None or stop is None:
        raise DumpFailed("pg_basebackup did not report its WAL start and end points")
    timeline = int(start.group(2))
    start_lsn, stop_lsn = parse_lsn(start.group(1)), parse_lsn(stop.group(1))
    return {
        "timeline": timeline,
        "start_lsn": format_lsn(start_lsn),
        "stop_lsn": format_lsn(stop_lsn),
        "start_segment": segment_of(timeline, start_lsn),
        # the segment holding the last byte of the backup's WAL
        "stop_segment": segment_of(timeline, max(stop_lsn - 1, start_lsn)),
    }


__all__ = ["SEGMENT_SIZE", "PhysicalServer", "preflight", "run_base_backup", "wal_position"]
