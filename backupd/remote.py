"""Client commands: what talks to a running daemon over its control socket
(trigger, status, history, health, cancel, reload); `commands.py` has the rest."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tomllib
from datetime import datetime
from typing import Any

from backupd.catalog.manifest import now_utc
from backupd.config.file import config_path
from backupd.daemon import control
from backupd.errors import (
    EXIT_FAILED,
    EXIT_OK,
    BackupdError,
    DaemonUnreachable,
    UsageError,
)
from backupd.observe.overview import age_of, human_duration, human_rate, human_size, one_line
from backupd.output import print_json, print_table, printable
from backupd.progress import ProgressLine

# -- daemon clients ----------------------------------------------------------------------


def peek_daemon_setting(config: str | None, key: str) -> str | None:
    """One string of the config's [daemon] table, read without validating the rest.

    None if the file is missing, unreadable or not TOML, or the key is absent.
    """
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError, AttributeError):
        with open(config_path(config), "rb") as f:
            value = tomllib.load(f).get("daemon", {}).get(key)
        return value if isinstance(value, str) else None
    return None


def _socket(args: argparse.Namespace) -> str:
    """`--socket`, else the config's `daemon.socket`, else the default.

    Reads only that one key, so a config with errors elsewhere (one the
    daemon just refused to reload) still leads the client to the daemon.
    """
    configured = None
    if args.socket is None:
        configured = peek_daemon_setting(args.config, "socket")
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
    run_id = None
    line = ProgressLine(f"{args.job}", quiet=args.quiet)
    try:
        async for reply in control.request(path, payload, timeout=None if args.wait else 30.0):
            if reply.get("event") == "progress":
                if line.enabled:  # nothing extra when not on a terminal
                    line.update(
                        _int(reply.get("bytes_done")),
                        None,
                        elapsed=_float(reply.get("elapsed_seconds")),
                        rate=_float(reply.get("rate_bytes_per_second")),
                        force=True,
                    )
                continue
            if "event" in reply:
                run_id = run_id or reply.get("run_id")
                _print_event(reply)
                continue
            final = reply
        line.clear()
    except asyncio.CancelledError:  # Ctrl-C: we stop following; the daemon does not stop the run
        if run_id is not None:
            print(
                f"\nbackupd: stopped waiting; run {printable(str(run_id))} of {args.job} goes on "
                f"in the daemon (backupd status; backupd cancel {printable(str(run_id))} "
                "to stop it)",
                file=sys.stderr,
            )
        raise
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


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _event_value(key: str, value: Any) -> str:
    """A `--wait` event's field in human units: sizes in KiB/MiB, seconds rounded."""
    number = _float(value)
    if number is not None and (key.endswith("_bytes") or key == "bytes_done"):
        return human_size(number)
    if number is not None and key.endswith("_seconds"):
        return human_duration(number)
    if number is not None and key.endswith("_per_second"):
        return human_rate(number)
    return printable(str(value))


def _print_event(event: dict[str, Any]) -> None:
    kind = event.get("event")
    detail = {k: v for k, v in event.items() if k not in ("event", "run_id", "job")}
    text = " ".join(
        f"{k.removesuffix('_seconds').removesuffix('_bytes')}={_event_value(k, v)}"
        for k, v in detail.items()
    )
    print(
        printable(f"{event.get('job', '')} {event.get('run_id', '')}: {kind} {text}".rstrip()),
        file=sys.stderr,
    )


async def status(args: argparse.Namespace) -> int:
    """One row per job; a failed last run's error and each running run on lines below it."""
    reply = _check_reply(await control.call(_socket(args), {"cmd": "status"}))
    jobs = reply.get("jobs", [])
    if args.json:
        print_json({"node": reply.get("node"), "jobs": jobs})
        return EXIT_OK
    if not jobs:
        print("no jobs configured")
        return EXIT_OK
    now = now_utc()
    rows = [("JOB", "LAST RESULT", "LAST BACKUP IN STORAGE", "NEXT RUN (UTC)", "RUNNING")]
    details: dict[int, list[str]] = {}
    for job in jobs:
        last = job.get("last_run") or {}
        result = "-"
        if last.get("state"):
            result = f"{last['state']} {_ago(last.get('finished_at'), now)}"
            if last.get("duration_seconds") is not None:
                result += f" ({human_duration(last['duration_seconds'])})"
        backup = job.get("last_backup")
        stored = "-"
        if backup:
            stored = (
                f"{human_size(backup.get('size_bytes'))}, "
                f"{human_duration(backup.get('age_seconds'))} ago"
            )
            if backup.get("partial"):
                stored += ", partial"
        running = job.get("running", [])
        lines = []
        if last.get("state") in ("failure", "cancelled") and job.get("last_error"):
            lines.append(f"  last error: {printable(job['last_error'])}")
        for run in running:
            lines.append(f"  running {run['run_id']}: {_progress_text(run)}")
        details[len(rows)] = lines
        rows.append(
            (
                printable(job["name"]),
                result,
                stored,
                _utc(job.get("next_run")),
                ",".join(
                    [r["run_id"] for r in running]
                    + [f"{c['slot']}@{printable(str(c['node']))}" for c in job.get("claims", [])]
                )
                or "-",
            )
        )
    print_table(rows, details)
    if reply.get("ha") and reply.get("node"):  # claims in RUNNING show each slot's holder
        print(f"answered by node {printable(str(reply['node']))} (HA)")
    return EXIT_OK


def _utc(stamp: str | None) -> str:
    return (stamp or "-")[:19].replace("T", " ")


def _ago(stamp: str | None, now: datetime) -> str:
    when = _parse_time(stamp)
    return "-" if when is None else f"{human_duration(age_of(when, now))} ago"


def _parse_time(stamp: Any) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _progress_text(run: dict[str, Any]) -> str:
    if run.get("state") != "running":
        return str(run.get("state"))
    return (
        f"{human_size(run.get('bytes_done'))} at {human_rate(run.get('rate_bytes_per_second'))}, "
        f"{human_duration(run.get('elapsed_seconds'))} elapsed"
    )


async def history(args: argparse.Namespace) -> int:
    """The job's recent runs, newest first, as the daemon remembers them (since its start)."""
    reply = _check_reply(
        await control.call(_socket(args), {"cmd": "history", "job": args.job, "limit": args.limit})
    )
    runs = [r for r in reply.get("runs", []) if isinstance(r, dict)]
    if args.json:
        print_json({"runs": runs})
        return EXIT_OK
    if not runs:
        print(f"no runs of job {printable(args.job)} since the daemon started")
        return EXIT_OK
    rows = [("RESULT", "TRIGGER", "STARTED (UTC)", "DURATION", "SIZE", "ATTEMPTS", "NODE", "ERROR")]
    for run in runs:
        size = run.get("size_bytes")
        rows.append(
            (
                str(run.get("result") or run.get("state") or "-"),
                printable(str(run.get("trigger") or "-")),
                _utc(run.get("started_at") or run.get("submitted_at")),
                human_duration(run.get("duration_seconds")),
                human_size(size) if isinstance(size, int) else "-",
                str(run.get("attempts", "-")),
                printable(str(run.get("node") or "-")),
                printable(one_line(run.get("error")) or "-"),
            )
        )
    print_table(rows)
    return EXIT_OK


async def health(args: argparse.Namespace) -> int:
    """Whether the daemon is alive, for container health checks: GET /healthz on the
    config's `daemon.http_listen` (a wildcard address is asked on loopback), else a
    ping on the control socket. Exit 0 healthy, 1 unhealthy, 3 unreachable."""
    listen = peek_daemon_setting(args.config, "http_listen")
    if not listen:
        reply = await control.call(_socket(args), {"cmd": "ping"}, timeout=args.timeout)
        if reply.get("ok"):
            print("ok (control socket)")
            return EXIT_OK
        print("backupd: the daemon does not answer ping", file=sys.stderr)
        return EXIT_FAILED
    import aiohttp

    from backupd.daemon.http import parse_listen

    host, port = parse_listen(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    try:
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as resp:
                healthy = resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DaemonUnreachable(f"no answer from {url}: {exc or type(exc).__name__}") from None
    if not healthy:
        print(f"backupd: {url} answered {resp.status}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ok ({url})")
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
