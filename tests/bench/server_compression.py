"""`python -m tests.bench.server_compression`: a base backup compressed by backupd or by the server.

    python -m tests.bench.server_compression --scale 20 --repeat 3

One cluster (`pgbench -i -s SCALE`, 20 is ~300 MB), two physical jobs that
differ only in `compression_at` ("client" and "server", both zstd:3), their
`backupd backup` runs alternated. For each: wall time, CPU of the backupd
process tree (backupd + pg_basebackup), CPU of the server's reaped backends
(the walsender that ran BASE_BACKUP: the postmaster's cutime + cstime) and the
stored size. Prints a table and writes JSON to tests/bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.measure import run
from tests.pgcluster import PG_BIN
from tests.physical import as_owner, backupd_argv, make_physical_cluster, physical_setup

ROOT = Path(__file__).resolve().parents[2]


def _reaped_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime


def _stored(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("base.tar*"))


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.server_compression")
    p.add_argument("--scale", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="backupd-bench-srvz-"))
    os.chmod(base, 0o755)
    pg = make_physical_cluster(base / "cluster")
    try:
        env = {**os.environ, "PGPASSWORD": pg.password}
        subprocess.run(
            [str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(args.scale), "-d", pg.dsn()],
            env=env,
            check=True,
            capture_output=True,
        )
        size = pg.psql("SELECT pg_size_pretty(sum(pg_database_size(oid))) FROM pg_database")
        postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        setups = {
            at: physical_setup(pg, base / at, job=f"z{at}", extra_job=f'compression_at = "{at}"\n')
            for at in ("client", "server")
        }
        samples: dict[str, list[dict[str, float]]] = {at: [] for at in setups}
        for i in range(args.repeat):
            for at, s in setups.items():
                before = _stored(s.store)
                cpu0 = _reaped_cpu(postmaster)
                t = run(
                    as_owner(
                        [
                            "/usr/bin/env",
                            f"HOME={s.base}",
                            *backupd_argv(),
                            "backup",
                            "-c",
                            str(s.config),
                            s.job,
                        ]
                    ),
                    log=base / f"{at}-{i}.log",
                )
                time.sleep(0.2)  # the walsender is reaped just after pg_basebackup exits
                samples[at].append(
                    {
                        "wall_s": t.wall,
                        "backupd_cpu_s": t.cpu,
                        "server_cpu_s": _reaped_cpu(postmaster) - cpu0,
                        "stored_mb": (_stored(s.store) - before) / 2**20,
                    }
                )
        results: dict[str, object] = {"scale": args.scale, "cluster_size": size}
        for at, rows in samples.items():
            results[at] = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]} | {
                "walls": [round(r["wall_s"], 2) for r in rows]
            }
        print(json.dumps(results, indent=2))
        out = ROOT / "tests" / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / f"server-compression-{int(time.time())}.json").write_text(json.dumps(results))
    finally:
        pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
