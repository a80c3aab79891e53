"""Issue 4 acceptance: a real daemon observed the way an operator observes it.

Every test runs `backupd run` as a subprocess against the session's real
PostgreSQL and reads it through real clients: HTTP for /metrics, /healthz and
/readyz, promtool and a real Prometheus server, a unix datagram socket standing
in for systemd's NOTIFY_SOCKET, and an HTTP receiver for webhooks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backupd import __version__
from backupd.catalog.manifest import folder_for, parse_rfc3339
from backupd.config.file import load_config
from tests import configs
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import BACKUPD, wrapped_bin_dir
from tests.pgcluster import free_port, wait_for

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
NO_RETRY_WAIT = 'retry = { max_attempts = 2, initial_delay = "0s", max_delay = "0s" }'


def _config(
    tmp_path: Path,
    config_file: ConfigFile,
    database: str,
    *,
    extra_job: str = "",
    extra: str = "",
) -> tuple[Path, int]:
    """A config with job `ok` on a filesystem store and HTTP on a free loopback port."""
    port = free_port()
    cfg = config_file(
        database,
        path=tmp_path / "backupd.toml",
        job="ok",
        extra_job=extra_job,
        extra=extra,
        http_listen=f"127.0.0.1:{port}",
    )
    return cfg, port


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Exposition text -> {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _metrics(port: int) -> str:
    status, text = _get(port, "/metrics")
    assert status == 200
    return text


def _backups(d: DaemonProcess, job: str = "ok") -> list[dict[str, Any]]:
    out = d.cli("list", job, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _ts(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _size(manifest: dict[str, Any]) -> int:
    return sum(o["size_bytes"] for o in manifest["objects"])


def _trigger_ok(d: DaemonProcess, job: str = "ok") -> dict[str, Any]:
    out = d.cli("trigger", job, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr + d.logs()
    (manifest,) = _backups(d, job)
    return manifest


def test_metrics_after_a_success_and_failures_are_complete_and_lint_clean(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    pg_password_file: Path,
    daemons: list[DaemonProcess],
) -> None:
    dead_port = free_port()  # nothing listens here: connection refused, a transient error
    extra = f"""
[job.bad]
source = "main"
databases = ["no_such_db_{sample_db}"]
storage = ["local"]
{NO_RETRY_WAIT}

[source.down]
type = "postgres"
dsn = "postgresql://postgres@127.0.0.1:{dead_port}/postgres"
password = {{ file = "{pg_password_file}" }}

[job.down]
source = "down"
storage = ["local"]
{NO_RETRY_WAIT}
"""
    # Scheduled once a year, without catch-up: it has a next run but never fires here.
    cfg, port = _config(
        tmp_path,
        config_file,
        sample_db,
        extra_job='schedule = "0 0 1 1 *"\ncatch_up = false\n',
        extra=extra,
    )
    assert load_config(cfg).jobs["bad"].retry.initial_delay == 0.0  # "0s" is accepted
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)

    manifest = _trigger_ok(d)
    for job in ("bad", "down"):
        out = d.cli("trigger", job, "--wait")
        assert out.returncode == 1, out.stdout + out.stderr

    text = _metrics(port)
    s = _samples(text)
    assert 'backupd_job_runs_total{job="ok",result="success"} 1.0' in text
    assert _value(s, "backupd_job_runs_total", job="ok", result="failure") == 0
    for job in ("bad", "down"):
        assert _value(s, "backupd_job_runs_total", job=job, result="failure") == 1
        assert _value(s, "backupd_job_runs_total", job=job, result="success") == 0
        assert _value(s, "backupd_job_last_failure_timestamp_seconds", job=job) is not None
        assert _value(s, "backupd_job_last_success_timestamp_seconds", job=job) is None
    # Attempts: a missing database is permanent (one attempt, no retry); a refused
    # connection is transient (retried once, then the run gives up).
    attempts = {
        (job, result): _value(s, "backupd_job_attempts_total", job=job, result=result)
        for job in ("ok", "bad", "down")
        for result in ("success", "retry", "failure")
    }
    assert attempts == {
        ("ok", "success"): 1,
        ("ok", "retry"): 0,
        ("ok", "failure"): 0,
        ("bad", "success"): 0,
        ("bad", "retry"): 0,
        ("bad", "failure"): 1,
        ("down", "success"): 0,
        ("down", "retry"): 1,
        ("down", "failure"): 1,
    }
    for job in ("ok", "bad", "down"):
        assert _value(s, "backupd_job_duration_seconds_count", job=job) == 1
        assert _value(s, "backupd_job_running", job=job) == 0

    # Bytes written: exactly what the backup's data objects occupy on disk.
    folder = tmp_path / "store" / folder_for("ok", parse_rfc3339(manifest["started_at"]))
    stored = sum((folder / o["key"]).stat().st_size for o in manifest["objects"])
    assert stored == _size(manifest) > 0
    assert _value(s, "backupd_bytes_written_total", job="ok", storage="local") == stored
    assert not _value(s, "backupd_bytes_written_total", job="bad", storage="local")
    assert _value(s, "backupd_job_last_size_bytes", job="ok") == _size(manifest)
    last_success = _value(s, "backupd_job_last_success_timestamp_seconds", job="ok")
    assert last_success is not None
    assert abs(last_success - _ts(manifest["finished_at"])) < 5

    # The next run is the scheduler's, the same instant `status` shows.
    jobs = {j["name"]: j for j in d.status()["jobs"]}
    assert _value(s, "backupd_job_next_run_timestamp_seconds", job="ok") == _ts(
        jobs["ok"]["next_run"]
    )
    assert _value(s, "backupd_job_next_run_timestamp_seconds", job="bad") is None
    assert _value(s, "backupd_build_info", version=__version__) == 1

    # Retention lists the storage after the success (in the background, after the run).
    def listed() -> dict[Any, float] | None:
        s = _samples(_metrics(port))
        counts = [_value(s, "backupd_backups", job=j, storage="local") for j in ("ok", "bad")]
        return s if counts[0] and counts[1] is not None else None

    s = wait_for(listed, 10, what="backupd_backups after the run's listing")
    assert _value(s, "backupd_backups", job="ok", storage="local") == 1
    assert _value(s, "backupd_backups", job="bad", storage="local") == 0

    lint = subprocess.run(
        [str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert lint.returncode == 0 and lint.stdout == "" and lint.stderr == "", lint


def test_health_endpoints_while_running_and_nothing_listens_after_sigterm(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    pg_password_file: Path,
    daemons: list[DaemonProcess],
) -> None:
    cfg, port = _config(tmp_path, config_file, sample_db, extra_job='schedule = "0 0 1 1 *"\n')
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    _trigger_ok(d)

    assert _get(port, "/healthz") == (200, "ok\n")
    status, body = _get(port, "/readyz")
    assert status == 200
    ready = json.loads(body)
    assert ready["ready"] is True
    assert ready["jobs"]["ok"]["last_result"] == "success"
    assert ready["jobs"]["ok"]["running"] is False
    assert ready["jobs"]["ok"]["next_run"] == d.status()["jobs"][0]["next_run"]
    assert str(pg_password_file) not in body and "postgresql://" not in body

    d.signal(signal.SIGTERM)
    assert d.wait(timeout=15) == 0
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass
    assert not Path(load_config(cfg).daemon.socket).exists()


def test_restarted_daemon_reports_last_success_from_storage(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    daemons: list[DaemonProcess],
) -> None:
    cfg, port = _config(tmp_path, config_file, sample_db)
    first = DaemonProcess(cfg, tmp_path / "first.log").start()
    daemons.append(first)
    manifest = _trigger_ok(first)
    assert first.stop() == 0

    second = DaemonProcess(cfg, tmp_path / "second.log").start()
    daemons.append(second)

    def scanned() -> dict[Any, float] | None:
        s = _samples(_metrics(port))
        has = _value(s, "backupd_job_last_success_timestamp_seconds", job="ok") is not None
        return s if has else None

    s = wait_for(scanned, 15, what="the start-up scan to report the last success")
    assert _value(s, "backupd_job_last_success_timestamp_seconds", job="ok") == pytest.approx(
        _ts(manifest["finished_at"]), abs=1e-3
    )
    assert _value(s, "backupd_job_last_size_bytes", job="ok") == _size(manifest)
    assert _value(s, "backupd_backups", job="ok", storage="local") == 1
    # This process ran nothing: the figures came from storage, not from memory.
    assert _value(s, "backupd_job_runs_total", job="ok", result="success") == 0


def test_running_gauge_counts_queued_runs_and_a_cancelled_one_leaves_it_at_zero(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    daemons: list[DaemonProcess],
) -> None:
    # Each dump holds its pipe open after pg_dump, so `ok` keeps the only slot.
    bindir = wrapped_bin_dir(tmp_path / "bin", '"$REAL" "$@"\nexec sleep 300')
    cfg, port = _config(
        tmp_path,
        config_file,
        sample_db,
        extra='[job.queued]\nsource = "main"\nstorage = ["local"]\n',
    )
    configs.edit(cfg, {"daemon.max_concurrent_jobs": 1, "source.main.pg_bin_dir": bindir})
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)

    def running(job: str) -> list[dict[str, Any]]:
        return next(j["running"] for j in d.status()["jobs"] if j["name"] == job)

    assert d.cli("trigger", "ok").returncode == 0
    wait_for(lambda: [r["state"] for r in running("ok")] == ["running"], 15, what="ok to run")
    assert d.cli("trigger", "queued").returncode == 0
    (queued,) = wait_for(lambda: running("queued"), 5, what="the queued run")
    assert queued["state"] == "queued"
    s = _samples(_metrics(port))
    assert _value(s, "backupd_job_running", job="ok") == 1
    assert _value(s, "backupd_job_running", job="queued") == 1  # as `status` lists it

    assert d.cli("cancel", queued["run_id"]).returncode == 0
    wait_for(lambda: not running("queued"), 10, what="the queued run to be cancelled")
    s = _samples(_metrics(port))
    assert _value(s, "backupd_job_running", job="queued") == 0
    assert _value(s, "backupd_job_runs_total", job="queued", result="cancelled") == 1
    assert _value(s, "backupd_job_attempts_total", job="queued", result="cancelled") == 0

    (busy,) = running("ok")
    assert d.cli("cancel", busy["run_id"]).returncode == 0
    wait_for(lambda: not running("ok"), 10, what="the running run to be cancelled")
    s = _samples(_metrics(port))
    assert _value(s, "backupd_job_running", job="ok") == 0
    assert _value(s, "backupd_job_runs_total", job="ok", result="cancelled") == 1
    assert _value(s, "backupd_job_attempts_total", job="ok", result="cancelled") == 1


@pytest.mark.skipif(not PROMETHEUS.exists(), reason="needs Debian's prometheus package")
def test_real_prometheus_scrapes_the_last_success(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    daemons: list[DaemonProcess],
) -> None:
    cfg, port = _config(tmp_path, config_file, sample_db)
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    manifest = _trigger_ok(d)

    prom_port = free_port()
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: backupd\n"
        "    honor_labels: true\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n"
    )
    prom_log = open(tmp_path / "prometheus.log", "wb")  # closed in the finally below
    prom = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={prom_cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    try:
        query = urllib.parse.urlencode({"query": "backupd_job_last_success_timestamp_seconds"})

        def scraped() -> list[dict[str, Any]]:
            if prom.poll() is not None:
                raise RuntimeError((tmp_path / "prometheus.log").read_text())
            try:
                status, body = _get(prom_port, f"/api/v1/query?{query}")
            except OSError:
                return []  # not listening yet
            if status != 200:
                return []
            return json.loads(body)["data"]["result"]  # type: ignore[no-any-return]

        (series,) = wait_for(scraped, 15, interval=0.2, what="Prometheus to scrape the daemon")
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        prom_log.close()
    assert series["metric"]["job"] == "ok"  # honor_labels keeps the job's own label
    assert series["metric"]["__name__"] == "backupd_job_last_success_timestamp_seconds"
    assert abs(float(series["value"][1]) - _ts(manifest["finished_at"])) < 5


def test_sd_notify_ready_after_sockets_then_watchdog_then_stopping(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    cfg, port = _config(tmp_path, config_file, sample_db)
    control = Path(load_config(cfg).daemon.socket)
    notify_path = tmp_path / "notify.sock"
    received: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}
        env |= {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
        with open(tmp_path / "daemon.log", "wb") as log:
            proc = subprocess.Popen(
                [*BACKUPD, "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
            try:

                def next_message(timeout: float) -> str:
                    notify.settimeout(timeout)
                    message = notify.recv(4096).decode()
                    received.append(message)
                    return message

                first = next_message(30)
                # Freeze the daemon the moment READY=1 arrives, so what we see is its
                # state when it sent it: both sockets already accept connections.
                proc.send_signal(signal.SIGSTOP)
                try:
                    assert first.splitlines()[0] == "READY=1", received
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                        c.connect(str(control))
                    socket.create_connection(("127.0.0.1", port), 2).close()
                finally:
                    proc.send_signal(signal.SIGCONT)
                assert _get(port, "/healthz") == (200, "ok\n")

                def watchdogs() -> bool:
                    next_message(5)
                    return sum(m == "WATCHDOG=1" for m in received) >= 2

                wait_for(watchdogs, 10, what="two WATCHDOG=1 pings")

                proc.send_signal(signal.SIGTERM)
                wait_for(lambda: next_message(10) == "STOPPING=1", 10, what="STOPPING=1")
                assert proc.wait(15) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert received.index("STOPPING=1") > received.index("WATCHDOG=1")


class _Receiver(BaseHTTPRequestHandler):
    """Records each POST as (path, content type, JSON body) and answers 200."""

    posts: queue.Queue[tuple[str, str, dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.put((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


@pytest.fixture
def receiver() -> Iterator[tuple[int, queue.Queue[tuple[str, str, dict[str, Any]]]]]:
    posts: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue()
    handler = type("Handler", (_Receiver,), {"posts": posts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], posts
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_webhook_receives_the_success_of_a_run(
    tmp_path: Path,
    sample_db: str,
    config_file: ConfigFile,
    daemons: list[DaemonProcess],
    receiver: tuple[int, queue.Queue[tuple[str, str, dict[str, Any]]]],
) -> None:
    hook_port, posts = receiver
    cfg, _ = _config(
        tmp_path,
        config_file,
        sample_db,
        extra_job='notify = ["hook"]\n',
        extra=(
            "[notify.hook]\n"
            'type = "webhook"\n'
            f'url = "http://127.0.0.1:{hook_port}/x"\n'
            'on = ["failure", "success"]\n'
        ),
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    daemons.append(d)
    t0 = time.monotonic()
    manifest = _trigger_ok(d)
    path, content_type, body = posts.get(timeout=15)
    assert time.monotonic() - t0 < 15
    run = d.status()["jobs"][0]["last_run"]
    assert path == "/x" and content_type.startswith("application/json")
    assert body["event"] == "success"  # "start" is not subscribed, so never sent
    assert body["job"] == "ok"
    assert body["run_id"] == run["run_id"]
    assert body["result"] == "success"
    assert body["size_bytes"] == _size(manifest) > 0
    assert body["error"] is None
    assert body["duration_seconds"] == run["duration_seconds"]
    assert posts.empty()
