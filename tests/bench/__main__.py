"""`python -m tests.bench` (`make bench`): backupd against the shell pipelines, in one run.

    python -m tests.bench                 # scale 1.0 (~1 GB), 3 runs each
    python -m tests.bench --scale 0.1 --repeat 1 --quick --only fs,daemon

Prints one table of medians and the issue-7 targets, and writes the same as
JSON to tests/bench/results/. The cluster and datasets stay in var/bench for
the next run.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.bench import backups, dataset
from tests.bench.daemon import daemon_suite
from tests.bench.measure import BenchError
from tests.bench.report import Results
from tests.pgcluster import free_port

SUITES = ("fs", "s3", "s3-rgw", "restore", "rss", "daemon")
ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="dataset scale; 1.0 is ~1 GB")
    p.add_argument("--repeat", type=int, default=3, help="runs per contender (default 3)")
    p.add_argument("--quick", action="store_true", help="idle CPU over 15 s instead of 60 s")
    p.add_argument(
        "--only", default=",".join(SUITES), help=f"comma-separated suites of {','.join(SUITES)}"
    )
    p.add_argument("--work", type=Path, default=ROOT / "var" / "bench", help="cluster + scratch")
    p.add_argument(
        "--backupd",
        default=backups.BACKUPD,
        help="the backupd command to measure (default: this venv's; e.g. a patched build, "
        "whose bytecode you compile: the bench compiles this tree's only)",
    )
    p.add_argument("--results", type=Path, default=ROOT / "tests" / "bench" / "results")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SUITES)
    if unknown:
        p.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    return args


def progress(message: str) -> None:
    print(message, flush=True)


def tool_versions() -> str:
    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]

    return ", ".join(
        [
            first_line([dataset.pg_tool("pg_dump"), "--version"]),
            first_line(["zstd", "--version"]).strip("* "),
            f"Python {platform.python_version()}",
        ]
    )


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    # backupd's bytecode, as an installed package has it: where PYTHONDONTWRITEBYTECODE
    # is set (this machine), each run would otherwise compile what changed since the
    # last write of __pycache__ (~0.1 s a run after an edit).
    compileall.compile_dir(str(ROOT / "backupd"), quiet=1)
    small_scale = args.scale / 4
    results = Results(
        header={
            "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "scale": args.scale,
            "repeat": args.repeat,
            "suites": args.only,
            "cpus": os.cpu_count(),
            "load_before": load(),
            "tools": tool_versions(),
            "backupd": args.backupd,
        }
    )
    work = args.work.resolve()
    scratch = work / "work"
    scratch.mkdir(parents=True, exist_ok=True)
    cluster = dataset.BenchCluster(work)
    moto = None
    rgw = None
    failed = False
    t_start = time.monotonic()
    try:
        pg = cluster.start()
        database = dataset.ensure_dataset(pg, args.scale, progress)
        small_db = dataset.ensure_dataset(pg, small_scale, progress) if "rss" in args.only else ""
        setup = backups.Setup(pg, database, scratch, args.repeat, progress, backupd=args.backupd)
        raw = backups.warm_up(setup)
        results.header["dataset"] = (
            f"{database}: {dataset.database_size(pg, database)} on disk, "
            f"custom-format dump {raw / 2**20:.0f} MiB uncompressed"
        )
        progress(results.header["dataset"])
        if "s3" in args.only:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request

            port = free_port()
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()
            setup.s3_endpoint = f"http://127.0.0.1:{port}"
        rgw_setup = setup
        if "s3-rgw" in args.only:
            from tests.objstores import start_rgw

            progress("starting Ceph RGW (tests/objstores.py)")
            shutil.rmtree(work / "rgw", ignore_errors=True)
            rgw = start_rgw(work / "rgw")
            progress(f"Ceph RGW up in {rgw.startup_seconds:.0f} s")
            rgw_setup = dataclasses.replace(
                setup,
                s3_endpoint=rgw.endpoint,
                s3_store="rgw",
                s3_key=rgw.access_key,
                s3_secret=rgw.secret_key,
            )
        suites = {
            "fs": lambda: backups.filesystem_suite(setup, results),
            "s3": lambda: backups.s3_suite(setup, results),
            "s3-rgw": lambda: backups.s3_suite(rgw_setup, results),
            "restore": lambda: backups.restore_suite(setup, results),
            "rss": lambda: backups.rss_suite(setup, results, small_db, small_scale, args.scale),
            "daemon": lambda: daemon_suite(setup, results, 15.0 if args.quick else 60.0),
        }
        for name in SUITES:
            if name in args.only:
                try:
                    suites[name]()
                except BenchError as exc:
                    failed = True
                    results.notes.append(f"suite {name} failed: {str(exc).splitlines()[0]}")
                    progress(f"suite {name} FAILED: {exc}")
    finally:
        if moto is not None:
            moto.stop()
        if rgw is not None:
            rgw.stop()
            shutil.rmtree(work / "rgw", ignore_errors=True)
        cluster.stop()
    results.header["load_after"] = load()
    results.header["duration_seconds"] = round(time.monotonic() - t_start)
    print()
    print(results.table())
    path = results.write_json(args.results)
    print(f"\nresults written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
