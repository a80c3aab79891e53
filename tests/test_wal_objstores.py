"""Issue 16 on the real object stores of issue 14: WAL archiving and PITR on Ceph RGW and Swift.

`wal-push` (archive_command) and `wal-fetch`, then the daemon's archiver
(pg_receivewal through a slot, the growing segment stored as `.partial` and
replaced) and `restore --data-dir --latest --start`, each against RGW and
Swift from tests/objstores.py. All `slow` (the stores start in minutes).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import configs
from tests.objstores import S3Target
from tests.pgcluster import PgCluster, free_port, wait_for
from tests.physical import (
    OwnedDaemon,
    PhysicalSetup,
    chown_owner,
    mkdir_owned,
    physical_cluster,
    physical_setup,
    query,
    stop_server,
    temp_base,
    wait_slot_streaming,
)
from tests.test_objstores import BUCKETS

STORES = [
    pytest.param("rgw", marks=[pytest.mark.slow, pytest.mark.timeout(480)]),
    pytest.param("swift", marks=[pytest.mark.slow, pytest.mark.timeout(480)]),
]


@pytest.fixture(scope="module")
def wal_pg() -> Iterator[PgCluster]:
    yield from physical_cluster("backupd-walobj-")


@pytest.fixture
def owned_base() -> Iterator[Path]:
    yield from temp_base("backupd-walobjjob-")


def _on_store(s: PhysicalSetup, target: S3Target) -> PhysicalSetup:
    """The job's only storage is the bucket. Its credentials are files the cluster's owner
    reads: archive_command and restore_command run in the server's environment, not ours."""
    for name, env in (("s3-key", target.key_env), ("s3-secret", target.secret_env)):
        path = s.base / name
        path.write_text(os.environ[env] + "\n")
        path.chmod(0o600)
        chown_owner(path)
    configs.edit(
        s.config,
        {
            f"job.{s.job}.storage": ["real"],
            "storage.real": configs.s3_storage(
                target.endpoint,
                target.bucket,
                prefix="pitr/",
                addressing_style="path",
                access_key_id={"file": str(s.base / "s3-key")},
                secret_access_key={"file": str(s.base / "s3-secret")},
            ),
        },
    )
    return s


def _keys(target: S3Target) -> set[str]:
    client: Any = target.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    return keys


def _index(job: str, segment: str) -> str:
    return f"pitr/{job}/wal/{segment[:8]}/{segment}.json"


def _restore_latest(s: PhysicalSetup, name: str) -> tuple[int, Path]:
    out = mkdir_owned(s.base / "restores")
    port = free_port()
    restored = s.cli(
        "restore", "-c", str(s.config), s.job, "--data-dir", str(out / name),
        "--latest", "--start", "--port", str(port), timeout=300,
    )  # fmt: skip
    if restored.returncode != 0:
        stop_server(out / name)
        raise AssertionError(restored.stdout + restored.stderr)
    return port, out / name


@pytest.mark.parametrize("kind", STORES)
def test_wal_push_and_fetch_and_a_restore_on_the_real_store(
    kind: str, request: pytest.FixtureRequest, wal_pg: PgCluster, owned_base: Path
) -> None:
    target: S3Target = request.getfixturevalue(BUCKETS[kind])
    s = _on_store(physical_setup(wal_pg, owned_base / "job", job=f"push{kind}"), target)
    s.use_archive_command()
    try:
        wal_pg.psql("DROP TABLE IF EXISTS push_rows; CREATE TABLE push_rows (i int)")
        s.ok("backup", "-c", str(s.config), s.job)
        wal_pg.psql("INSERT INTO push_rows SELECT generate_series(1, 91)")
        try:
            segment = s.switch_and_wait_archived()
        except AssertionError as exc:
            log = (wal_pg.base / "log").read_text(errors="replace")
            raise AssertionError(f"{exc}\n{log[-3000:]}") from None
    finally:
        wal_pg.psql("ALTER SYSTEM SET archive_command = ''")
        wal_pg.psql("SELECT pg_reload_conf()")
    assert _index(s.job, segment) in _keys(target)

    # wal-fetch gives the segment back; pushing the same bytes again is a no-op,
    # other bytes under its name are refused (the store keeps the first).
    fetched = s.base / "fetched"
    s.ok("wal-fetch", "-c", str(s.config), s.job, segment, str(fetched))
    assert fetched.stat().st_size == 16 * 1024 * 1024
    again = s.base / segment
    again.write_bytes(fetched.read_bytes())
    s.ok("wal-push", "-c", str(s.config), s.job, str(again))
    again.write_bytes(b"\x01" * (16 * 1024 * 1024))
    refused = s.cli("wal-push", "-c", str(s.config), s.job, str(again))
    assert refused.returncode == 1 and "different bytes" in refused.stderr, refused.stderr
    missing = s.cli("wal-fetch", "-c", str(s.config), s.job, "0000000100000000000000FF", "x")
    assert missing.returncode != 0

    port, data_dir = _restore_latest(s, "latest")
    try:
        assert query(port, "SELECT count(*) FROM push_rows") == "91"
    finally:
        stop_server(data_dir)


@pytest.mark.parametrize("kind", STORES)
def test_the_daemon_archives_to_the_real_store_and_restore_latest_has_every_row(
    kind: str, request: pytest.FixtureRequest, wal_pg: PgCluster, owned_base: Path
) -> None:
    target: S3Target = request.getfixturevalue(BUCKETS[kind])
    slot = f"backupd_objd_{kind}"
    s = _on_store(
        physical_setup(
            wal_pg,
            owned_base / "job",
            job=f"arch{kind}",
            extra_job=f'wal = {{ slot = "{slot}", spool = "{owned_base}/job/spool" }}\n',
        ),
        target,
    )
    pg = s.pg
    daemon = OwnedDaemon(s).start()
    try:
        wait_slot_streaming(pg, slot, 90, daemon.logs)
        pg.psql("DROP TABLE IF EXISTS objd_rows; CREATE TABLE objd_rows (batch text)")
        s.ok("backup", "-c", str(s.config), s.job)
        pg.psql("INSERT INTO objd_rows SELECT 'A' FROM generate_series(1, 100)")
        segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        pg.psql("SELECT pg_switch_wal()")
        wait_for(
            lambda: _index(s.job, segment) in _keys(target),
            90,
            what=f"{segment} stored by the daemon: {daemon.logs()[-2000:]}",
        )
        # a commit with no segment switch reaches the store as the growing segment's
        # copy (replaced every few seconds), twice so the replace path runs
        for batch in ("B-marker-c41e", "C-marker-c41e"):
            pg.psql(
                "SET synchronous_commit = on; "
                f"INSERT INTO objd_rows SELECT '{batch}' FROM generate_series(1, 10)"
            )
            growing = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
            mark = s.base / f"mark-{batch}"

            def has(batch: str = batch, growing: str = growing, mark: Path = mark) -> bool:
                got = s.cli("wal-fetch", "-c", str(s.config), s.job, growing, str(mark))
                return got.returncode == 0 and batch.encode() in mark.read_bytes()

            wait_for(has, 60, interval=1.0, what=f"batch {batch} in {growing}.partial")
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.logs(), daemon.logs()[-3000:]
    port, data_dir = _restore_latest(s, "latest")
    try:
        got = query(
            port,
            "SELECT string_agg(batch || count, ',') FROM "
            "(SELECT batch, count(*) FROM objd_rows GROUP BY 1 ORDER BY 1) s",
        )
        assert got == "A100,B-marker-c41e10,C-marker-c41e10"
    finally:
        stop_server(data_dir)
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.psql(f"SELECT pg_drop_replication_slot('{slot}')")
