"""Issue 18 item 6: rough edges an operator hit, each checked through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import configs
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import BACKUPD, BIG_TABLE_SQL, run_cli
from tests.pgcluster import PgCluster, free_port, wait_for
from tests.test_operator import gated_bin_dir


@pytest.fixture
def cfg(tmp_path: Path, pg: PgCluster, sample_db: str, config_file: ConfigFile) -> Path:
    return config_file(
        sample_db,
    )


def test_global_options_before_or_after_the_command(cfg: Path, tmp_path: Path) -> None:
    for argv in (
        ["-c", str(cfg), "--log-level", "debug", "check"],
        ["check", "-c", str(cfg), "--log-level", "debug"],
        ["--log-level", "debug", "check", "-c", str(cfg)],
    ):
        out = run_cli(*argv)
        assert out.returncode == 0, (argv, out.stderr)
        assert "ok (1 jobs" in out.stdout
    sock = tmp_path / "nothing.sock"
    for argv in (
        ["--socket", str(sock), "-c", str(cfg), "status"],
        ["status", "--socket", str(sock), "-c", str(cfg)],
        ["-c", str(cfg), "status", "--socket", str(sock)],
    ):
        out = run_cli(*argv)
        assert out.returncode == 3 and str(sock) in out.stderr, (argv, out.stderr)
    # A value after the command wins over one before it.
    out = run_cli("-c", str(tmp_path / "missing.toml"), "check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr


def test_help_says_where_the_config_is_and_verify_options_have_text() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    text = " ".join(top.stdout.split())
    assert "$BACKUPD_CONFIG, else /etc/backupd/backupd.toml" in text
    assert "docs/CONTRACT.md" in text
    verify = " ".join(run_cli("verify", "--help").stdout.split())
    assert "--backup ID backup id, stem, or 'latest' (default)" in verify
    assert "--storage NAME storage to read (default: the job's first)" in verify
    download = " ".join(run_cli("download", "--help").stdout.split())
    assert "--force replace an existing output file" in download


def test_log_format_console_is_honoured_by_one_shot_commands(cfg: Path) -> None:
    configs.edit(cfg, {"daemon.log_format": "console"})
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and all(not line.startswith("{") for line in lines), out.stderr
    assert any("backup_started" in line for line in lines)
    # And JSON when the config says json (stderr is not a terminal either way).
    configs.edit(cfg, {"daemon.log_format": "json"})
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stderr.splitlines()[0])["event"]


@pytest.fixture
def big_cfg(tmp_path: Path, pg: PgCluster, config_file: ConfigFile) -> Iterator[Path]:
    name = "big_" + uuid.uuid4().hex[:8]
    pg.createdb(name)
    pg.psql(BIG_TABLE_SQL.replace("120000", "20000"), name)
    try:
        yield config_file(
            name,
        )
    finally:
        pg.dropdb(name)


def test_download_refuses_an_existing_file_and_stops_quietly_on_a_closed_pipe(
    big_cfg: Path, tmp_path: Path
) -> None:
    c = ("-c", str(big_cfg))
    assert run_cli("backup", "app", *c).returncode == 0
    target = tmp_path / "dump.pgdump"
    target.write_bytes(b"keep me")
    refused = run_cli("download", "app", "-o", str(target), *c)
    assert refused.returncode == 2 and "exists; use --force" in refused.stderr
    assert target.read_bytes() == b"keep me"
    forced = run_cli("download", "app", "-o", str(target), "--force", *c)
    assert forced.returncode == 0, forced.stderr
    assert target.stat().st_size > 1_000_000
    # Through a pipe, every byte: the program leaves without interpreter teardown
    # (`cli.entry`), after flushing what it wrote.
    piped = subprocess.run([*BACKUPD, "download", "app", "-o", "-", *c], capture_output=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == target.read_bytes()

    # A reader that goes away (`| head -c 10`): exit 1, no traceback, nothing on stderr.
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [*BACKUPD, "download", "app", "-o", "-", *c],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_fd)
    assert len(os.read(read_fd, 10)) > 0
    os.close(read_fd)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err and err.strip() == "", err


def test_restore_into_a_missing_database_suggests_create(
    cfg: Path, pg: PgCluster, tmp_path: Path
) -> None:
    assert run_cli("backup", "app", "-c", str(cfg)).returncode == 0
    missing = "nodb_" + uuid.uuid4().hex[:8]
    out = run_cli(
        "restore",
        "app",
        "--to",
        pg.dsn(missing),
        "-c",
        str(cfg),
        env={"PGPASSWORD": pg.password},
    )
    assert out.returncode != 0
    assert f'"{missing}" does not exist' in out.stderr or missing in out.stderr, out.stderr
    assert "--create" in out.stderr, out.stderr


def test_ctrl_c_on_trigger_wait_says_the_run_goes_on(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    bindir, gate = gated_bin_dir(tmp_path / "gated")
    cfg = config_file(sample_db, extra_source={"pg_bin_dir": bindir})
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        err_path = tmp_path / "trigger.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [*BACKUPD, "trigger", "app", "--wait", "-c", str(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            wait_for(lambda: "running" in err_path.read_text(), 30, what="the run to start")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 130
        text = err_path.read_text()
        assert "Traceback" not in text
        run_id = d.status()["jobs"][0]["running"][0]["run_id"]
        assert f"run {run_id} of app goes on in the daemon" in text
        assert f"backupd cancel {run_id}" in text
        gate.touch()
        wait_for(
            lambda: (d.status()["jobs"][0]["last_run"] or {}).get("state") == "success",
            30,
            what="the run to finish in the daemon",
        )
    finally:
        gate.touch()
        d.stop()


def test_health_asks_where_the_config_says_the_daemon_listens(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    port = free_port()
    cfg = config_file(sample_db, http_listen=f"0.0.0.0:{port}")
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        ok = d.cli("health")
        assert ok.returncode == 0, ok.stderr
        assert f"http://127.0.0.1:{port}/healthz" in ok.stdout  # the wildcard, asked on loopback
        # Without http_listen: a ping on the control socket.
        configs.edit(cfg, {"daemon.http_listen": configs.DELETE})
        ping = d.cli("health")
        assert ping.returncode == 0 and "control socket" in ping.stdout, ping.stderr
    finally:
        d.stop()
    assert d.cli("health").returncode == 3
    configs.edit(cfg, {"daemon.http_listen": f"127.0.0.1:{port}"})
    down = d.cli("health")
    assert down.returncode == 3 and f"127.0.0.1:{port}/healthz" in down.stderr
