"""Issue 8: load. Many runs at once, many schedules at once, many clients at once.

The daemon is a real `backupd run` subprocess where it matters (its own
process: its fds, its memory); the schedule load runs the real ScheduleLoop
on the fake clock, fed by the daemon's own `schedule_entries`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupd.config.file import parse_config
from backupd.config.model import Config
from backupd.daemon import control
from backupd.daemon.lifecycle import schedule_entries
from backupd.daemon.scheduler import ScheduleLoop
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.fakeclock import FakeClock
from tests.helpers import wrapped_bin_dir


def proc_status(pid: int, field: str) -> int:
    """A `kB` figure from /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def ask(sock: str, payload: dict[str, Any]) -> dict[str, Any]:
    return await control.call(sock, payload, timeout=30)


# -- 50 runs at once -------------------------------------------------------------------------


@pytest.mark.slow
async def test_fifty_triggers_at_once_run_four_at_a_time_and_all_complete(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    daemons: list[DaemonProcess],
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    events = tmp_path / "bin" / "dumps.log"
    # Each dump logs its start and end; the pause holds the slot so runs overlap if allowed.
    bindir = wrapped_bin_dir(
        tmp_path / "bin",
        f'echo "start $$" >> "{events}"\n"$REAL" "$@"\nrc=$?\n'
        f'sleep 0.3\necho "end $$" >> "{events}"\nexit $rc',
    )
    jobs = "".join(f'[job.j{n}]\nsource = "main"\nstorage = ["local"]\n' for n in range(50))
    cfg = config_file(
        sample_db,
        extra_daemon="max_concurrent_jobs = 4",
        extra_source=f'pg_bin_dir = "{bindir}"\nmax_concurrent = 50',
        extra=jobs,
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    assert d.proc is not None
    sock = str(tmp_path / "run" / "control.sock")
    rss_idle = proc_status(d.proc.pid, "VmRSS")

    began = time.monotonic()
    replies = await asyncio.gather(
        *(ask(sock, {"cmd": "trigger", "job": f"j{n}"}) for n in range(50))
    )
    assert all(reply["ok"] for reply in replies), replies

    async def all_done() -> bool:
        jobs = (await ask(sock, {"cmd": "status"}))["jobs"]
        return all(j["last_run"] and not j["running"] for j in jobs if j["name"] != "app")

    async with asyncio.timeout(120):
        while not await all_done():
            await asyncio.sleep(0.2)
    elapsed = time.monotonic() - began
    status = (await ask(sock, {"cmd": "status"}))["jobs"]
    assert {j["last_run"]["state"] for j in status if j["name"] != "app"} == {"success"}

    running = peak = 0
    lines = events.read_text().splitlines()
    for line in lines:
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert len(lines) == 100 and running == 0
    assert peak == 4
    listed = json.loads(d.cli("list", "--json").stdout)
    assert len(listed) == 50
    hwm = proc_status(d.proc.pid, "VmHWM")  # the peak resident size over the whole run
    assert hwm - rss_idle < 64 * 1024 * 1024
    record_testsuite_property("fifty_runs_seconds", round(elapsed, 1))
    record_testsuite_property("fifty_runs_peak_dumps", peak)
    record_testsuite_property("fifty_runs_rss_idle_mib", round(rss_idle / 2**20, 1))
    record_testsuite_property("fifty_runs_vmhwm_mib", round(hwm / 2**20, 1))


# -- 1,000 schedules in one minute ----------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]


def thousand_jobs(expr: Callable[[int], str]) -> Config:
    jobs = "".join(
        f'[job.j{n}]\nsource = "main"\nstorage = ["local"]\n'
        f'schedule = ["{expr(n)}"]\ntimezone = "{ZONES[n % len(ZONES)]}"\n'
        for n in range(1000)
    )
    text = (
        '[source.main]\ntype = "postgres"\ndsn = "postgresql://backup@db1/app"\n'
        '[storage.local]\ntype = "filesystem"\npath = "/var/backups/backupd"\n' + jobs
    )
    return parse_config(tomllib.loads(text))


async def test_a_thousand_schedules_in_the_same_minute_fire_once_each_per_slot(
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    """1,000 jobs due at the very same instant every minute (five zones, whole-hour and
    half-hour offsets, one reload of all of them), for five minutes."""
    start = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    clock = FakeClock(start)
    fired: dict[str, list[datetime]] = {}
    minute_costs: list[float] = []

    async def fire(key: str, slot: datetime) -> None:
        assert clock.now() == slot
        fired.setdefault(key, []).append(slot)

    t0 = time.perf_counter()
    every_minute = thousand_jobs(lambda n: "* * * * *")
    parse_seconds = time.perf_counter() - t0
    loop = ScheduleLoop(clock, schedule_entries(every_minute), fire)
    task = asyncio.create_task(loop.run())
    await clock.wait_for_sleepers()
    try:
        for minute in range(5):
            if minute == 2:  # every schedule changes: each one is recomputed
                t0 = time.perf_counter()
                loop.replace(schedule_entries(thousand_jobs(lambda n: "*/1 * * * *")))
                await clock.wait_for_sleepers()
                reload_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            await clock.advance(60)
            minute_costs.append(time.perf_counter() - t0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    slots = [start + timedelta(minutes=m) for m in range(1, 6)]
    assert len(fired) == 1000
    assert all(fired_slots == slots for fired_slots in fired.values())
    assert max(minute_costs) < 2.0
    record_testsuite_property("thousand_schedules_parse_seconds", round(parse_seconds, 3))
    record_testsuite_property(
        "thousand_schedules_worst_minute_seconds", round(max(minute_costs), 3)
    )
    record_testsuite_property("thousand_schedules_reload_seconds", round(reload_seconds, 3))


# -- 500 socket clients at once -------------------------------------------------------------

# (what a client sends, the reply codes it may get; None: it hangs up without waiting)
CLIENTS: list[tuple[bytes, set[str] | None]] = [
    (b'{"cmd": "ping"}\n', {"ok"}),
    (b'{"cmd": "status"}\n', {"ok"}),
    (b'{"cmd": "history", "limit": 5}\n', {"ok"}),
    (b"this is not json\n", {"bad_request"}),
    (b"[1, 2, 3]\n", {"bad_request"}),
    (b'{"no": "cmd"}\n', {"bad_request"}),
    (b'{"cmd": "format-disk"}\n', {"unknown_command"}),
    (b'{"cmd": "trigger", "job": ["app"]}\n', {"bad_request"}),
    (b"\xff\xfe\x00garbage\x00\n", {"bad_request"}),
    (b'{"cmd": "ping", "pad": "' + b"x" * (70 * 1024) + b'"}\n', {"too_large"}),
    (b'{"cmd": "sta', None),  # half a request, then gone
]


async def one_client(sock: str, sent: bytes, expect: set[str] | None) -> str:
    """Send `sent`; return the reply's code ("ok", an error code) or "hung up"."""
    reader, writer = await asyncio.open_unix_connection(sock, limit=1 << 20)
    try:
        writer.write(sent)
        await writer.drain()
        if expect is None:
            return "hung up"
        async with asyncio.timeout(30):
            line = await reader.readline()
        reply = json.loads(line)
        return "ok" if reply["ok"] else str(reply["error"]["code"])
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, BrokenPipeError):
            pass


async def test_five_hundred_socket_clients_at_once_some_malformed(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    daemons: list[DaemonProcess],
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    cfg = config_file(sample_db)
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    assert d.proc is not None
    pid = d.proc.pid
    sock = str(tmp_path / "run" / "control.sock")
    baseline = open_fds(pid)  # the start-up check's connection may still be counted here

    began = time.monotonic()
    kinds = [CLIENTS[n % len(CLIENTS)] for n in range(500)]
    codes = await asyncio.gather(*(one_client(sock, sent, expect) for sent, expect in kinds))
    elapsed = time.monotonic() - began
    busy = 0
    for (sent, expect), code in zip(kinds, codes, strict=True):
        if code == "busy":  # a clean refusal: more than max_connections at once
            busy += 1
            continue
        assert code in (expect or {"hung up"}), (sent[:40], code)
    assert busy < 500

    # Still answering, and every connection's fd is given back.
    assert (await ask(sock, {"cmd": "ping"}))["ok"]
    async with asyncio.timeout(15):
        while open_fds(pid) > baseline:
            await asyncio.sleep(0.1)
    events = d.events()
    assert not [
        e for e in events if e.get("event") in ("socket_connection_failed", "socket_command_failed")
    ]
    assert "Traceback" not in d.logs()
    record_testsuite_property("socket_clients", len(codes))
    record_testsuite_property("socket_clients_busy", busy)
    record_testsuite_property("socket_clients_seconds", round(elapsed, 2))
    record_testsuite_property("socket_daemon_fds", baseline)
