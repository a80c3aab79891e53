"""The `backupd` subcommands of physical jobs (issue 16): wal-push, wal-fetch, restore --data-dir.

Kept apart from `commands.py` so the logical commands stay as they are; `cli.py`
parses, this module acts and prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from backupd.catalog import walindex
from backupd.catalog.listing import Listing
from backupd.catalog.manifest import Manifest
from backupd.commands import _job, _load, _pool, _store_for
from backupd.config.model import Config, Job, PostgresSource
from backupd.errors import EXIT_OK, UsageError
from backupd.operations import wal, walchain
from backupd.storage.base import Store


def _physical(config: Config, name: str) -> Job:
    job = _job(config, name)
    if job.kind != "physical":
        raise UsageError(f'job {name!r} is not a kind = "physical" job: it has no WAL archive')
    return job


def wants_data_dir(args: argparse.Namespace, config: Config) -> bool:
    """Whether `restore` restores a data directory (a physical job); usage errors otherwise."""
    job = _job(config, args.job)
    pitr_flags = args.data_dir or args.time or args.lsn or args.latest or args.start
    if job.kind != "physical":
        if pitr_flags:
            raise UsageError(
                f"--data-dir, --time, --lsn, --latest and --start are for physical jobs; "
                f"{job.name!r} is a {job.kind} job (use --to DSN)"
            )
        return False
    if not args.data_dir:
        raise UsageError(f"job {job.name!r} is physical: restore it with --data-dir DIR")
    if args.to:
        raise UsageError("--to is for logical jobs; a physical restore writes --data-dir")
    return True


async def check_physical(job: Job, source: PostgresSource, password: str | None) -> str:
    """`check --connect` of a physical job: one line, or the error that says what to fix."""
    from backupd.operations import physical
    from backupd.sources import postgres

    info = await physical.preflight(source, password)
    tool = postgres.find_tool("pg_basebackup", source.pg_bin_dir, info.major)
    postgres.find_tool("pg_receivewal", source.pg_bin_dir, info.major)
    line = (
        f"job {job.name}: source {source.name} ok (PostgreSQL {info.version}, physical: "
        f"REPLICATION, wal_level {info.wal_level}, {info.free_walsenders} free walsender(s), "
        f"{tool.path} {tool.version})"
    )
    if job.compression_at == "server":
        from backupd.operations import servercompress

        reason = await servercompress.unsupported_reason(job, source, password)
        line += (
            f"\n  server-side compression ({job.compression.spec}): supported"
            if reason is None
            else f"\n  warning: server-side compression ({job.compression.spec}) unavailable: "
            f"{reason}; base backups are compressed by backupd instead"
        )
    if info.max_slot_wal_keep_size < 0:
        line += (
            "\n  warning: max_slot_wal_keep_size is unlimited: while backupd is down its "
            "replication slot keeps WAL on the server until the disk fills"
        )
    return line


async def wal_push(args: argparse.Namespace) -> int:
    config = _load(args)
    job = _physical(config, args.job)
    async with _pool() as pool:
        stores = await pool.for_job(config, job)
        await wal.push(job, stores, args.path)
    return EXIT_OK


async def wal_fetch(args: argparse.Namespace) -> int:
    config = _load(args)
    job = _physical(config, args.job)
    names = [args.storage] if args.storage else list(job.storage)
    async with _pool() as pool:
        stores = [await _store_for(pool, config, job, name) for name in names]
        served = await wal.fetch(job.name, stores, args.segment, args.path, args.identity)
        if args.prefetch:
            store = next(s for s in stores if s.name == served)
            await wal.prefetch(job.name, store, args.segment, Path(args.prefetch), args.identity)
    return EXIT_OK


async def restore_data_dir(args: argparse.Namespace) -> int:
    from backupd.operations import pitr

    def announce(line: str) -> None:
        print(f"backupd: {line}", file=sys.stderr)

    config = _load(args)
    job = _physical(config, args.job)
    target = pitr.Target(
        time=pitr.parse_time(args.time) if args.time else None,
        lsn=walindex.parse_lsn(args.lsn) if args.lsn else None,
    )
    if args.start and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port")
    data_dir = Path(args.data_dir)
    if not data_dir.is_absolute():
        data_dir = Path(os.getcwd()) / data_dir
    async with _pool() as pool:
        store = await _store_for(pool, config, job, args.storage)
        outcome = await pitr.restore_to_dir(
            config,
            job,
            store,
            data_dir=data_dir,
            target=target,
            backup=args.backup,
            identity=args.identity,
            start=args.start,
            port=args.port,
            announce=announce,
        )
    line = (
        f"restored {outcome.backup.stem} into {outcome.data_dir} "
        f"({outcome.raw_bytes} bytes in {outcome.extract_seconds:.1f}s, SHA-256 verified); "
        f"recovery target: {outcome.target.describe()}"
    )
    if outcome.recovery_seconds is not None:
        line += f"; server started on port {args.port}, promoted after "
        line += f"{outcome.recovery_seconds:.1f}s of recovery"
    else:
        line += "; start it with pg_ctl -D DIR start (it fetches WAL with backupd wal-fetch)"
    print(line)
    return EXIT_OK


async def physical_listing(store: Store, job: Job, listing: Listing) -> tuple[list[Manifest], str]:
    """A physical job's backups with `restorable_until` as far as the WAL archive reaches
    now, and its `list` line `JOB: restorable: EARLIEST .. LATEST`."""
    window = await walchain.window(store, job.name, listing.current)
    backups = [with_window(m, window) for m in listing.backups]
    line = f"{job.name}: {window.describe()}"
    for backup_id, why in window.broken.items():
        line += f"\n{job.name}: backup {backup_id}: WAL chain broken: {why}"
    return backups, line


def with_window(manifest: Manifest, window: walchain.Window) -> Manifest:
    """`manifest` with `restorable_until` as far as the WAL archive reaches now."""
    from dataclasses import replace

    from backupd.catalog.manifest import rfc3339

    until = window.until.get(manifest.id)
    if manifest.wal is None or until is None:
        return manifest
    return replace(manifest, restorable_until=rfc3339(until))
