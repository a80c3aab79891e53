"""`python -m tests.bench.physical`: physical backups, WAL archiving under load, PITR restore.

    python -m tests.bench.physical --scale 20 --duration 300 --repeat 3
    python -m tests.bench.physical --scale 5 --duration 60 --repeat 1    # quick

1. A base backup to the filesystem store: `backupd backup` against
   `pg_basebackup -D - -Ft -X fetch | zstd -3 > file` (wall time, peak RSS).
2. `pgbench` at full speed for --duration seconds while `backupd run` archives
   the WAL through its slot: backupd_wal_archive_lag_seconds (sampled every
   second from /metrics), the spool's size, the daemon's CPU (its process tree).
3. `restore --latest --start` of the result (the restore-to-time duration) and
   `verify --restore` (the drill's measured RTO).

Runs as the cluster's owner like the tests (tests/physical.py). Prints a table
and writes JSON to tests/bench/results/physical-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.bench.measure import run, shell
from tests.pgcluster import PG_BIN, free_port, wait_for
from tests.physical import (
    OwnedDaemon,
    as_owner,
    backupd_argv,
    make_physical_cluster,
    mkdir_owned,
    physical_setup,
    stop_server,
)

ROOT = Path(__file__).resolve().parents[2]


def _tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live children (pg_receivewal)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*") if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.physical")
    p.add_argument("--scale", type=int, default=20, help="pgbench scale (20 is ~300 MB)")
    p.add_argument("--duration", type=int, default=300, help="seconds of pgbench")
    p.add_argument("--repeat", type=int, default=3, help="base backups per contender")
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="backupd-bench-phys-"))
    os.chmod(base, 0o755)
    results: dict[str, object] = {"scale": args.scale, "duration": args.duration}
    pg = make_physical_cluster(base / "cluster")
    try:
        env = {**os.environ, "PGPASSWORD": pg.password}
        print(f"pgbench -i -s {args.scale} ...", flush=True)
        subprocess.run(
            [str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(args.scale), "-d", pg.dsn()],
            env=env,
            check=True,
            capture_output=True,
        )
        size = pg.psql("SELECT pg_size_pretty(sum(pg_database_size(oid))) FROM pg_database")
        results["cluster_size"] = size
        port = free_port()
        spool = base / "job" / "spool"
        s = physical_setup(
            pg,
            base / "job",
            job="bench",
            http_listen=f"127.0.0.1:{port}",
            extra_job=f'wal = {{ slot = "backupd_bench", spool = "{spool}" }}\n',
        )
        out = mkdir_owned(base / "out")

        daemon = OwnedDaemon(s).start()
        lags: list[float] = []
        spools: list[int] = []
        try:
            wait_for(
                lambda: (
                    pg.psql(
                        "SELECT count(*) FROM pg_replication_slots "
                        "WHERE slot_name = 'backupd_bench' AND active"
                    )
                    == "1"
                ),
                60,
                what="the slot streaming",
            )
            # 1. base backups, with the archiver streaming (as in production)
            ours, theirs = [], []
            for i in range(args.repeat):
                ours.append(
                    run(
                        as_owner([*_env(s), *backupd_argv(), "backup", "-c", str(s.config), s.job]),
                        log=base / f"ours-{i}.log",
                    )
                )
                pipeline = (
                    f"{PG_BIN}/pg_basebackup -d 'host=127.0.0.1 port={pg.port} user=postgres' "
                    f"-D - -Ft -X fetch --checkpoint=fast | zstd -q -3 > {out}/base-{i}.tar.zst"
                )
                theirs.append(run(shell(pipeline), log=base / f"theirs-{i}.log", env=env))
            ours_wall = statistics.median(x.wall for x in ours)
            theirs_wall = statistics.median(x.wall for x in theirs)
            results["base_backup"] = {
                "backupd_s": round(ours_wall, 2),
                "pipeline_s": round(theirs_wall, 2),
                "ratio": round(ours_wall / theirs_wall, 3),
                "backupd_peak_rss_mb": round(max(x.max_rss_kb for x in ours) / 1024, 1),
            }
            print(results["base_backup"], flush=True)

            # 2. pgbench at full speed while the daemon archives
            assert daemon.proc is not None
            cpu0, t0 = _tree_cpu(daemon.proc.pid), time.monotonic()
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    try:
                        text = (
                            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                            .read()
                            .decode()
                        )
                    except OSError:
                        continue
                    m = re.search(r'backupd_wal_archive_lag_seconds\{job="bench"\} (\S+)', text)
                    if m:
                        lags.append(float(m.group(1)))
                    spools.append(_du(spool))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            bench_started = datetime.now(UTC)
            bench = subprocess.run(
                [
                    str(PG_BIN / "pgbench"),
                    "-c",
                    str(args.clients),
                    "-j",
                    "2",
                    "-T",
                    str(args.duration),
                    "-d",
                    pg.dsn(),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            tps = re.search(r"tps = ([\d.]+)", bench.stdout)
            wal = pg.psql("SELECT pg_current_wal_lsn()")
            # drain: until the lag is back to 0 (everything written is stored)
            t_end = time.monotonic()
            wait_for(lambda: lags and lags[-1] == 0.0, 300, interval=0.5, what="lag back to 0")
            drained = time.monotonic() - t_end
            stop.set()
            sampler.join(5)
            cpu = _tree_cpu(daemon.proc.pid) - cpu0
            elapsed = time.monotonic() - t0
        finally:
            daemon.stop()
        results["archiving"] = {
            "pgbench_tps": float(tps.group(1)) if tps else None,
            "wal_end_lsn": wal,
            "lag_max_s": round(max(lags), 1) if lags else None,
            "lag_p50_s": round(statistics.median(lags), 1) if lags else None,
            "spool_max_mb": round(max(spools) / 2**20, 1) if spools else None,
            "drain_after_load_s": round(drained, 1),
            "daemon_cpu_percent_of_one_core": round(100 * cpu / elapsed, 1),
        }
        print(results["archiving"], flush=True)

        # 3. restore to the end, and the drill
        def timed_restore(name: str, *target: str) -> float:
            """Seconds for `restore --data-dir out/NAME TARGET --start`; the server is stopped."""
            t0 = time.monotonic()
            subprocess.run(
                as_owner(
                    [
                        *_env(s),
                        *backupd_argv(),
                        "restore",
                        "-c",
                        str(s.config),
                        s.job,
                        "--data-dir",
                        str(out / name),
                        *target,
                        "--start",
                        "--port",
                        str(free_port()),
                    ]
                ),
                check=True,
                capture_output=True,
                cwd=s.base,
            )
            seconds = round(time.monotonic() - t0, 1)
            stop_server(out / name)
            return seconds

        results["restore_latest_start_s"] = timed_restore("restored", "--latest")
        middle = bench_started + timedelta(seconds=args.duration / 2)
        results["restore_to_time_mid_load_start_s"] = timed_restore(
            "middle", "--time", middle.isoformat()
        )
        drill = subprocess.run(
            as_owner(
                [*_env(s), *backupd_argv(), "verify", "-c", str(s.config), s.job, "--restore"]
            ),
            capture_output=True,
            text=True,
            cwd=s.base,
            check=False,
        )
        m = re.search(r"promoted in ([\d.]+)s", drill.stdout)
        results["drill_rto_s"] = float(m.group(1)) if m else drill.stdout[-500:]
        print(json.dumps(results, indent=2))
        dest = ROOT / "tests" / "bench" / "results"
        dest.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (dest / f"physical-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    finally:
        pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _env(s: object) -> list[str]:
    home = getattr(s, "base", "/tmp")
    return ["/usr/bin/env", f"HOME={home}"]


if __name__ == "__main__":
    raise SystemExit(main())
