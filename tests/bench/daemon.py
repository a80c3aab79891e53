"""The daemon with 1,000 jobs: start-up, idle CPU, /metrics and `status` latency.

The jobs share one source and one (empty) filesystem store; their daily
schedules are spread evenly over the day but none falls in the next
`QUIET_MINUTES`, so no backup starts while idle CPU is being measured.
Latencies are measured from this process with a raw socket and plain HTTP,
so they are the daemon's, not a client's interpreter start-up; `backupd
status` (the CLI, interpreter included) is reported alongside.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.bench.backups import Setup
from tests.bench.measure import BenchError, empty_dir, median
from tests.bench.report import Results
from tests.pgcluster import free_port

JOBS = 1000
QUIET_MINUTES = 20
SCRAPES = 20


def spread_schedules(count: int, now: datetime, quiet_minutes: int) -> list[str]:
    """`count` daily cron expressions spread over the day, none in the next `quiet_minutes`."""
    start = now.hour * 60 + now.minute
    free = [m for m in range(1440) if (m - start) % 1440 > quiet_minutes]
    slots = [free[i * len(free) // count] for i in range(count)]
    return [f"{m % 60} {m // 60} * * *" for m in slots]


def write_config(setup: Setup, directory: Path, http_port: int) -> Path:
    empty_dir(directory)
    pwfile = directory / "pg-password"
    pwfile.write_text(setup.pg.password + "\n")
    pwfile.chmod(0o600)
    head = textwrap.dedent(f"""\
        [daemon]
        socket = "{directory}/control.sock"
        http_listen = "127.0.0.1:{http_port}"
        log_level = "info"

        [defaults]
        compression = "zstd:3"
        catch_up = false

        [source.main]
        type = "postgres"
        dsn = "{setup.pg.dsn("postgres")}"
        password = {{ file = "{pwfile}" }}

        [storage.local]
        type = "filesystem"
        path = "{directory}/store"
        """)
    jobs = [
        f'[job.job-{i:04d}]\nsource = "main"\nstorage = ["local"]\nschedule = ["{expr}"]\n'
        for i, expr in enumerate(spread_schedules(JOBS, datetime.now(UTC), QUIET_MINUTES))
    ]
    path = directory / "backupd.toml"
    path.write_text(head + "\n" + "\n".join(jobs))
    return path


def status_round_trip(sock_path: str) -> tuple[float, dict[str, object]]:
    """One `status` request on the control socket: (seconds, reply)."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(b'{"cmd": "status"}\n')
        buf = bytearray()
        while not buf.endswith(b"\n"):
            block = s.recv(1 << 20)
            if not block:
                break
            buf += block
    elapsed = time.perf_counter() - t0
    return elapsed, json.loads(buf)


# What Prometheus 2.x asks for: OpenMetrics preferred, the text format accepted, gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


def scrape(port: int, headers: dict[str, str] | None = None) -> tuple[float, int]:
    """One GET /metrics on a new connection: (seconds, body bytes as sent)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"/metrics answered {response.status}")
    finally:
        conn.close()
    return time.perf_counter() - t0, len(body)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    def __init__(self, backupd: str, config: Path, log: Path) -> None:
        self.backupd = backupd
        self.config = config
        self.log = log
        self.sock = str(config.parent / "control.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> float:
        """Start `backupd run`; seconds until it answered a `status` request."""
        with open(self.log, "ab") as out:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                [self.backupd, "run", "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"backupd run exited {self.proc.returncode}: see {self.log}")
            try:
                _, reply = status_round_trip(self.sock)
                if reply.get("ok"):
                    return time.perf_counter() - t0
            except (OSError, ValueError):
                pass
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"the daemon did not answer within {timeout}s: see {self.log}")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
        return 0.0


def daemon_suite(setup: Setup, results: Results, idle_seconds: float) -> None:
    directory = setup.work / "daemon"
    port = free_port()
    config = write_config(setup, directory, port)
    daemon = Daemon(setup.backupd, config, directory / "daemon.log")
    setup.progress(f"daemon with {JOBS} jobs: start-up x{setup.repeat}")
    startups = []
    try:
        for r in range(setup.repeat):
            startups.append(daemon.start())
            setup.progress(
                f"  [{r + 1}/{setup.repeat}] start-up to a status answer: {startups[-1]:.2f}s"
            )
            if r < setup.repeat - 1:
                daemon.stop()
        _, reply = status_round_trip(daemon.sock)
        jobs = reply.get("jobs")
        if not isinstance(jobs, list) or len(jobs) != JOBS:
            raise BenchError(f"status does not list the {JOBS} jobs: {str(reply)[:300]}")
        assert daemon.proc is not None
        settle = 5.0
        setup.progress(f"  idle CPU over {idle_seconds:.0f}s (after {settle:.0f}s to settle)")
        time.sleep(settle)
        c0, t0 = cpu_seconds(daemon.proc.pid), time.perf_counter()
        time.sleep(idle_seconds)
        c1, t1 = cpu_seconds(daemon.proc.pid), time.perf_counter()
        idle = (c1 - c0) / (t1 - t0) * 100
        scrapes = [scrape(port) for _ in range(SCRAPES)]
        gzipped = [scrape(port, PROMETHEUS_HEADERS) for _ in range(SCRAPES)]
        statuses = [status_round_trip(daemon.sock)[0] for _ in range(SCRAPES)]
        cli = []
        for _ in range(5):
            t = time.perf_counter()
            out = subprocess.run(
                [setup.backupd, "status", "-c", str(config)], capture_output=True, check=False
            )
            cli.append(time.perf_counter() - t)
            if out.returncode != 0:
                raise BenchError(f"backupd status failed: {out.stderr.decode()[-2000:]}")
        rss = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    metrics_ms = [s[0] * 1000 for s in scrapes]
    status_ms = [s * 1000 for s in statuses]
    results.add("daemon", f"{JOBS} jobs: start-up to a status answer", "s", startups)
    results.add("daemon", f"{JOBS} jobs: idle CPU over {idle_seconds:.0f} s", "%", [idle])
    results.add(
        "daemon", f"{JOBS} jobs: GET /metrics ({scrapes[-1][1] // 1024} KiB)", "ms", metrics_ms
    )
    results.add(
        "daemon",
        f"{JOBS} jobs: GET /metrics as Prometheus asks, gzip ({gzipped[-1][1] // 1024} KiB)",
        "ms",
        [s[0] * 1000 for s in gzipped],
    )
    results.add("daemon", f"{JOBS} jobs: status round-trip on the socket", "ms", status_ms)
    results.add(
        "daemon",
        f"{JOBS} jobs: `backupd status` CLI (interpreter incl.)",
        "ms",
        [c * 1000 for c in cli],
    )
    results.add("daemon", f"{JOBS} jobs: daemon peak RSS", "MB", [rss])
    results.target(f"daemon: start-up with {JOBS} jobs", median(startups), "<", 2.0, "s")
    results.target("daemon: idle CPU", idle, "<", 1.0, "%")
    results.target("daemon: /metrics scrape", median(metrics_ms), "<", 100, "ms")
    results.target("daemon: status round-trip", median(status_ms), "<", 50, "ms")
