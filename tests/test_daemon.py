"""Issue 3 acceptance: the daemon as a real subprocess, and the runner's retry rules."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

from backupd.config.file import load_config
from backupd.daemon.runner import Runner, StorePool
from backupd.operations.backup import Trigger
from tests import configs
from tests.daemon_proc import DaemonProcess
from tests.helpers import BACKUPD, BIG_TABLE_SQL, run_cli, wrapped_bin_dir, write_config
from tests.pgcluster import PgCluster, free_port, wait_for


def _backups(d: DaemonProcess, job: str = "app") -> list[dict]:  # type: ignore[type-arg]
    out = d.cli("list", job, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_schedule_trigger_status(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    pg_password_file: Path,
    daemons: list[DaemonProcess],
) -> None:
    cfg = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=pg_password_file,
        database=sample_db,
        fs_path=tmp_path / "store",
        extra_job='schedule = "*/2 * * * * *"\n'
        '[job.manual]\nsource = "main"\nstorage = ["local"]\n',
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    # The 6-field schedule (seconds first) fires by itself, more than once.
    wait_for(lambda: len(_backups(d)) >= 2, 30, what="two scheduled backups")
    assert {b["trigger"] for b in _backups(d)} == {"schedule"}

    out = d.cli("trigger", "manual", "--wait")
    assert out.returncode == 0, out.stderr + d.logs()
    (backup,) = _backups(d, "manual")
    assert backup["trigger"] == "manual" and backup["triggered_by"]["uid"] == 0
    assert backup["stem"] in out.stdout

    status = d.status()
    jobs = {j["name"]: j for j in status["jobs"]}
    assert jobs["app"]["next_run"] is not None
    assert jobs["manual"]["next_run"] is None  # no schedule
    assert jobs["manual"]["last_run"]["state"] == "success"
    assert jobs["app"]["last_run"]["trigger"] == "schedule"

    unknown = d.cli("trigger", "nope")
    assert unknown.returncode == 2 and "unknown job" in unknown.stderr


def test_global_limit_caps_concurrent_dumps(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    pg_password_file: Path,
    daemons: list[DaemonProcess],
) -> None:
    log = tmp_path / "bin" / "events.log"
    # Each dump records its start and end; a short pause keeps dumps overlapping if allowed.
    bindir = wrapped_bin_dir(
        tmp_path / "bin",
        f'echo "start $$" >> "{log}"\n"$REAL" "$@"\nrc=$?\n'
        f'sleep 1\necho "end $$" >> "{log}"\nexit $rc',
    )
    jobs = "".join(f'[job.j{i}]\nsource = "main"\nstorage = ["local"]\n' for i in range(10))
    cfg = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=pg_password_file,
        database=sample_db,
        fs_path=tmp_path / "store",
        extra_daemon="max_concurrent_jobs = 2",
        extra_source=f'pg_bin_dir = "{bindir}"\nmax_concurrent = 10',
        extra=jobs,
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    triggers = [subprocess.Popen([*BACKUPD, "trigger", f"j{i}", "-c", str(cfg)]) for i in range(10)]
    assert [p.wait(60) for p in triggers] == [0] * 10
    wait_for(
        lambda: log.exists() and log.read_text().count("end ") == 10, 60, what="10 dumps to finish"
    )
    running = peak = 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert peak == 2
    wait_for(
        lambda: all(
            j["last_run"] and j["last_run"]["state"] == "success"
            for j in d.status()["jobs"]
            if j["name"].startswith("j")
        ),
        30,
        what="all 10 runs recorded as success",
    )


def test_sigterm_during_long_dump_cancels_cleanly(
    tmp_path: Path,
    pg: PgCluster,
    pg_password_file: Path,
    s3_server: str,
    s3_bucket: str,
    s3_client,
    daemons: list[DaemonProcess],  # type: ignore[no-untyped-def]
) -> None:
    db = "big_" + uuid.uuid4().hex[:8]
    pg.createdb(db)
    pg.psql(BIG_TABLE_SQL, db)
    marker = uuid.uuid4().hex
    bindir = wrapped_bin_dir(tmp_path / "bin", f'"$REAL" "$@"\nexec -a hold-{marker} sleep 300')
    cfg = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=pg_password_file,
        database=db,
        s3=(s3_server, s3_bucket),
        extra_daemon='shutdown_grace = "2s"',
        extra_source=f'pg_bin_dir = "{bindir}"',
        extra_job='compression = "none"\n',
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    assert d.cli("trigger", "app").returncode == 0
    wait_for(
        lambda: s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"),
        60,
        what="the upload to start",
    )
    wait_for(lambda: _pids(f"hold-{marker}"), 60, what="the dump to be in progress")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(timeout=2 + 10) == 0
    assert time.monotonic() - t0 < 2 + 10
    assert _pids(f"hold-{marker}") == []
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    events = d.events()
    finished = [e for e in events if e.get("event") == "run_finished"]
    # Stopped by the shutdown, the run did not make its backup: a failure (issue 12).
    assert finished and finished[-1]["result"] == "failure"
    assert finished[-1]["error"] == "interrupted by daemon shutdown (after shutdown_grace 2s)"
    assert not Path(load_config(cfg).daemon.socket).exists()
    pg.dropdb(db)


def _pids(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_sighup_reload_keeps_old_config_when_broken(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    pg_password_file: Path,
    daemons: list[DaemonProcess],
) -> None:
    cfg = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=pg_password_file,
        database=sample_db,
        fs_path=tmp_path / "store",
    )
    good = cfg.read_text()
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)

    cfg.write_text(good + '\n[job.broken]\nsource = "missing"\nstorage = ["local"]\n')
    d.signal(signal.SIGHUP)
    wait_for(
        lambda: any(e.get("event") == "reload_rejected" for e in d.events()),
        15,
        what="the reload to be rejected",
    )
    assert [j["name"] for j in d.status()["jobs"]] == ["app"]
    out = d.cli("reload")
    assert out.returncode == 2 and "job.broken.source" in out.stderr

    cfg.write_text(good + '\n[job.extra]\nsource = "main"\nstorage = ["local"]\n')
    d.signal(signal.SIGHUP)
    wait_for(
        lambda: [j["name"] for j in d.status()["jobs"]] == ["app", "extra"],
        15,
        what="the new job to appear",
    )
    assert d.cli("trigger", "extra", "--wait").returncode == 0


def test_client_commands_without_daemon_exit_3(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    for args in (["status"], ["trigger", "x"], ["reload"], ["cancel", "abc"]):
        out = run_cli(*args, "--socket", str(sock))
        assert out.returncode == 3, (args, out.stderr)
        assert str(sock) in out.stderr


async def test_retries_until_the_source_comes_back(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    """The source refuses connections for two attempts, then a proxy to PostgreSQL opens."""
    port = free_port()
    cfg_path = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=pg_password_file,
        database=sample_db,
        fs_path=tmp_path / "store",
    )
    configs.edit(
        cfg_path,
        {
            "source.main.dsn": pg.dsn(sample_db, port=port),
            "job.app.retry": {"max_attempts": 5, "initial_delay": "1s", "max_delay": "10s"},
        },
    )
    config = load_config(cfg_path)
    delays: list[float] = []
    proxy: list[asyncio.Server] = []

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", pg.port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 2:  # the database "comes back" before the third attempt
            proxy.append(await asyncio.start_server(forward, "127.0.0.1", port))

    pool = StorePool()
    runner = Runner(config, pool, sleep=fake_sleep)
    try:
        run = await runner.wait(runner.submit("app", Trigger()))
    finally:
        await pool.aclose()
        for server in proxy:
            server.close()
    assert run.state == "success", run.error
    assert run.attempts == 3
    # full jitter: each delay is drawn from [0, min(max_delay, initial * 2**n)]
    assert len(delays) == 2 and 0 <= delays[0] <= 1 and 0 <= delays[1] <= 2


async def test_permanent_error_is_not_retried(
    tmp_path: Path, pg: PgCluster, pg_password_file: Path
) -> None:
    cfg_path = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=pg_password_file,
        database="missing_db",
        fs_path=tmp_path / "store",
    )
    configs.edit(cfg_path, {"job.app.retry.max_attempts": 4})
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    pool = StorePool()
    try:
        runner = Runner(load_config(cfg_path), pool, sleep=fake_sleep)
        run = await runner.wait(runner.submit("app", Trigger()))
    finally:
        await pool.aclose()
    assert run.state == "failure" and run.attempts == 1 and delays == []
    assert "missing_db" in (run.error or "")
