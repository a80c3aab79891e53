"""What each `backupd` subcommand does; `cli.py` parses and maps errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
import tomllib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from backupd import control
from backupd.backup import Trigger
from backupd.config import Config, Job, S3Storage, Secret
from backupd.configfile import config_path, config_to_toml, load_config
from backupd.errors import (
    EXIT_FAILED,
    EXIT_OK,
    BackupdError,
    ConfigError,
    NotFound,
    SecretError,
    SecretMissing,
    UsageError,
)
from backupd.manifest import Manifest, find_backup, list_backups, now_utc, scan_backups
from backupd.runner import Runner, StorePool
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


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _printable(text: str) -> str:
    """`text` with control characters shown as `?`: names from storage reach a terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# -- daemon ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    from backupd.daemon import Daemon

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
    refs: list[tuple[str, Secret | str | None]] = []
    for name, source in config.sources.items():
        refs.append((f"source.{name}.password", source.password))
    for name, storage in config.storages.items():
        if isinstance(storage, S3Storage):
            refs.append((f"storage.{name}.access_key_id", storage.access_key_id))
            refs.append((f"storage.{name}.secret_access_key", storage.secret_access_key))
    for name, notifier in config.notifiers.items():
        refs.append((f"notify.{name}.url", notifier.url))
    errors, unchecked = [], []
    for path, ref in refs:
        if isinstance(ref, Secret):
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
            except BackupdError as exc:
                failures += 1
                print(f"storage {name}: FAILED: {exc}")
    return EXIT_FAILED if failures else EXIT_OK


# -- one run in this process -------------------------------------------------------------


async def backup(args: argparse.Namespace) -> int:
    from backupd.retention_apply import prune_after_success

    config = _load(args)
    _job(config, args.job)
    async with _pool() as pool:
        runner = Runner(config, pool, after_success=prune_after_success)
        run = runner.submit(args.job, _manual_trigger())
        await runner.wait(run)
        if run.state == "success":
            print(
                f"{run.backup}: {_human_size(run.size_bytes or 0)} in "
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
    """Raise NotFound for `database` missing from `manifest`, naming a backup that has it
    (a partial backup lacks the databases that failed in its run)."""
    try:
        manifest.object_for(database)
    except NotFound as exc:
        holder = next((m for m in await list_backups(store, job.name) if m.holds(database)), None)
        hint = (
            f"; the newest backup holding it is {holder.stem} (--backup {holder.id})"
            if holder is not None
            else f"; no backup of job {job.name!r} in storage {store.name!r} holds it"
        )
        raise NotFound(f"{exc}{hint}") from None


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
        _print_json(
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
            notes.append("partial, failed: " + _printable(",".join(f.database for f in m.failed)))
        rows.append(
            (
                m.job,
                m.id,
                m.started_at[:19].replace("T", " "),
                _human_size(m.size_bytes),
                _printable(",".join(o.label for o in m.objects)),
                storage,
                "; ".join(notes),
            )
        )
    _print_table(rows)
    for line in windows:
        print(line)
    return EXIT_OK


async def restore(args: argparse.Namespace) -> int:
    from backupd import restore as restoring
    from backupd.commands_physical import restore_data_dir, wants_data_dir

    if wants_data_dir(args, _load(args)):  # a physical job: issue 16
        return await restore_data_dir(args)
    if not args.to:
        raise UsageError("restore needs --to DSN (the target database)")

    def announce(line: str) -> None:
        print(f"backupd: {line}", file=sys.stderr)

    async with _pool() as pool:
        config, job, store, manifest = await _open_backup(args, pool)
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
    for line in outcome.warnings:
        print(f"backupd: {line}", file=sys.stderr)
    for line in outcome.lines:
        print(line)
    print(
        f"restored {manifest.stem} ({_human_size(outcome.read.raw_bytes)} of dump, "
        "SHA-256 verified)"
    )
    return EXIT_OK


async def download(args: argparse.Namespace) -> int:
    from backupd import restore as restoring

    async with _pool() as pool:
        _, _, store, manifest = await _open_backup(args, pool)
        result = await restoring.download(
            store,
            manifest,
            database=args.database,
            output=args.output,
            identity=args.identity,
            globals_=args.globals_,
        )
    if args.output != "-":
        print(
            f"wrote {args.output}: {_human_size(result.raw_bytes)} from {manifest.stem} "
            "(SHA-256 verified)"
        )
    return EXIT_OK


async def verify(args: argparse.Namespace) -> int:
    from backupd.verify import verify_backup

    async with _pool() as pool:
        config, job, store, manifest = await _open_backup(args, pool)
        report = await verify_backup(
            config, job, store, manifest, identity=args.identity, restore=args.restore
        )
    for line in report.lines:
        print(line)
    return EXIT_OK if report.ok else EXIT_FAILED


async def prune(args: argparse.Namespace) -> int:
    from backupd.retention_apply import prune_job

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


# -- daemon clients ----------------------------------------------------------------------


def _socket(args: argparse.Namespace) -> str:
    """`--socket`, else the config's `daemon.socket`, else the default.

    Reads only that one key, so a config with errors elsewhere (one the
    daemon just refused to reload) still leads the client to the daemon.
    """
    configured = None
    if args.socket is None:
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            with open(config_path(args.config), "rb") as f:
                value = tomllib.load(f).get("daemon", {}).get("socket")
            configured = value if isinstance(value, str) else None
    return control.default_socket_path(args.socket, configured)


def _check_reply(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        error = reply.get("error") or {}
        code = error.get("code", "error")
        message = error.get("message", "the daemon refused the request")
        if code in ("unknown_job", "bad_request", "unknown_run", "forbidden", "already_running"):
            raise UsageError(message)
        raise BackupdError(message)
    return reply


async def trigger(args: argparse.Namespace) -> int:
    path = _socket(args)
    payload = {"cmd": "trigger", "job": args.job, "wait": bool(args.wait)}
    final: dict[str, Any] = {}
    async for reply in control.request(path, payload, timeout=None if args.wait else 30.0):
        if "event" in reply:
            _print_event(reply)
            continue
        final = reply
    if not final.get("ok") and "run" in final:
        run = final["run"]
        print(
            f"run {run['run_id']} of {run['job']}: {run['state']} after {run['attempts']} "
            f"attempt(s): {run.get('error')}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    _check_reply(final)
    if "run" in final:
        run = final["run"]
        print(f"run {run['run_id']} of {run['job']}: {run['state']}: {run.get('backup')}")
    else:
        print(f"run {final.get('run_id')} started")
    return EXIT_OK


def _print_event(event: dict[str, Any]) -> None:
    kind = event.get("event")
    detail = {k: v for k, v in event.items() if k not in ("event", "run_id", "job")}
    text = " ".join(f"{k}={v}" for k, v in detail.items())
    print(
        f"{event.get('job', '')} {event.get('run_id', '')}: {kind} {text}".rstrip(), file=sys.stderr
    )


async def status(args: argparse.Namespace) -> int:
    reply = _check_reply(await control.call(_socket(args), {"cmd": "status"}))
    if args.json:
        _print_json({"jobs": reply.get("jobs", [])})
        return EXIT_OK
    rows = [("JOB", "NEXT RUN (UTC)", "LAST RESULT", "LAST FINISHED", "RUNNING")]
    for job in reply.get("jobs", []):
        last = job.get("last_run") or {}
        rows.append(
            (
                job["name"],
                (job.get("next_run") or "-")[:19].replace("T", " "),
                last.get("state") or "-",
                (last.get("finished_at") or "-")[:19].replace("T", " "),
                ",".join(r["run_id"] for r in job.get("running", [])) or "-",
            )
        )
    _print_table(rows)
    return EXIT_OK


async def cancel(args: argparse.Namespace) -> int:
    _check_reply(await control.call(_socket(args), {"cmd": "cancel", "run_id": args.run_id}))
    print(f"run {args.run_id} cancelled")
    return EXIT_OK


async def reload(args: argparse.Namespace) -> int:
    reply = await control.call(_socket(args), {"cmd": "reload"})
    if not reply.get("ok"):
        error = reply.get("error") or {}
        print("backupd: reload refused, the daemon keeps its current config:", file=sys.stderr)
        for line in error.get("errors") or [error.get("message", "")]:
            print(f"  {line}", file=sys.stderr)
        return 2 if error.get("code") == "config_invalid" else EXIT_FAILED
    print("config reloaded")
    return EXIT_OK
