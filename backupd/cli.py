"""The `backupd` command line: argparse subcommands, errors mapped to exit codes.

No domain logic lives here: each command parses its arguments, calls into
the package, and prints. Exit codes (SPEC): 0 success; 1 the job, restore or
verify failed; 2 usage or config error; 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

import structlog

from backupd import __version__
from backupd.errors import (
    EXIT_FAILED,
    AmbiguousDatabase,
    BackupdError,
    ConfigError,
    DatabaseExists,
    IdentityRequired,
    NoSuchDatabase,
    NothingMatches,
    PasswordInTarget,
    PlainDumpSelection,
)
from backupd.observe import logs

log = structlog.get_logger("backupd.cli")

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


CONFIG_HELP = "config file (default: $BACKUPD_CONFIG, else /etc/backupd/backupd.toml)"
SOCKET_HELP = "control socket (default: the config's daemon.socket, else /run/backupd/control.sock)"
LOG_LEVELS = ["debug", "info", "warning", "error"]


def _add_globals(p: argparse.ArgumentParser, *, top: bool) -> None:
    """-c, --socket and --log-level, accepted before or after the subcommand.

    On a subcommand they default to SUPPRESS, so leaving them out there keeps
    what was given before the subcommand.
    """
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP, **default)
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP, **default)
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="override daemon.log_level",
        **default,
    )


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line on a terminal")


def _add_backup_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backup", metavar="ID", default="latest", help="backup id, stem, or 'latest' (default)"
    )
    p.add_argument("--storage", metavar="NAME", help="storage to read (default: the job's first)")
    p.add_argument(
        "--database", metavar="NAME", help="database of the backup (needed when it holds several)"
    )


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be from 1 to 1000")
    return value


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
    p.add_argument("job", help="a physical job name from the config")
    p.add_argument("path", help="the WAL file (archive_command's %%p)")

    p = cmd(
        "wal-fetch",
        commands_physical.wal_fetch,
        "fetch one WAL file of a physical job (for restore_command)",
    )
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
    from backupd import commands, remote

    parser = argparse.ArgumentParser(
        prog="backupd",
        description="PostgreSQL backups on cron schedules, streamed to S3 and the filesystem.",
        epilog="Config: -c FILE, else $BACKUPD_CONFIG, else /etc/backupd/backupd.toml. "
        "Global options (-c, --socket, --log-level) go before or after the command. "
        "Exit codes: 0 success, 1 the job/restore/verify failed, 2 usage or config error, "
        "3 the daemon cannot be reached. Docs: README.md and docs/CONTRACT.md.",
    )
    parser.add_argument("--version", action="version", version=f"backupd {__version__}")
    _add_globals(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        _add_globals(p, top=False)
        return p

    p = cmd("run", commands.run, "run the daemon in the foreground (systemd Type=notify)")

    p = cmd("check", commands.check, "validate the config; exit 2 listing every error")
    p.add_argument(
        "--connect",
        action="store_true",
        help="also reach every source and storage (source: read-only probes; storage: the "
        "write path with probe objects under the prefix, deleted again)",
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
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    _add_quiet(p)

    p = cmd("trigger", remote.trigger, "ask the running daemon to run JOB now")
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    p.add_argument(
        "--wait", action="store_true", help="follow the run and exit 0 on success, 1 on failure"
    )
    _add_quiet(p)

    p = cmd("status", remote.status, "jobs, next fire times, last results, runs in progress")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd("history", remote.history, "recent runs of JOB since the daemon started")
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    p.add_argument(
        "--limit", type=_limit, default=20, metavar="N", help="at most N runs (1-1000, default 20)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd(
        "health",
        remote.health,
        "exit 0 if the daemon is alive: GET /healthz on daemon.http_listen, else a socket ping "
        "(for container health checks)",
    )
    p.add_argument(
        "--timeout", type=float, default=4.0, metavar="SECONDS", help="give up after (default 4)"
    )

    p = cmd("cancel", remote.cancel, "cancel a run in progress")
    p.add_argument("run_id", help="the run id shown by `trigger` and `status`")

    p = cmd("reload", remote.reload, "re-read the config in the daemon (same as SIGHUP)")

    p = cmd("list", commands.list_, "backups that exist in storage (no daemon needed)")
    p.add_argument("job", nargs="?", help="only this job (default: every job)")
    p.add_argument("--storage", metavar="NAME", help="storage to read (default: each job's first)")
    p.add_argument("--json", action="store_true", help="a JSON array of manifests, newest first")

    p = cmd(
        "restore",
        commands.restore,
        "stream one database of a backup into pg_restore (psql for plain dumps)",
    )
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
    _add_quiet(p)

    p = cmd("download", commands.download, "fetch one database's dump, decrypted and decompressed")
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    _add_backup_choice(p)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="output file (an existing one only with --force), - for stdout",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--globals",
        dest="globals_",
        action="store_true",
        help="the roles and tablespaces dump (globals = true) instead of a database",
    )
    p.add_argument("--identity", metavar="FILE", help="age identity file for encrypted backups")
    _add_quiet(p)

    p = cmd(
        "verify",
        commands.verify,
        "check a backup's size and SHA-256, decode it, and list its archive",
    )
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    p.add_argument(
        "--backup", metavar="ID", default="latest", help="backup id, stem, or 'latest' (default)"
    )
    p.add_argument("--storage", metavar="NAME", help="storage to read (default: the job's first)")
    p.add_argument("--identity", metavar="FILE", help="age identity file for encrypted backups")
    _add_quiet(p)
    p.add_argument(
        "--restore",
        action="store_true",
        help="also restore into a scratch database and compare row counts",
    )

    p = cmd(
        "sweep",
        commands.sweep,
        "abort incomplete uploads and delete orphaned data older than each storage's "
        "abandoned_upload_grace, as the daemon's hourly sweeper does (for cron users)",
    )
    p.add_argument("--storage", metavar="NAME", help="only this storage (default: every one)")
    p.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")

    p = cmd(
        "delete",
        commands.delete,
        "delete one backup from storage (manifest first, then its data; no daemon needed)",
    )
    p.add_argument("job", help="a job name from the config ([job.NAME])")
    p.add_argument(
        "--backup", required=True, metavar="ID", help="backup id or stem, as `list` shows it"
    )
    p.add_argument(
        "--storage", metavar="NAME", help="storage to delete from (default: the job's first)"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would go, delete nothing")
    p.add_argument(
        "--force", action="store_true", help="also delete the job's only backup in that storage"
    )

    _add_wal_commands(cmd)  # issue 16

    p = cmd("prune", commands.prune, "apply retention now")
    p.add_argument("job", nargs="?", help="only this job (default: every job)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    return parser


def worded(exc: BackupdError) -> str:
    """An error as the command line says it: the core names no flags, this names them."""
    if isinstance(exc, IdentityRequired):
        return (
            f"backup {exc.stem} is encrypted with age: pass --identity FILE "
            "(the secret key of one of its recipients)"
        )
    if isinstance(exc, AmbiguousDatabase):
        return f"backup {exc.stem} holds several databases ({exc.names}): pass --database"
    if isinstance(exc, NoSuchDatabase) and exc.globals_kept:
        return f"{exc} (the roles and tablespaces dump is --globals)"
    if isinstance(exc, PlainDumpSelection):
        return "--table, --schema and --clean need a custom-format dump; this one is plain SQL"
    if isinstance(exc, DatabaseExists):
        return (
            f"database {exc.name!r} already exists on the target: --create restores only into "
            "a new database (drop it first, or restore into it without --create)"
        )
    if isinstance(exc, PasswordInTarget):
        return str(exc).replace("the target DSN", "the --to DSN", 1)
    if isinstance(exc, NothingMatches):
        hints = [
            f"--{kind} {pattern}" + (f" (close: {', '.join(close)})" if close else "")
            for kind, pattern, close in exc.misses
        ]
        return (
            "nothing in the backup matches " + "; ".join(hints) + " — a pattern that matches "
            "nothing would restore nothing"
        )
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    # `run` sets up logging from its config; one-shot commands log progress (backup) or
    # problems, in the config's daemon.log_format if it names one (else by the terminal).
    default_level = "info" if args.command in ("run", "backup") else "warning"
    fmt = None
    if args.command != "run":
        from backupd.progress import TerminalStream
        from backupd.remote import peek_daemon_setting

        configured = peek_daemon_setting(args.config, "log_format")
        fmt = configured if configured in ("json", "console") else None
        sys.stderr = TerminalStream(sys.stderr)  # clears the progress line before each write
    logs.setup(args.log_level or default_level, fmt)
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args))
    except ConfigError as exc:
        print(f"backupd: invalid config ({len(exc.errors)} error(s)):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return exc.exit_code
    except BackupdError as exc:
        print(f"backupd: {worded(exc)}", file=sys.stderr)
        log.debug("error", exc_info=True)
        return exc.exit_code
    except BrokenPipeError:
        # Whoever read our stdout (`download -o - | head`) went away: no traceback, and
        # no second error when Python flushes stdout at exit.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def entry() -> NoReturn:
    """The `backupd` program: `main()`, then out without tearing the interpreter down.

    Freeing every module's objects at exit took ~0.13 s with aiobotocore loaded (median
    of 10 alternating runs), which every one-shot `backupd backup` paid after its work was
    done. By the time `main()` returns, its event loop has closed (children reaped,
    executor threads joined, files closed), so what is left is to flush the output and
    the standard logging handlers. An exception or `SystemExit` from `main()` (argparse's
    usage errors) leaves the usual way.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader gone away: nothing left to say
            stream.flush()
    os._exit(code)
