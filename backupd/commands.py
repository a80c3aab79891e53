"""What each `backupd` subcommand does; `cli.py` parses and maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import re
import sys
from collections.abc import AsyncIterator

from backupd.catalog.listing import find_backup, list_backups, scan_backups
from backupd.catalog.manifest import Manifest, now_utc
from backupd.config.file import config_path, config_to_toml, format_duration, load_config
from backupd.config.model import Config, Job, secret_references
from backupd.daemon.runner import Runner, StorePool
from backupd.errors import (
    EXIT_FAILED,
    EXIT_OK,
    BackupdError,
    ConfigError,
    NoSuchDatabase,
    SecretError,
    SecretMissing,
    UsageError,
)
from backupd.observe.overview import human_size
from backupd.operations.backup import Trigger
from backupd.output import print_json, print_table, printable
from backupd.progress import REDRAW, CountingStore, ProgressLine
from backupd.storage.base import Store


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _job(config: Config, name: str) -> Job:
    job = config.jobs.get(name)
    if job is None:
        known = ", ".join(sorted(config.jobs)) or "none"
        raise UsageError(f"unknown job {name!r} (configured: {known})")
    return job


@contextlib.asynccontextmanager
async def _pool() -> AsyncIterator[StorePool]:
    pool = StorePool()
    try:
        yield pool
    finally:
        await pool.aclose()


async def _store_for(pool: StorePool, config: Config, job: Job, storage: str | None) -> Store:
    name = storage or job.storage[0]
    if name not in config.storages:
        raise UsageError(f"unknown storage {name!r}")
    return await pool.get(config.storages[name])


# -- daemon ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    from backupd.daemon.lifecycle import Daemon

    return await Daemon(config_path(args.config), log_level=args.log_level).run()


# -- config ------------------------------------------------------------------------------


def _check_secrets(config: Config) -> tuple[list[str], list[str]]:
    """Resolve every secret reference now (values discarded).

    Returns (errors, unchecked): an unsafe, absent, unreadable or empty
    secret file (or a directory) is a config error with its key path; one
    that belongs to the service's environment (an unset variable, a systemd
    credential outside its service) is only noted, since `check` run by hand
    lacks that environment.
    """
    errors, unchecked = [], []
    for path, ref in secret_references(config):
        try:
            ref.resolve()
        except SecretMissing as exc:
            unchecked.append(f"{path}: {exc}")
        except SecretError as exc:
            errors.append(f"{path}: {exc}")
    return errors, unchecked


async def check(args: argparse.Namespace) -> int:
    config = _load(args)
    errors, unchecked = _check_secrets(config)
    if errors:
        raise ConfigError(errors)
    if args.connect and unchecked:
        raise ConfigError(unchecked)  # reaching sources and storage needs them all
    for line in unchecked:
        print(f"not checked here: {line}", file=sys.stderr)
    if args.show:
        sys.stdout.write(config_to_toml(config))
    if not args.connect:
        if not args.show:
            print(
                f"{config.path}: ok ({len(config.jobs)} jobs, {len(config.sources)} sources, "
                f"{len(config.storages)} storages)"
            )
        return EXIT_OK
    from backupd.sources import postgres

    failures = 0
    for job in config.jobs.values():
        source = config.sources[job.source]
        try:
            password = source.password.resolve() if source.password else None
            if job.kind == "physical":  # issue 16: REPLICATION, wal_level, a free walsender
                from backupd.commands_physical import check_physical

                print(await check_physical(job, source, password))
                continue
            info = await postgres.preflight(source, job, password)
            tool = postgres.find_tool("pg_dump", source.pg_bin_dir, info.major)
            print(
                f"job {job.name}: source {source.name} ok (PostgreSQL {info.version}, "
                f"databases {', '.join(info.databases)}, {tool.path} {tool.version})"
            )
        except BackupdError as exc:
            failures += 1
            print(f"job {job.name}: source {source.name} FAILED: {exc}")
    async with _pool() as pool:
        for name, cfg in config.storages.items():
            try:
                store = await pool.get(cfg)
                await store.check()
                print(f"storage {name}: ok")
                for note in getattr(store, "compat_notes", ()):
                    print(f"storage {name}: note: {note}")
            except BackupdError as exc:
                failures += 1
                print(f"storage {name}: FAILED: {exc}")
    return EXIT_FAILED if failures else EXIT_OK


# -- one run in this process -------------------------------------------------------------


async def backup(args: argparse.Namespace) -> int:
    from backupd.operations.prune import prune_after_success

    config = _load(args)
    _job(config, args.job)
    line = ProgressLine(f"backup {args.job}", quiet=args.quiet)
    async with _pool() as pool:
        runner = Runner(config, pool, after_success=prune_after_success)
        run = runner.submit(args.job, _manual_trigger())
        try:
            while line.enabled and not run.done:  # redraw from the run's own counters
                line.update(run.bytes_done, None, elapsed=run.elapsed_seconds() or 0.0)
                await asyncio.wait([run.task] if run.task else [], timeout=REDRAW)
            await runner.wait(run)
        finally:
            line.clear()
        if run.state == "success":
            print(
                f"{run.backup}: {human_size(run.size_bytes or 0)} in "
                f"{run.duration_seconds:.1f}s ({run.attempts} attempt(s))"
            )
            return EXIT_OK
        print(
            f"backupd: job {args.job} failed after {run.attempts} attempt(s): {run.error}",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _manual_trigger() -> Trigger:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    return Trigger("manual", uid, user)


# -- reading storage ---------------------------------------------------------------------


async def _open_backup(
    args: argparse.Namespace, pool: StorePool
) -> tuple[Config, Job, Store, Manifest]:
    """The config, job, storage and manifest that `JOB [--storage] [--backup]` name."""
    config = _load(args)
    job = _job(config, args.job)
    store = await _store_for(pool, config, job, args.storage)
    manifest = await find_backup(store, job.name, args.backup)
    database = getattr(args, "database", None)
    if database is not None and not manifest.holds(database):
        await _missing_database(store, job, manifest, database)
    return config, job, store, manifest


async def _missing_database(store: Store, job: Job, manifest: Manifest, database: str) -> None:
    """Raise NoSuchDatabase for `database` missing from `manifest`, naming a backup that has it
    (a partial backup lacks the databases that failed in its run)."""
    try:
        manifest.object_for(database)
    except NoSuchDatabase as exc:
        holder = next((m for m in await list_backups(store, job.name) if m.holds(database)), None)
        hint = (
            f"; the newest backup holding it is {holder.stem} (--backup {holder.id})"
            if holder is not None
            else f"; no backup of job {job.name!r} in storage {store.name!r} holds it"
        )
        raise NoSuchDatabase(f"{exc}{hint}", exc.globals_kept) from None


async def list_(args: argparse.Namespace) -> int:
    """Valid backups, newest first; skipped manifests are reported on stderr.

    Backups dated ahead of the clock are marked (`"future": true` in JSON,
    `future` in the NOTE column), as are partial ones (the databases they lack).
    """
    config = _load(args)
    jobs = [_job(config, args.job)] if args.job else list(config.jobs.values())
    found: list[tuple[str, Manifest]] = []
    skipped: list[tuple[str, str, str]] = []  # (storage, key, reason)
    windows: list[str] = []  # physical jobs: "JOB: restorable: EARLIEST .. LATEST"
    now = now_utc()
    async with _pool() as pool:
        for job in jobs:
            store = await _store_for(pool, config, job, args.storage)
            listing = await scan_backups(store, job.name, now)
            backups = listing.backups
            if job.kind == "physical":  # issue 16: the window the WAL archive gives
                from backupd.commands_physical import physical_listing

                backups, line = await physical_listing(store, job, listing)
                windows.append(line)
            found += [(store.name, m) for m in backups]
            skipped += [(store.name, s.key, s.reason) for s in listing.invalid]
    found.sort(key=lambda item: (item[1].started_at, item[1].id), reverse=True)
    for storage, key, reason in skipped:
        print(
            f"backupd: storage {storage}: skipped invalid manifest {key}: {reason}", file=sys.stderr
        )
    if args.json:
        print_json(
            [m.to_dict() | {"storage": storage, "future": m.in_future(now)} for storage, m in found]
        )
        return EXIT_OK
    if not found:
        print("no backups")
        return EXIT_OK
    rows = [("JOB", "BACKUP", "STARTED (UTC)", "SIZE", "DATABASES", "STORAGE", "NOTE")]
    for storage, m in found:
        notes = ["future"] if m.in_future(now) else []
        if m.failed:
            notes.append("partial, failed: " + printable(",".join(f.database for f in m.failed)))
        rows.append(
            (
                m.job,
                m.id,
                m.started_at[:19].replace("T", " "),
                human_size(m.size_bytes),
                printable(",".join(o.label for o in m.objects)),
                storage,
                "; ".join(notes),
            )
        )
    print_table(rows)
    for line in windows:
        print(line)
    return EXIT_OK


@contextlib.asynccontextmanager
async def _clearing(line: ProgressLine) -> AsyncIterator[None]:
    """Remove the progress line once the work ends, before the command prints its result."""
    try:
        yield
    finally:
        line.clear()


def _counted(
    store: Store, line: ProgressLine, manifest: Manifest, args: argparse.Namespace
) -> Store:
    """`store`, reporting the bytes read to `line` (the stored size of the one object that
    `--database`/`--globals` picks is the total)."""
    if not line.enabled:
        return store
    try:
        entry = (
            manifest.globals_object()
            if getattr(args, "globals_", False) and not getattr(args, "to", None)
            else manifest.object_for(args.database)
        )
        total: int | None = entry.size_bytes
    except BackupdError:
        total = None
    return CountingStore(store, line, total)


_MISSING_DATABASE = re.compile(r'database "[^"\n]*" does not exist')


@contextlib.asynccontextmanager
async def _suggest_create(create: bool) -> AsyncIterator[None]:
    """A restore whose target database is missing fails with a hint to use --create."""
    try:
        yield
    except BackupdError as exc:
        if create or not _MISSING_DATABASE.search(str(exc)):
            raise
        hint = BackupdError(
            f"{exc}\nthe target database does not exist: add --create to create it "
            "and restore into it"
        )
        hint.exit_code = exc.exit_code
        raise hint from None


async def restore(args: argparse.Namespace) -> int:
    from backupd.commands_physical import restore_data_dir, wants_data_dir
    from backupd.operations import restore as restoring

    if wants_data_dir(args, _load(args)):  # a physical job: issue 16
        return await restore_data_dir(args)
    if not args.to:
        raise UsageError("restore needs --to DSN (the target database)")

    def announce(line: str) -> None:
        print(f"backupd: {line}", file=sys.stderr)

    line = ProgressLine(f"restore {args.job}", quiet=args.quiet)
    async with _pool() as pool, _suggest_create(args.create), _clearing(line):
        config, job, store, manifest = await _open_backup(args, pool)
        store = _counted(store, line, manifest, args)
        outcome = await restoring.restore(
            store,
            manifest,
            database=args.database,
            globals_=args.globals_,
            target_dsn=args.to,
            tables=tuple(args.table),
            schemas=tuple(args.schema),
            clean=args.clean,
            create=args.create,
            identity=args.identity,
            pg_bin_dir=config.sources[job.source].pg_bin_dir,
            announce=announce,
        )
    for warning in outcome.warnings:
        print(f"backupd: {warning}", file=sys.stderr)
    for text in outcome.lines:
        print(text)
    print(
        f"restored {manifest.stem} ({human_size(outcome.read.raw_bytes)} of dump, SHA-256 verified)"
    )
    return EXIT_OK


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise UsageError(f"{path} exists; use --force to replace it")


async def download(args: argparse.Namespace) -> int:
    from backupd.operations import download as downloading

    if args.output != "-" and not args.force:
        _refuse_existing(args.output)
    line = ProgressLine(f"download {args.job}", quiet=args.quiet)
    async with _pool() as pool, _clearing(line):
        _, _, store, manifest = await _open_backup(args, pool)
        store = _counted(store, line, manifest, args)
        result = await downloading.download(
            store,
            manifest,
            database=args.database,
            output=args.output,
            identity=args.identity,
            globals_=args.globals_,
        )
    if args.output != "-":
        print(
            f"wrote {args.output}: {human_size(result.raw_bytes)} from {manifest.stem} "
            "(SHA-256 verified)"
        )
    return EXIT_OK


async def verify(args: argparse.Namespace) -> int:
    from backupd.operations.verify import verify_backup

    line = ProgressLine(f"verify {args.job}", quiet=args.quiet)
    async with _pool() as pool, _clearing(line):
        config, job, store, manifest = await _open_backup(args, pool)
        total = None if args.restore else sum(o.size_bytes for o in manifest.objects)
        store = CountingStore(store, line, total) if line.enabled else store
        report = await verify_backup(
            config, job, store, manifest, identity=args.identity, restore=args.restore
        )
    for text in report.lines:
        print(text)
    return EXIT_OK if report.ok else EXIT_FAILED


async def prune(args: argparse.Namespace) -> int:
    from backupd.operations.prune import prune_job

    config = _load(args)
    jobs = [_job(config, args.job)] if args.job else list(config.jobs.values())
    failed = 0
    async with _pool() as pool:
        for job in jobs:
            for name in job.storage:
                cfg = config.storages[name]
                store = await pool.get(cfg)
                outcome = await prune_job(
                    job, store, dry_run=args.dry_run, grace=cfg.abandoned_upload_grace
                )
                for line in outcome.describe():
                    print(line)
                failed += outcome.errors
    return EXIT_FAILED if failed else EXIT_OK


async def sweep(args: argparse.Namespace) -> int:
    """The daemon's sweeper, once: for users who run `backupd backup` from cron."""
    from backupd.daemon.maintenance import sweep as sweep_store

    config = _load(args)
    if args.storage is not None and args.storage not in config.storages:
        raise UsageError(f"unknown storage {args.storage!r}")
    names = [args.storage] if args.storage else list(config.storages)
    verb = {"upload": "abort incomplete upload", "orphan": "delete orphaned object"}
    failed = 0
    async with _pool() as pool:
        for name in names:
            cfg = config.storages[name]
            try:
                store = await pool.get(cfg)
                result = await sweep_store(store, cfg.abandoned_upload_grace, dry_run=args.dry_run)
            except BackupdError as exc:
                failed += 1
                print(f"storage {name}: FAILED: {exc}")
                continue
            for kind, key in result.removed:
                shown = key if key.isprintable() else repr(key)  # keys come from the store
                print(f"storage {name}: {'would ' if args.dry_run else ''}{verb[kind]} {shown}")
            print(
                f"storage {name}: {result.aborted_uploads} incomplete upload(s), "
                f"{result.deleted_orphans} orphaned object(s) "
                + ("would be removed (dry run)" if args.dry_run else "removed")
                + (f", {result.failed} failed" if result.failed else "")
                + f"; older than {format_duration(cfg.abandoned_upload_grace)} only"
            )
            failed += result.failed
    return EXIT_FAILED if failed else EXIT_OK


async def delete(args: argparse.Namespace) -> int:
    """Delete one backup on purpose, as retention does: manifest first, then its data.

    The job's only backup in that storage is refused without `--force`.
    """
    from backupd.operations.prune import delete_backup

    async with _pool() as pool:
        config = _load(args)
        job = _job(config, args.job)
        store = await _store_for(pool, config, job, args.storage)
        listing = await scan_backups(store, job.name)
        manifest = await find_backup(store, job.name, args.backup)
        where = f"job {job.name}, storage {store.name}"
        others = [m for m in listing.backups if m.stem != manifest.stem]
        if not others and not args.force:
            raise UsageError(
                f"{manifest.stem} is the only backup of {where}; "
                "deleting it leaves nothing to restore (use --force to delete it anyway)"
            )
        what = (
            f"{manifest.stem} ({human_size(manifest.size_bytes)}: the manifest, then "
            f"{len(manifest.objects)} data object(s))"
        )
        if args.dry_run:
            print(f"{where}: would delete {what}")
            for key in manifest.data_keys:
                print(f"  {key}")
            return EXIT_OK
        gone, left = await delete_backup(store, manifest)
    if not gone:
        print(
            f"backupd: {where}: could not delete the manifest of {manifest.stem}; "
            "the backup is intact",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"{where}: deleted {what}")
    if left:
        for key in left:
            print(f"  LEFT {key}", file=sys.stderr)
        print(
            f"backupd: {len(left)} data object(s) of the deleted backup remain; the next prune "
            "of the job or the daemon's sweeper removes them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK
