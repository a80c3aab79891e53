"""Issue 18 item 3: the live progress line, through a real pseudo-terminal."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import BACKUPD, BIG_TABLE_SQL, run_cli
from tests.pgcluster import PgCluster, scratch_database
from tests.test_operator import gated_bin_dir

CLEAR = "\r\x1b[K"


def on_pty(
    argv: list[str],
    when: Callable[[str], bool] | None = None,
    then: Callable[[], None] = lambda: None,
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Run `backupd ARGV` with stderr on a pseudo-terminal: (exit code, stdout, terminal text).

    Once the terminal text satisfies `when`, `then` is called (once).
    """
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*BACKUPD, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, **(env or {})},
    )
    os.close(slave)
    seen = b""
    fired = when is None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                seen += data
            if not fired and when is not None and when(seen.decode(errors="replace")):
                fired = True
                then()
            if proc.poll() is not None and not ready:
                break
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fired, seen.decode(errors="replace")
    return proc.returncode, out, seen.decode(errors="replace")


@pytest.fixture
def big_db(pg: PgCluster) -> Iterator[str]:
    yield from scratch_database(pg, BIG_TABLE_SQL.replace("120000", "40000"), "big_")


@pytest.fixture
def gated(tmp_path: Path, pg: PgCluster, big_db: str, config_file: ConfigFile) -> tuple[Path, Path]:
    """A config whose job `app` dumps a few MiB, then waits for the gate file."""
    bindir, gate = gated_bin_dir(tmp_path / "gated")
    cfg = config_file(big_db, extra_source={"pg_bin_dir": bindir})
    return cfg, gate


SHOWS_BYTES = re.compile(r"\r\x1b\[K(\S+ )?app  [\d.]+ (KiB|MiB)  [\d.]+ (B|KiB|MiB)/s  [\d.]+s")


def test_backup_draws_a_progress_line_on_a_terminal_only(gated: tuple[Path, Path]) -> None:
    cfg, gate = gated
    rc, out, tty = on_pty(
        ["backup", "app", "-c", str(cfg)],
        when=lambda text: SHOWS_BYTES.search(text) is not None,
        then=gate.touch,
    )
    assert rc == 0, tty
    assert "backup app  " in tty and tty.count(CLEAR) >= 2
    # The line is cleared before log lines and at the end: the result prints on a clean line.
    assert "app-" in out and CLEAR not in out
    # Not a terminal: no progress line at all; --quiet: none on a terminal either.
    plain = run_cli("backup", "app", "-c", str(cfg))
    assert plain.returncode == 0 and "\r" not in plain.stderr and "\x1b[K" not in plain.stderr
    rc, _, tty = on_pty(["backup", "app", "--quiet", "-c", str(cfg)])
    assert rc == 0 and CLEAR not in tty


def test_trigger_wait_shows_progress_and_events_in_human_units(
    gated: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, gate = gated
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        rc, out, tty = on_pty(
            ["trigger", "app", "--wait", "-c", str(cfg)],
            when=lambda text: SHOWS_BYTES.search(text) is not None,
            then=gate.touch,
        )
        assert rc == 0, tty + d.logs()
        assert "success" in out
        # Events in human units: the object's size in KiB/MiB, not a byte count.
        event = re.search(r": object database=\S+ size=([\d.]+ (KiB|MiB))", tty)
        assert event is not None, tty
        assert not re.search(r"size_bytes=\d", tty)
        # Not on a terminal: the events, but no progress line.
        gate.unlink()
        proc = subprocess.Popen(
            [*BACKUPD, "trigger", "app", "--wait", "-c", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        gate.touch()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert ": object database=" in err and "\r" not in err and "progress" not in err
    finally:
        gate.touch()
        d.stop()


def test_download_restore_verify_show_percentage_of_the_known_size(
    gated: tuple[Path, Path], tmp_path: Path, pg: PgCluster
) -> None:
    cfg, gate = gated
    gate.touch()
    assert run_cli("backup", "app", "-c", str(cfg)).returncode == 0
    rc, _, tty = on_pty(["download", "app", "-o", str(tmp_path / "d.pgdump"), "-c", str(cfg)])
    assert rc == 0, tty
    assert re.search(r"download app +\d+% [\d.]+ (KiB|MiB) of 2.\d MiB", tty), tty
    assert tty.endswith(CLEAR)  # the line is gone when the command prints its result
    rc, _, tty = on_pty(["verify", "app", "-c", str(cfg)])
    assert rc == 0, tty
    assert re.search(r"verify app  +\d+% ", tty), tty
    target = "restored_" + uuid.uuid4().hex[:8]
    rc, _, tty = on_pty(
        ["restore", "app", "--to", pg.dsn(target), "--create", "-c", str(cfg)],
        env={"PGPASSWORD": pg.password},
    )
    assert rc == 0, tty
    assert re.search(r"restore app  +\d+% ", tty), tty
    rc, _, tty = on_pty(["download", "app", "--quiet", "-o", str(tmp_path / "q"), "-c", str(cfg)])
    assert rc == 0 and CLEAR not in tty
    pg.dropdb(target)
