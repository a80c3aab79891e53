"""The `backupd` command line: argparse subcommands, errors mapped to exit codes.

No domain logic lives here: each command parses its arguments, calls into
the package, and prints. Exit codes (SPEC): 0 success; 1 the job, restore or
verify failed; 2 usage or config error; 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from backupd import __version__, logs
from backupd.errors import BackupdError, ConfigError

log = structlog.get_logger("backupd.cli")

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $BACKUPD_CONFIG, else /etc/backupd/backupd.toml)",
    )


def _add_socket(p: argparse.ArgumentParser) -> None:
    _add_config(p)
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket (default: the config's daemon.socket, else /run/backupd/control.sock)",
    )


def _add_backup_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backup", metavar="ID", default="latest", help="backup id, stem, or 'latest' (default)"
    )
    p.add_argument("--storage", metavar="NAME", help="storage to read (default: the job's first)")
    p.add_argument(
        "--database", metavar="NAME", help="database of the backup (needed when it holds several)"
    )


# -- physical jobs (issue 16) --------------------------------------------------------------


def _add_pitr_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("physical jobs (point-in-time recovery)")
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="write a PostgreSQL data directory here (absent or empty) from a base backup",
    )
    target = g.add_mutually_exclusive_group()
    target.add_argument("--time", metavar="T", help="recover to this moment (RFC 3339)")
    target.add_argument("--lsn", metavar="L", help="recover to this WAL position (like 0/3000028)")
    target.add_argument(
        "--latest", action="store_true", help="recover to the end of the WAL archive (default)"
    )
    g.add_argument(
        "--start",
        action="store_true",
        help="start the server and wait until it reached the target and was promoted",
    )
    g.add_argument(
        "--port", type=int, default=5432, metavar="P", help="port for --start (default 5432)"
    )


def _add_wal_commands(cmd: Callable[[str, Handler, str], argparse.ArgumentParser]) -> None:
    from backupd import commands_physical

    p = cmd(
        "wal-push",
        commands_physical.wal_push,
        "archive one WAL file of a physical job (for archive_command)",
    )
    _add_config(p)
    p.add_argument("job", help="a physical job name from the config")
    p.add_argument("path", help="the WAL file (archive_command's %%p)")

    p = cmd(
        "wal-fetch",
        commands_physical.wal_fetch,
        "fetch one WAL file of a physical job (for restore_command)",
    )
    _add_config(p)
    p.add_argument("job", help="a physical job name from the config")
    p.add_argument("segment", help="the WAL file name (restore_command's %%f)")
    p.add_argument("path", help="where to write it (restore_command's %%p)")
    p.add_argument("--storage", metavar="NAME", help="only this storage (default: each in turn)")
    p.add_argument("--identity", metavar="FILE", help="age identity file for encrypted WAL")
    p.add_argument(
        "--prefetch",
        metavar="DIR",
        help="also fetch the next segments into DIR (restore --data-dir sets this up)",
    )


def build_parser() -> argparse.ArgumentParser:
    from backupd import commands

    parser = argparse.ArgumentParser(
        prog="backupd",
        description="PostgreSQL backups on cron schedules, streamed to S3 and the filesystem.",
        epilog="Exit codes: 0 success, 1 the job/restore/verify failed, 2 usage or config error, "
        "3 the daemon cannot be reached. Docs: README.md.",
    )
    parser.add_argument("--version", action="version", version=f"backupd {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override daemon.log_level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = cmd("run", commands.run, "run the daemon in the foreground (systemd Type=notify)")
    _add_config(p)

    p = cmd("check", commands.check, "validate the config; exit 2 listing every error")
    _add_config(p)
    p.add_argument(
        "--connect",
        action="store_true",
        help="also reach every source and storage (read-only probes, one probe object)",
    )
    p.add_argument(
        "--show",
        action="store_true",
        help="print the effective config as TOML (defaults applied, secrets as references)",
    )

    p = cmd(
        "backup",
        commands.backup,
        "run one job once in this process, with its retries (no daemon needed)",
    )
    _add_config(p)
    p.add_argument("job", help="a job name from the config ([job.NAME])")

    p = cmd("trigger", commands.trigger, "ask the running daemon to run JOB now")
    _add_socket(p)
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    p.add_argument(
        "--wait", action="store_true", help="follow the run and exit 0 on success, 1 on failure"
    )

    p = cmd("status", commands.status, "jobs, next fire times, last results, runs in progress")
    _add_socket(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd("cancel", commands.cancel, "cancel a run in progress")
    _add_socket(p)
    p.add_argument("run_id", help="the run id shown by `trigger` and `status`")

    p = cmd("reload", commands.reload, "re-read the config in the daemon (same as SIGHUP)")
    _add_socket(p)

    p = cmd("list", commands.list_, "backups that exist in storage (no daemon needed)")
    _add_config(p)
    p.add_argument("job", nargs="?", help="only this job (default: every job)")
    p.add_argument("--storage", metavar="NAME", help="storage to read (default: each job's first)")
    p.add_argument("--json", action="store_true", help="a JSON array of manifests, newest first")

    p = cmd(
        "restore",
        commands.restore,
        "stream one database of a backup into pg_restore (psql for plain dumps)",
    )
    _add_config(p)
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    _add_backup_choice(p)
    p.add_argument(
        "--to",
        metavar="DSN",
        help="target database; the password comes from PGPASSWORD or ~/.pgpass, "
        "never put it in the DSN (logical jobs; physical jobs take --data-dir)",
    )
    _add_pitr_options(p)  # issue 16
    p.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="T",
        help="restore only this table, SCHEMA.TABLE or TABLE (repeatable; "
        "one that matches nothing is an error)",
    )
    p.add_argument(
        "--schema",
        action="append",
        default=[],
        metavar="S",
        help="restore only the objects of this schema (repeatable)",
    )
    p.add_argument(
        "--globals",
        dest="globals_",
        action="store_true",
        help="restore the roles and tablespaces (globals = true): missing ones are "
        "created, existing ones left as they are",
    )
    p.add_argument("--clean", action="store_true", help="drop objects before recreating them")
    p.add_argument(
        "--create",
        action="store_true",
        help="create the database named in --to (refused if it exists) and restore into it, "
        "with its comment, settings and grants",
    )
    p.add_argument("--identity", metavar="FILE", help="age identity file for encrypted backups")

    p = cmd("download", commands.download, "fetch one database's dump, decrypted and decompressed")
    _add_config(p)
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    _add_backup_choice(p)
    p.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="output file, - for stdout"
    )
    p.add_argument(
        "--globals",
        dest="globals_",
        action="store_true",
        help="the roles and tablespaces dump (globals = true) instead of a database",
    )
    p.add_argument("--identity", metavar="FILE", help="age identity file for encrypted backups")

    p = cmd(
        "verify",
        commands.verify,
        "check a backup's size and SHA-256, decode it, and list its archive",
    )
    _add_config(p)
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    p.add_argument("--backup", metavar="ID", default="latest")
    p.add_argument("--storage", metavar="NAME")
    p.add_argument("--identity", metavar="FILE", help="age identity file for encrypted backups")
    p.add_argument(
        "--restore",
        action="store_true",
        help="also restore into a scratch database and compare row counts",
    )

    _add_wal_commands(cmd)  # issue 16

    p = cmd("prune", commands.prune, "apply retention now")
    _add_config(p)
    p.add_argument("job", nargs="?", help="only this job (default: every job)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    # `run` sets up logging from its config; one-shot commands log progress (backup) or problems.
    default_level = "info" if args.command in ("run", "backup") else "warning"
    logs.setup(args.log_level or default_level, None)
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args))
    except ConfigError as exc:
        print(f"backupd: invalid config ({len(exc.errors)} error(s)):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return exc.exit_code
    except BackupdError as exc:
        print(f"backupd: {exc}", file=sys.stderr)
        log.debug("error", exc_info=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
