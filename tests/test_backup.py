"""Issue 2 acceptance: one streamed backup to S3 and the filesystem, restorable with
standard tools, never half-published, never leaking the password."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import structlog

from backupd.catalog.listing import list_backups
from backupd.config.file import load_config
from backupd.daemon.runner import StorePool
from backupd.operations.backup import Trigger, run_backup
from tests.configs import ConfigFile
from tests.helpers import BIG_TABLE_SQL, run_cli, sha256_file, wrapped_bin_dir
from tests.pgcluster import PG_BIN, PgCluster, scratch_database, wait_for


@pytest.fixture
def big_db(pg: PgCluster):  # type: ignore[no-untyped-def]
    yield from scratch_database(pg, BIG_TABLE_SQL, "big_")


def _fs_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _s3_keys(s3_client, bucket: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def _uploads(s3_client, bucket: str) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    return list(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_backup_to_s3_and_filesystem_restores_with_standard_tools(
    tmp_path: Path,
    config_file: ConfigFile,
    pg: PgCluster,
    sample_db: str,
    s3_bucket: str,
    s3_client,  # type: ignore[no-untyped-def]
) -> None:
    fs = tmp_path / "store"
    cfg = config_file(sample_db, path=tmp_path / "backupd.toml", s3=True)
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr

    listed = run_cli("list", "app", "-c", str(cfg), "--json")
    assert listed.returncode == 0, listed.stderr
    manifests = json.loads(listed.stdout)
    assert len(manifests) == 1
    manifest = manifests[0]
    assert manifest["job"] == "app" and manifest["format_version"] == 1
    assert manifest["trigger"] == "manual" and manifest["attempts"] == 1
    assert manifest["source"]["server_version"].startswith("15")
    (obj,) = manifest["objects"]
    assert obj["database"] == sample_db and obj["key"].endswith(f"/{sample_db}.dump.zst")

    # The S3 object: layout per SPEC, bytes match the manifest, restorable with zstd + pg_restore.
    folder = "prod/app/" + manifest["started_at"][:10].replace("-", "/") + "/"
    keys = _s3_keys(s3_client, s3_bucket)
    assert sorted(keys) == sorted(
        [folder + manifest["stem"] + ".manifest.json", folder + obj["key"]]
    )
    body = s3_client.get_object(Bucket=s3_bucket, Key=folder + obj["key"])["Body"].read()
    assert len(body) == obj["size_bytes"]
    import hashlib

    assert hashlib.sha256(body).hexdigest() == obj["sha256"]
    stored = tmp_path / "from-s3.dump.zst"
    stored.write_bytes(body)
    raw = subprocess.run(["zstd", "-d", "-c", str(stored)], capture_output=True, check=True).stdout
    assert len(raw) == obj["raw_bytes"]
    target = "restored_" + uuid.uuid4().hex[:6]
    pg.createdb(target)
    subprocess.run(
        [str(PG_BIN / "pg_restore"), "--exit-on-error", "-d", pg.dsn(target)],
        input=raw,
        env=pg.env(),
        check=True,
        capture_output=True,
    )
    assert pg.row_counts(target) == pg.row_counts(sample_db)
    assert pg.schema(target) == pg.schema(sample_db)

    # The filesystem copy is the same bytes, with private modes.
    fs_object = fs / "app" / folder.removeprefix("prod/app/") / obj["key"]
    assert sha256_file(fs_object) == obj["sha256"]
    assert fs_object.stat().st_mode & 0o777 == 0o600
    assert fs_object.parent.stat().st_mode & 0o777 == 0o700

    # And through `backupd restore`, from each storage.
    for storage in ("offsite", "local"):
        again = "restored_" + uuid.uuid4().hex[:6]
        pg.createdb(again)
        out = run_cli(
            "restore",
            "app",
            "-c",
            str(cfg),
            "--storage",
            storage,
            "--to",
            pg.dsn(again),
            env={"PGPASSWORD": pg.password},
        )
        assert out.returncode == 0, out.stderr
        assert pg.row_counts(again) == pg.row_counts(sample_db)
        assert pg.schema(again) == pg.schema(sample_db)
        pg.dropdb(again)
    pg.dropdb(target)


def test_download_gives_the_plain_dump(
    tmp_path: Path, pg: PgCluster, sample_db: str, config_file: ConfigFile
) -> None:
    cfg = config_file(sample_db, extra_job='format = "plain"\ncompression = "gzip:6"\n')
    assert run_cli("backup", "app", "-c", str(cfg)).returncode == 0
    out = run_cli("download", "app", "-c", str(cfg), "-o", str(tmp_path / "app.sql"))
    assert out.returncode == 0, out.stderr
    sql = (tmp_path / "app.sql").read_text()
    assert "CREATE TABLE public.customers" in sql
    assert (tmp_path / "app.sql").stat().st_mode & 0o777 == 0o600
    target = "plain_" + uuid.uuid4().hex[:6]
    pg.createdb(target)
    out = run_cli(
        "restore", "app", "-c", str(cfg), "--to", pg.dsn(target), env={"PGPASSWORD": pg.password}
    )
    assert out.returncode == 0, out.stderr
    assert pg.row_counts(target) == pg.row_counts(sample_db)
    pg.dropdb(target)


def test_pg_dump_killed_midway_publishes_nothing(
    tmp_path: Path,
    big_db: str,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client,  # type: ignore[no-untyped-def]
) -> None:
    bindir = wrapped_bin_dir(tmp_path / "bin", '"$REAL" "$@" | head -c 7000000\nkill -9 $$')
    fs = tmp_path / "store"
    cfg = config_file(
        big_db,
        s3=True,
        extra_source={"pg_bin_dir": bindir},
        extra_job={"compression": "none"},
    )
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 1
    assert "pg_dump killed by signal 9" in out.stderr
    assert _s3_keys(s3_client, s3_bucket) == []
    assert _uploads(s3_client, s3_bucket) == []
    assert _fs_files(fs) == []
    assert json.loads(run_cli("list", "-c", str(cfg), "--json").stdout) == []


def test_missing_database_fails_once_with_a_clear_error(
    tmp_path: Path,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client,  # type: ignore[no-untyped-def]
) -> None:
    fs = tmp_path / "store"
    cfg = config_file("no_such_db", s3=True)
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 1
    assert 'database "no_such_db" does not exist' in out.stderr or "no_such_db" in out.stderr
    assert "1 attempt" in out.stderr
    assert _s3_keys(s3_client, s3_bucket) == [] and _uploads(s3_client, s3_bucket) == []
    assert _fs_files(fs) == []


def test_tiny_dump_is_a_failure(tmp_path: Path, sample_db: str, config_file: ConfigFile) -> None:
    bindir = wrapped_bin_dir(tmp_path / "bin", "printf 'PGDMP'\nexit 0")
    fs = tmp_path / "store"
    cfg = config_file(sample_db, extra_source={"pg_bin_dir": bindir})
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 1
    assert "below min_size" in out.stderr
    assert _fs_files(fs) == []


async def test_cancel_mid_upload_aborts_and_kills_pg_dump(
    tmp_path: Path,
    big_db: str,
    config_file: ConfigFile,
    s3_bucket: str,
    s3_client,  # type: ignore[no-untyped-def]
) -> None:
    marker = uuid.uuid4().hex
    # pg_dump writes its data, then the wrapper keeps stdout open as if the dump went on.
    bindir = wrapped_bin_dir(tmp_path / "bin", f'"$REAL" "$@"\nexec -a sleeper-{marker} sleep 300')
    cfg_path = config_file(
        big_db,
        fs_path=None,
        s3=True,
        extra_source={"pg_bin_dir": bindir},
        extra_job={"compression": "none"},
    )
    config = load_config(cfg_path)
    job = config.jobs["app"]
    pool = StorePool()
    try:
        stores = await pool.for_job(config, job)
        task = asyncio.create_task(
            run_backup(job, config.sources["main"], stores, trigger=Trigger())
        )
        await asyncio.to_thread(
            wait_for, lambda: _uploads(s3_client, s3_bucket), 60, what="a multipart upload to start"
        )
        await asyncio.to_thread(
            wait_for, lambda: _pids(f"sleeper-{marker}"), 60, what="pg_dump to finish writing"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await pool.aclose()
    assert _uploads(s3_client, s3_bucket) == []
    assert _s3_keys(s3_client, s3_bucket) == []
    assert _pids(f"sleeper-{marker}") == []


def _pids(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return out.stdout.split()


def test_password_never_in_argv_or_logs(
    tmp_path: Path, pg: PgCluster, sample_db: str, config_file: ConfigFile
) -> None:
    bindir = wrapped_bin_dir(tmp_path / "bin", 'exec "$REAL" "$@"')
    cfg = config_file(sample_db, extra_source={"pg_bin_dir": bindir}, extra_job={"globals": True})
    out = run_cli("--log-level", "debug", "backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    calls = (bindir / "calls.log").read_text()
    assert "ARGV:" in calls and "PGPASSFILE=" in calls
    assert pg.password not in calls
    assert "PGPASSWORD" not in calls
    assert (bindir / "passfile.mode").read_text().strip() == "600"
    assert pg.password in (bindir / "passfile.copy").read_text()  # it did reach pg_dump
    assert pg.password not in out.stdout + out.stderr
    # the passfile never was on a file system: an inherited in-memory file, gone with the run
    passfile = next(line for line in calls.splitlines() if line.startswith("PGPASSFILE="))
    assert passfile.split("=", 1)[1].startswith("/dev/fd/")
    # and it gives the password to the DSN's own host and port only
    assert (bindir / "passfile.copy").read_text().startswith(f"127.0.0.1:{pg.port}:*:*:")
    manifest = json.loads(run_cli("list", "-c", str(cfg), "--json").stdout)[0]
    assert [(o["database"], o["kind"]) for o in manifest["objects"]] == [
        (sample_db, "database"),
        ("", "globals"),
    ]
    assert pg.password not in json.dumps(manifest)


async def test_password_not_in_structlog_events(
    tmp_path: Path, pg: PgCluster, sample_db: str, config_file: ConfigFile
) -> None:
    cfg_path = config_file(sample_db)
    config = load_config(cfg_path)
    job = config.jobs["app"]
    pool = StorePool()
    try:
        with structlog.testing.capture_logs() as events:
            manifest = await run_backup(
                job, config.sources["main"], await pool.for_job(config, job), trigger=Trigger()
            )
        store = await pool.get(config.storages["local"])
        assert [m.stem for m in await list_backups(store, "app")] == [manifest.stem]
    finally:
        await pool.aclose()
    assert events and pg.password not in repr(events)


def test_check_reports_every_error_with_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[source.main]\ntype = "postgres"\ndsn = "postgresql://u@h/db"\n'
        '[storage.local]\ntype = "filesystem"\npath = "/tmp/x"\n'
        '[job.app]\nsource = "main"\nstorage = ["nope"]\nschedule = "61 * * * *"\n'
        'timeout = "soon"\nbogus = 1\n'
    )
    out = run_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    for path in ("job.app.bogus", "job.app.schedule", "job.app.timeout", "job.app.storage"):
        assert path in out.stderr, out.stderr


def test_backup_error_when_secret_file_is_readable_by_others(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path, config_file: ConfigFile
) -> None:
    os.chmod(pg_password_file, 0o644)
    cfg = config_file(sample_db)
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 1
    assert "chmod 600" in out.stderr and pg.password not in out.stderr
