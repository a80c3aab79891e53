"""Test helpers: config files, running the CLI, wrapped pg_dump binaries."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from backupd.catalog.manifest import FailedDatabase, Manifest, new_backup_id, rfc3339, stem_for
from backupd.config.model import Config, Job
from backupd.daemon.runner import Runner, StorePool
from backupd.observe.metrics import Metrics
from backupd.operations.backup import Trigger
from backupd.operations.prune import prune_after_success
from backupd.storage import RetrySettings
from backupd.storage.base import Store
from tests import configs
from tests.pgcluster import PG_BIN, PgCluster

BACKUPD = [sys.executable, "-m", "backupd"]


def no_wait_retry(attempts: int = 3, timeout: float = 60.0) -> RetrySettings:
    """The one way tests switch off storage backoff: the same retries, without their waits
    (a test never sleeps for backoff). The runner's own waits: `Runner(sleep=...)`;
    stamina's (notifications): the `no_backoff` fixture in conftest."""
    return RetrySettings(
        attempts=attempts, timeout=timeout, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0
    )


def write_config(path: Path, pg: PgCluster, **keys: Any) -> Path:
    """`configs.app_config` written to `path`, its control socket in `path`'s folder."""
    return configs.write(
        path, configs.app_config(pg, socket=path.parent / "run" / "control.sock", **keys)
    )


def moto_client(endpoint: str) -> Any:
    """A boto3 S3 client for the moto server at `endpoint`, with the tests' credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BACKUPD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input.decode() if input is not None else None,
    )


def restore_to(
    cfg: Path, pg: PgCluster, database: str, *args: str, job: str = "app"
) -> subprocess.CompletedProcess[str]:
    """`backupd restore JOB --to` the database `database` of `pg`, with its password."""
    to = pg.dsn(database)
    return run_cli(
        "restore", job, "-c", str(cfg), "--to", to, *args, env={"PGPASSWORD": pg.password}
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def wrapped_bin_dir(base: Path, body: str) -> Path:
    """A pg_bin_dir whose pg_dump runs `body` (bash; $REAL is the real pg_dump).

    `--version` always answers like the real one, so version selection works.
    Every invocation's argv and the names of its PG* variables are appended to
    `calls.log` in the directory.
    """
    base.mkdir(parents=True, exist_ok=True)
    script = base / "pg_dump"
    script.write_text(
        "#!/bin/bash\n"
        f'REAL="{PG_BIN}/pg_dump"\n'
        'if [ "$1" = "--version" ]; then exec "$REAL" --version; fi\n'
        f'echo "ARGV: $*" >> "{base}/calls.log"\n'
        f'env | grep -E "^PG" >> "{base}/calls.log"\n'
        f'[ -n "$PGPASSFILE" ] && cat "$PGPASSFILE" > "{base}/passfile.copy" && '
        f'stat -L -c %a "$PGPASSFILE" > "{base}/passfile.mode"\n' + body + "\n"
    )
    script.chmod(0o755)
    for tool in ("pg_dumpall", "pg_restore", "psql"):
        link = base / tool
        if not link.exists():
            link.symlink_to(PG_BIN / tool)
    return base


# 200,000 rows of md5 text: about 21 MB as an uncompressed custom dump, five 5 MiB parts.
BIG_SQL = """
CREATE TABLE blobs (id serial PRIMARY KEY, a text, b text, c text);
INSERT INTO blobs (a, b, c)
  SELECT md5(g::text), md5((g * 7)::text), md5((g * 13)::text)
  FROM generate_series(1, 200000) g;
"""

BIG_TABLE_SQL = """
CREATE TABLE blobs (id serial PRIMARY KEY, a text, b text, c text);
INSERT INTO blobs (a, b, c)
  SELECT md5(random()::text), md5(random()::text), md5(random()::text)
  FROM generate_series(1, 120000);
"""


def restamp(
    root: Path,
    manifest: Manifest,
    started: datetime,
    *,
    databases: set[str] | None = None,
    failed: tuple[FailedDatabase, ...] = (),
) -> Manifest:
    """A copy of `manifest` (and of its data) in a filesystem store, as if a run had
    started at `started`; only `databases` of it, and `failed` recorded, if given."""
    backup_id = new_backup_id()
    stem = stem_for(manifest.job, started, backup_id)
    pairs = [
        (o, replace(o, key=f"{stem}/{o.key.rsplit('/', 1)[-1]}"))
        for o in manifest.objects
        if databases is None or o.database in databases
    ]
    copy = replace(
        manifest,
        id=backup_id,
        started_at=rfc3339(started),
        finished_at=rfc3339(started + timedelta(seconds=manifest.duration_seconds)),
        objects=tuple(new for _, new in pairs),
        failed=failed,
    )
    for old, new in pairs:
        target = root / copy.object_key(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / manifest.object_key(old), target)
    (root / copy.manifest_key).parent.mkdir(parents=True, exist_ok=True)
    (root / copy.manifest_key).write_bytes(copy.to_json())
    return copy


async def runs_with_prune(config: Config, n: int, metrics: Metrics | None = None) -> list[str]:
    """`n` successful runs of job app, each followed by its prune; their stems, oldest first."""

    async def after(
        config: Config, job: Job, manifest: Manifest, stores: Mapping[str, Store]
    ) -> None:
        await prune_after_success(config, job, manifest, stores, metrics=metrics)

    pool = StorePool()
    runner = Runner(config, pool, after_success=after)
    stems = []
    try:
        for _ in range(n):
            run = await runner.wait(runner.submit("app", Trigger()))
            assert run.state == "success", run.error
            assert run.backup is not None
            stems.append(run.backup)
    finally:
        await pool.aclose()
    return stems
