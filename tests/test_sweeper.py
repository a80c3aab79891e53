"""Issue 5 acceptance: the sweeper removes what a crash left behind, once older than
`abandoned_upload_grace`, and never a complete backup, a run in progress or a stranger's file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import tomllib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from backupd.catalog.listing import list_backups
from backupd.catalog.manifest import now_utc
from backupd.config.file import load_config
from backupd.daemon.maintenance import Maintenance, sweep
from backupd.daemon.runner import Runner, StorePool
from backupd.observe.metrics import Metrics
from backupd.operations.backup import Trigger, run_backup
from tests import configs
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import wrapped_bin_dir, write_config
from tests.pgcluster import PgCluster, wait_for

# Leftovers in backupd's layout, of a job "app" and of a job "busy".
ORPHAN = "app/2026/01/02/app-20260102T030405Z-0badf00d/app.dump.zst"
NEW_ORPHAN = "app/2026/01/03/app-20260103T030405Z-0ddba11a/app.dump.zst"
BUSY_ORPHAN = "busy/2026/01/02/busy-20260102T030405Z-00c0ffee/app.dump.zst"
STRANGER = "other-tool/archive.bin"  # not backupd's: never touched


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _with_grace(cfg: Path, fs: Path, grace: str) -> Path:
    """Set `abandoned_upload_grace` of the filesystem storage at `fs`."""
    (name,) = [
        n for n, t in tomllib.loads(cfg.read_text())["storage"].items() if t["path"] == str(fs)
    ]
    return configs.edit(cfg, {f"storage.{name}.abandoned_upload_grace": grace})


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _s3_keys(s3_client: Any, bucket: str) -> set[str]:
    contents = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"].removeprefix("prod/") for o in contents}


def _s3_uploads(s3_client: Any, bucket: str) -> set[str]:
    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["Key"].removeprefix("prod/") for u in uploads}


async def test_filesystem_sweep_removes_old_leftovers_only(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    fs = tmp_path / "store"
    cfg = write_config(
        tmp_path / "b.toml", pg, password_file=pg_password_file, database=sample_db, fs_path=fs
    )
    config = load_config(cfg)
    pool = StorePool()
    try:
        store = await pool.get(config.storages["local"])
        backup = await run_backup(
            config.jobs["app"], config.sources["main"], {"local": store}, trigger=Trigger()
        )
        complete = _files(fs)
        for key in (ORPHAN, NEW_ORPHAN, BUSY_ORPHAN, STRANGER):
            await store.put_bytes(key, b"leftover bytes")
        # What a crash mid-upload leaves: the temporary file next to the final name.
        partial = fs / "app/2026/01/02/app-20260102T030405Z-0badf00d/.app.dump.zst.partial-1a2b"
        partial.write_bytes(b"half an upload")
        for path in fs.rglob("*"):  # an hour old, the complete backup included
            if path.is_file():
                _age(path, 3600)
        _age(fs / NEW_ORPHAN, 0)

        result = await sweep(store, grace=1, protect={"busy/"}, now=now_utc())
        assert (result.aborted_uploads, result.deleted_orphans, result.failed) == (1, 1, 0)
        assert _files(fs) == complete | {NEW_ORPHAN, BUSY_ORPHAN, STRANGER}
        assert [m.stem for m in await list_backups(store, "app")] == [backup.stem]
    finally:
        await pool.aclose()


async def test_s3_sweep_aborts_old_multipart_uploads_and_deletes_orphans(
    sample_db: str,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    cfg = config_file(sample_db, fs_path=None, s3=True)
    config = load_config(cfg)
    pool = StorePool()
    try:
        store = await pool.get(config.storages["offsite"])
        backup = await run_backup(
            config.jobs["app"], config.sources["main"], {"offsite": store}, trigger=Trigger()
        )
        complete = _s3_keys(s3_client, s3_bucket)
        for key in (ORPHAN, BUSY_ORPHAN, STRANGER):
            s3_client.put_object(Bucket=s3_bucket, Key="prod/" + key, Body=b"leftover bytes")
        for key in (NEW_ORPHAN, BUSY_ORPHAN, STRANGER):  # uploads started, never completed
            s3_client.create_multipart_upload(Bucket=s3_bucket, Key="prod/" + key)

        # The orphans are younger than the grace: they stay. moto reports every multipart
        # upload as started in 2010 (S3 reports the real time), so app's upload is old already;
        # busy's (a run in progress) and the stranger's are never aborted.
        first = await sweep(store, grace=60, protect={"busy/"}, now=now_utc())
        assert (first.aborted_uploads, first.deleted_orphans, first.failed) == (1, 0, 0)
        assert _s3_uploads(s3_client, s3_bucket) == {BUSY_ORPHAN, STRANGER}
        assert _s3_keys(s3_client, s3_bucket) == complete | {ORPHAN, BUSY_ORPHAN, STRANGER}

        # Two minutes on: the old leftovers of app go; busy's, the stranger's and the backup stay.
        later = await sweep(
            store, grace=60, protect={"busy/"}, now=now_utc() + timedelta(minutes=2)
        )
        assert (later.aborted_uploads, later.deleted_orphans, later.failed) == (0, 1, 0)
        assert _s3_uploads(s3_client, s3_bucket) == {BUSY_ORPHAN, STRANGER}
        assert _s3_keys(s3_client, s3_bucket) == complete | {BUSY_ORPHAN, STRANGER}
        assert [m.stem for m in await list_backups(store, "app")] == [backup.stem]
    finally:
        await pool.aclose()


async def test_sweeper_never_touches_the_folder_of_a_run_in_progress(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    marker = uuid.uuid4().hex
    # pg_dump writes its output, then the wrapper holds stdout open: the upload stays open.
    bindir = wrapped_bin_dir(tmp_path / "bin", f'"$REAL" "$@"\nexec -a hold-{marker} sleep 300')
    fs = tmp_path / "store"
    cfg = config_file(sample_db, extra_source={"pg_bin_dir": bindir})
    config = load_config(_with_grace(cfg, fs, "1s"))
    assert config.storages["local"].abandoned_upload_grace == 1
    pool = StorePool()
    runner = Runner(config, pool)
    maintenance = Maintenance(runner, pool, Metrics())
    try:
        store = await pool.get(config.storages["local"])
        await store.put_bytes(ORPHAN.replace("app", "gone"), b"leftover of another job")
        run = runner.submit("app", Trigger())
        partials = await asyncio.to_thread(
            wait_for,
            lambda: [p for p in fs.rglob(".*") if ".partial-" in p.name],
            30,
            what="the run's upload to start",
        )
        await asyncio.to_thread(
            wait_for,
            lambda: subprocess.run(["pgrep", "-f", f"hold-{marker}"], capture_output=True).stdout,
            30,
            what="pg_dump to finish writing",
        )
        await maintenance.sweep_all(config, now=now_utc() + timedelta(hours=1))
        assert all(p.exists() for p in partials)  # the run's upload survives
        assert not (fs / ORPHAN.replace("app", "gone")).exists()  # the sweep did run
        runner.cancel(run.run_id)
        await runner.wait(run)
        assert run.state == "cancelled"
        assert not any(p.exists() for p in partials)
    finally:
        await pool.aclose()


def test_daemon_sweeps_at_start(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    fs = tmp_path / "store"
    cfg = write_config(
        tmp_path / "b.toml", pg, password_file=pg_password_file, database=sample_db, fs_path=fs
    )
    _with_grace(cfg, fs, "1s")
    orphan = fs / ORPHAN
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash")
    _age(orphan, 60)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: not orphan.exists(), 30, what="the start-up sweep")
        done = [e for e in daemon.events() if e.get("event") == "sweep_done"]
        assert done and done[0]["deleted_orphans"] == 1
    finally:
        daemon.stop()
