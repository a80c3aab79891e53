"""Issue 5 acceptance: `backupd verify` proves a backup intact and, with `--restore`,
restorable into a scratch database whose row counts match those recorded at backup time."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import run_cli, wrapped_bin_dir, write_config
from tests.pgcluster import PG_BIN, PgCluster, free_port, wait_for


def _scratch_databases(pg: PgCluster) -> list[str]:
    out = pg.psql("SELECT datname FROM pg_database WHERE datname LIKE 'backupd_verify_%'")
    return out.split()


def _config(tmp_path: Path, pg: PgCluster, db: str, password_file: Path, **kwargs: object) -> Path:
    extra_job = f'verify = {{ target = "{pg.dsn("postgres")}" }}\n' + str(
        kwargs.pop("extra_job", "")
    )
    return write_config(
        tmp_path / "backupd.toml",
        pg,
        password_file=password_file,
        database=db,
        fs_path=tmp_path / "store",
        extra_job=extra_job,
        **kwargs,  # type: ignore[arg-type]
    )


def _backup(cfg: Path) -> dict:  # type: ignore[type-arg]
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    listed = run_cli("list", "app", "-c", str(cfg), "--json")
    return json.loads(listed.stdout)[0]  # type: ignore[no-any-return]


def _verify(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", "app", "-c", str(cfg), *args)


def test_a_good_backup_verifies_in_both_backends(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    pg_password_file: Path,
    s3_server: str,
    s3_bucket: str,
) -> None:
    cfg = _config(tmp_path, pg, sample_db, pg_password_file, s3=(s3_server, s3_bucket))
    manifest = _backup(cfg)
    (obj,) = manifest["objects"]
    for storage in ("local", "offsite"):
        out = _verify(cfg, "--storage", storage)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith(f"backup {manifest['stem']} of job app in storage {storage}")
        assert lines[1] == (
            f"ok: {obj['key']}: {obj['size_bytes']} bytes, SHA-256 matches; decoded to "
            f"{obj['raw_bytes']} bytes; archive read whole by pg_restore"
        )
        assert lines[-1] == "verified: ok"


@pytest.mark.slow
def test_damage_to_a_stored_backup_fails_verify_with_its_reason(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    cfg = _config(tmp_path, pg, sample_db, pg_password_file)
    manifest = _backup(cfg)
    (obj,) = manifest["objects"]
    folder_key = "app/" + manifest["started_at"][:10].replace("-", "/") + "/"
    folder = tmp_path / "store" / folder_key
    data_file = folder / obj["key"]
    manifest_file = folder / f"{manifest['stem']}.manifest.json"
    good_data, good_manifest = data_file.read_bytes(), manifest_file.read_text()

    flipped = bytearray(good_data)
    flipped[len(flipped) // 2] ^= 0x01
    edited = json.loads(good_manifest)
    edited["objects"][0]["sha256"] = "0" * 64
    damages = [
        ("flipped byte", lambda: data_file.write_bytes(bytes(flipped)), "SHA-256 mismatch"),
        (
            "truncated",
            lambda: data_file.write_bytes(good_data[:-100]),
            f"size mismatch (truncated): the stored object is {obj['size_bytes'] - 100} bytes, "
            f"the manifest says {obj['size_bytes']}",
        ),
        (
            "missing",
            data_file.unlink,
            f"data object {folder_key}{obj['key']} is missing from storage local",
        ),
        (
            "manifest sha256 edited",
            lambda: manifest_file.write_text(json.dumps(edited)),
            f"SHA-256 mismatch: the stored bytes hash to {obj['sha256']}, the manifest says "
            + "0" * 64,
        ),
    ]
    for what, damage, reason in damages:
        damage()
        out = _verify(cfg)
        assert out.returncode == 1, (what, out.stdout, out.stderr)
        failed = [line for line in out.stdout.splitlines() if line.startswith("FAILED")]
        assert failed and reason in failed[0], (what, out.stdout)
        assert out.stdout.splitlines()[-1] == "verified: FAILED"
        data_file.write_bytes(good_data)
        manifest_file.write_text(good_manifest)
    assert _verify(cfg).returncode == 0


def test_restore_drill_compares_row_counts_and_drops_the_scratch_database(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    cfg = _config(tmp_path, pg, sample_db, pg_password_file)
    manifest = _backup(cfg)
    assert manifest["tables"][sample_db] == pg.row_counts(sample_db)
    assert manifest["tool"]["snapshot"] == "exported"

    out = _verify(cfg, "--restore")
    assert out.returncode == 0, out.stdout + out.stderr
    total = sum(pg.row_counts(sample_db).values())
    assert f"{sample_db}: restored into backupd_verify_{manifest['id']}_0_" in out.stdout
    assert f"4 tables, {total} rows; row counts match those recorded at backup time" in out.stdout
    assert "smoke query answered by all 4 tables" in out.stdout
    assert _scratch_databases(pg) == []

    # The same backup with one recorded count altered: the drill fails naming the table,
    # and the scratch database is dropped all the same.
    manifest_file = next((tmp_path / "store").rglob("*.manifest.json"))
    edited = json.loads(manifest_file.read_text())
    edited["tables"][sample_db]["public.orders"] += 1
    manifest_file.write_text(json.dumps(edited))
    out = _verify(cfg, "--restore")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "public.orders: restored 5000 rows, the backup recorded 5001" in out.stdout
    assert _scratch_databases(pg) == []


def test_recorded_counts_are_those_of_the_dump_even_under_writes(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    """Rows inserted after backupd counted but before pg_dump starts are in neither."""
    bindir = wrapped_bin_dir(
        tmp_path / "bin",
        f'"{PG_BIN}/psql" -X -q -d "{pg.dsn(sample_db)}" '
        '-c "INSERT INTO audit_log (payload) SELECT md5(g::text) FROM generate_series(1, 7) g"\n'
        'exec "$REAL" "$@"',
    )
    cfg = _config(tmp_path, pg, sample_db, pg_password_file, extra_source={"pg_bin_dir": bindir})
    manifest = _backup(cfg)
    assert manifest["tables"][sample_db]["public.audit_log"] == 2000
    assert pg.row_counts(sample_db)["public.audit_log"] == 2007
    out = _verify(cfg, "--restore")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "row counts match those recorded at backup time" in out.stdout


def test_restore_drill_needs_a_target(
    tmp_path: Path, config_file: ConfigFile, sample_db: str
) -> None:
    cfg = config_file(sample_db, path=tmp_path / "backupd.toml")
    _backup(cfg)
    out = _verify(cfg, "--restore")
    assert out.returncode == 2
    assert 'verify = { target = "DSN" }' in out.stderr


def test_plain_dumps_verify_and_restore(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    cfg = _config(
        tmp_path,
        pg,
        sample_db,
        pg_password_file,
        extra_job='format = "plain"\ncompression = "gzip:6"\n',
    )
    _backup(cfg)
    out = _verify(cfg, "--restore")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "plain SQL" in out.stdout
    assert "row counts match those recorded at backup time" in out.stdout
    assert _scratch_databases(pg) == []


class _Hook(BaseHTTPRequestHandler):
    """Records each webhook POST body."""

    posts: queue.Queue[dict[str, Any]]

    def do_POST(self) -> None:
        self.posts.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[int, queue.Queue[dict[str, Any]]]]:
    posts: queue.Queue[dict[str, Any]] = queue.Queue()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Hook,), {"posts": posts}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], posts
    server.shutdown()
    server.server_close()
    thread.join(5)


def _verify_metric(port: int, job: str, result: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "backupd_last_verify_timestamp_seconds" and sample.labels == {
                "job": job,
                "result": result,
            }:
                return float(sample.value)
    return None


def test_scheduled_verification_sets_the_metric_and_notifies_failures(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    hook: tuple[int, queue.Queue[dict[str, Any]]],
) -> None:
    hook_port, posts = hook
    http_port = free_port()
    schedule = 'verify = { schedule = "*/2 * * * * *", restore = false }\n'
    cfg = config_file(
        sample_db,
        path=tmp_path / "backupd.toml",
        http_listen=f"127.0.0.1:{http_port}",
        extra_job=schedule,
        extra=(
            f'[job.damaged]\nsource = "main"\nstorage = ["local"]\n{schedule}notify = ["hook"]\n'
            f'[notify.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:{hook_port}/hook"\n'
            'on = ["failure"]\n'
        ),
    )
    for job in ("app", "damaged"):
        assert run_cli("backup", job, "-c", str(cfg)).returncode == 0
    damaged = next((tmp_path / "store" / "damaged").rglob("*.dump.zst"))
    damaged.write_bytes(damaged.read_bytes()[:-1])

    started = time.time()
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        ok = wait_for(lambda: _verify_metric(http_port, "app", "success"), 30, what="a verify")
        assert ok >= started - 1
        failed = wait_for(
            lambda: _verify_metric(http_port, "damaged", "failure"), 30, what="a failed verify"
        )
        assert failed >= started - 1
        assert _verify_metric(http_port, "app", "failure") is None
        body = posts.get(timeout=15)
        assert body["event"] == "failure" and body["job"] == "damaged"
        assert body["trigger"] == "verify"
        assert "size mismatch (truncated)" in body["error"]
    finally:
        daemon.stop()


@pytest.mark.slow
def test_restore_download_and_verify_give_the_same_reason_for_damage(
    tmp_path: Path, pg: PgCluster, sample_db: str, pg_password_file: Path
) -> None:
    """One read-back path: a damaged object fails all three with one wording, and
    restore creates nothing, download writes nothing."""
    cfg = _config(tmp_path, pg, sample_db, pg_password_file)
    manifest = _backup(cfg)
    (obj,) = manifest["objects"]
    data_file = next((tmp_path / "store").rglob(obj["key"]))
    good = data_file.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01
    new_db = f"s15_{manifest['id']}"
    damages = [
        (bytes(flipped), "SHA-256 mismatch: the stored bytes hash to "),
        (
            good[:-100],
            f"size mismatch (truncated): the stored object is {obj['size_bytes'] - 100} bytes, "
            f"the manifest says {obj['size_bytes']}",
        ),
    ]
    for damaged, reason in damages:
        data_file.write_bytes(damaged)
        verify = _verify(cfg)
        restore = run_cli(
            "restore", "app", "-c", str(cfg), "--to", pg.dsn(new_db), "--create",
            env={"PGPASSWORD": pg.password},
        )  # fmt: skip
        out = tmp_path / "out.dump"
        download = run_cli("download", "app", "-c", str(cfg), "-o", str(out))
        assert reason in verify.stdout, verify.stdout
        for cli in (restore, download):
            assert cli.returncode == 1, cli.stdout + cli.stderr
            assert reason in cli.stderr, cli.stderr
            assert "Traceback" not in cli.stderr
        assert not list(tmp_path.glob("*out.dump*"))
        assert new_db not in pg.psql("SELECT datname FROM pg_database").split()
    data_file.write_bytes(good)
