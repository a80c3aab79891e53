"""Issue 6 acceptance: secrets stay secret, files stay private, old clients are flagged.

The leak scans use markers that exist nowhere else: a PostgreSQL role made
for the test (with `pg_read_all_data`, as the README recommends, instead of a
superuser) whose password is random, and a random S3 secret key served from a
file. A wrapped pg_dump snapshots every process's argv and environment while
the dump runs, so "never in argv" is checked on the live system.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog

from backupd.config.file import load_config
from backupd.config.model import Secret
from backupd.daemon.runner import StorePool
from backupd.errors import SecretError
from backupd.operations.backup import Trigger, run_backup
from backupd.sources.postgres import cve_2024_7348_fix
from tests import configs
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import BACKUPD, run_cli, wrapped_bin_dir, write_config
from tests.pgcluster import PG_BIN, PgCluster, free_port, wait_for

S3_SECRET_LINE = 'secret_access_key = { env = "BACKUPD_TEST_AWS_SECRET" }'


def _private_file(path: Path, value: str, mode: int = 0o600) -> Path:
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


# --- secret references -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602])
def test_a_secret_file_others_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = _private_file(tmp_path / "pg-main", "hunter2-value", mode)
    with pytest.raises(SecretError) as info:
        Secret(file=str(path)).resolve()
    message = str(info.value)
    assert f"secret file {path} is accessible by group or others (mode {mode:04o})" in message
    assert f"chmod 600 {path}" in message
    assert "hunter2-value" not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_secret_file_is_read_without_its_newline(tmp_path: Path, mode: int) -> None:
    path = _private_file(tmp_path / "pg-main", "hunter2-value", mode)
    assert Secret(file=str(path)).resolve() == "hunter2-value"


def test_missing_or_empty_secrets_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BACKUPD_TEST_NO_SUCH_VAR", raising=False)
    with pytest.raises(SecretError, match="secret environment variable BACKUPD_TEST_NO_SUCH_VAR"):
        Secret(env="BACKUPD_TEST_NO_SUCH_VAR").resolve()
    with pytest.raises(SecretError, match=f"secret file {tmp_path}/absent: No such file"):
        Secret(file=str(tmp_path / "absent")).resolve()
    empty = _private_file(tmp_path / "empty", "")
    with pytest.raises(SecretError, match=f"secret file {empty} is empty"):
        Secret(file=str(empty)).resolve()


def test_a_relative_secret_file_is_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    _private_file(creds / "pg-main", "from-credentials", 0o400)
    # Never the working directory: a file of the same name there is not read.
    monkeypatch.chdir(tmp_path)
    _private_file(tmp_path / "pg-main", "from-cwd")

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SecretError, match=r"relative path and \$CREDENTIALS_DIRECTORY is not set"):
        Secret(file="pg-main").resolve()

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert Secret(file="pg-main").resolve() == "from-credentials"
    with pytest.raises(SecretError, match=f"secret file {creds}/s3-secret: No such file"):
        Secret(file="s3-secret").resolve()


def test_backup_reads_the_password_from_credentials_directory(
    tmp_path: Path, pg: PgCluster, sample_db: str
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    _private_file(creds / "pg-main", pg.password, 0o400)
    cfg = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=Path("pg-main"),
        database=sample_db,
        fs_path=tmp_path / "store",
    )
    out = run_cli("backup", "app", "-c", str(cfg), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert out.returncode == 0, out.stderr
    assert len(json.loads(run_cli("list", "-c", str(cfg), "--json").stdout)) == 1


@pytest.mark.parametrize("connect", [[], ["--connect"]])
def test_check_refuses_a_group_readable_password_file(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    pg_password_file: Path,
    config_file: ConfigFile,
    connect: list[str],
) -> None:
    pg_password_file.chmod(0o640)
    cfg = config_file(sample_db)
    out = run_cli("check", *connect, "-c", str(cfg))
    assert out.returncode == 2
    assert (
        f"source.main.password: secret file {pg_password_file} is accessible by group or others"
        in out.stderr
    )
    assert f"chmod 600 {pg_password_file}" in out.stderr
    assert pg.password not in out.stdout + out.stderr


def _check_password(
    tmp_path: Path,
    pg: PgCluster,
    database: str,
    ref: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`backupd check` of a config whose source password is `ref` (a TOML inline table)."""
    cfg = write_config(
        tmp_path / "b.toml",
        pg,
        password_file=Path("placeholder"),
        database=database,
        fs_path=tmp_path / "store",
    )
    configs.edit(cfg, {"source.main.password": tomllib.loads(f"ref = {ref}")["ref"]})
    return run_cli("check", "-c", str(cfg), env=env, timeout=timeout)


@pytest.mark.parametrize(
    "case", ["absent", "directory", "fifo", "through a file", "credential absent in the service"]
)
def test_check_fails_on_a_secret_file_that_cannot_be_read_here(
    tmp_path: Path, pg: PgCluster, case: str
) -> None:
    """Issue 12 finding 8: `{ file = "/run/secrets/typo" }` is a mistake, not another
    environment's secret: exit 2 with the key path and the reason."""
    env = {}
    if case == "absent":
        path = str(tmp_path / "secrets" / "typo")
        reason = "No such file or directory"
    elif case == "directory":
        path = str(tmp_path / "secrets")
        Path(path).mkdir(mode=0o700)
        reason = "is a directory"
    elif case == "fifo":
        path = str(tmp_path / "pipe")
        os.mkfifo(path, 0o600)  # opening it for reading would wait for a writer
        reason = "is not a regular file"
    elif case == "through a file":
        inner = _private_file(tmp_path / "pg-main", "hunter2-value")
        path = f"{inner}/typo"
        reason = "Not a directory"
    else:
        creds = tmp_path / "credentials"  # systemd made it, without this credential
        creds.mkdir(mode=0o700)
        env["CREDENTIALS_DIRECTORY"] = str(creds)
        path = "pg-main"
        reason = f"{creds}/pg-main: No such file or directory"
    out = _check_password(tmp_path, pg, "postgres", f'{{ file = "{path}" }}', env, timeout=20)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "source.main.password: secret file " in out.stderr
    assert reason in out.stderr
    assert "ok" not in out.stdout
    assert "not checked here" not in out.stderr
    assert "hunter2-value" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("ref", "noted"),
    [
        ('{ env = "BACKUPD_TEST_UNSET_SECRET" }', "secret environment variable"),
        ('{ file = "pg-main" }', "CREDENTIALS_DIRECTORY is not set"),
        (
            f'{{ file = "/run/credentials/backupd-test-{uuid.uuid4().hex[:8]}.service/pg-main" }}',
            "a systemd credential, readable only by its service",
        ),
    ],
)
def test_check_leaves_secrets_of_the_service_environment_unchecked(
    tmp_path: Path, pg: PgCluster, ref: str, noted: str
) -> None:
    assert "CREDENTIALS_DIRECTORY" not in os.environ  # check runs by hand, outside the service
    out = _check_password(tmp_path, pg, "postgres", ref)
    assert out.returncode == 0, out.stderr
    assert "ok (1 jobs" in out.stdout
    assert "not checked here: source.main.password: " in out.stderr
    assert noted in out.stderr


# --- no secret anywhere ------------------------------------------------------------------


@dataclass(frozen=True)
class Markers:
    """A backup role whose password, and an S3 secret key, appear nowhere else."""

    role: PgCluster  # the cluster seen as the backup role
    pg_password: str
    pg_password_file: Path
    s3_secret: str
    s3_secret_file: Path

    def assert_absent(self, text: str, where: str) -> None:
        assert self.pg_password not in text, f"the PostgreSQL password leaked into {where}"
        assert self.s3_secret not in text, f"the S3 secret key leaked into {where}"


@pytest.fixture
def markers(tmp_path: Path, pg: PgCluster) -> Iterator[Markers]:
    name = "backup_" + uuid.uuid4().hex[:8]
    password = "pgpw-" + uuid.uuid4().hex
    pg.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'; GRANT pg_read_all_data TO {name}")
    s3_secret = "s3sk-" + uuid.uuid4().hex
    yield Markers(
        role=replace(pg, user=name, password=password),
        pg_password=password,
        pg_password_file=_private_file(tmp_path / "pg-password", password),
        s3_secret=s3_secret,
        s3_secret_file=_private_file(tmp_path / "s3-secret", s3_secret),
    )
    pg.psql(f"DROP ROLE {name}")


def _config_with_markers(
    tmp_path: Path,
    markers: Markers,
    database: str,
    s3: tuple[str, str],
    bindir: Path,
    extra_daemon: str = "",
    http_listen: str = "",
) -> Path:
    cfg = write_config(
        tmp_path / "b.toml",
        markers.role,
        password_file=markers.pg_password_file,
        database=database,
        fs_path=tmp_path / "store",
        s3=s3,
        extra_source={"pg_bin_dir": bindir},
        extra_job={"globals": True},
        extra_daemon=extra_daemon,
        http_listen=http_listen,
    )
    text = cfg.read_text()
    assert S3_SECRET_LINE in text
    secret = {"file": str(markers.s3_secret_file)}
    return configs.edit(cfg, {"storage.offsite.secret_access_key": secret})


def _proc_snapshot_bin(base: Path) -> Path:
    """A pg_dump that records every process's argv and environment, then dumps."""
    return wrapped_bin_dir(
        base,
        "for p in /proc/[0-9]*; do\n"
        '  tr "\\0" " " < "$p/cmdline" 2>/dev/null; echo\n'
        '  tr "\\0" "\\n" < "$p/environ" 2>/dev/null\n'
        f'done >> "{base}/proc.txt"\n'
        'exec "$REAL" "$@"',
    )


def _stored_manifests(fs: Path, s3_client: Any, bucket: str) -> str:
    texts = [p.read_text() for p in fs.rglob("*.manifest.json")]
    for obj in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
        if obj["Key"].endswith(".manifest.json"):
            texts.append(
                s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            )
    return "\n".join(texts)


def test_no_secret_in_argv_environment_logs_or_manifests_at_debug_level(
    tmp_path: Path,
    markers: Markers,
    sample_db: str,
    s3_server: str,
    s3_bucket: str,
    s3_client: Any,
) -> None:
    bindir = _proc_snapshot_bin(tmp_path / "bin")
    cfg = _config_with_markers(tmp_path, markers, sample_db, (s3_server, s3_bucket), bindir)
    out = run_cli("--log-level", "debug", "backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr

    # Both secrets were used: pg_dump got the password (in its 0600 passfile), S3 got the data.
    assert markers.pg_password in (bindir / "passfile.copy").read_text()
    manifests = _stored_manifests(tmp_path / "store", s3_client, s3_bucket)
    assert manifests.count('"format_version"') == 2

    snapshot = (bindir / "proc.txt").read_text(errors="replace")
    assert f"--dbname=user='{markers.role.user}' " in snapshot  # pg_dump itself was seen
    markers.assert_absent(snapshot, "a process's argv or environment")
    markers.assert_absent((bindir / "calls.log").read_text(), "pg_dump's argv or PG* variables")
    markers.assert_absent(out.stdout + out.stderr, "the debug-level output")
    assert "botocore" not in out.stderr  # its debug output carries request headers
    markers.assert_absent(manifests, "a manifest")
    listed = run_cli("list", "-c", str(cfg), "--json")
    markers.assert_absent(listed.stdout + listed.stderr, "list --json")


@pytest.mark.slow
def test_errors_and_tracebacks_at_debug_level_carry_no_secret(
    tmp_path: Path,
    markers: Markers,
    sample_db: str,
    s3_server: str,
    s3_bucket: str,
) -> None:
    bindir = _proc_snapshot_bin(tmp_path / "bin")
    cfg = _config_with_markers(tmp_path, markers, sample_db, (s3_server, s3_bucket), bindir)
    assert run_cli("backup", "app", "-c", str(cfg)).returncode == 0

    # A storage failure in the middle of a run (the bucket is gone).
    broken = tmp_path / "broken.toml"
    broken.write_text(cfg.read_text())
    configs.edit(broken, {"storage.offsite.bucket": "no-such-bucket-" + uuid.uuid4().hex[:8]})
    failed = run_cli("--log-level", "debug", "backup", "app", "-c", str(broken))
    assert failed.returncode == 1
    # A failing command whose error is logged with its traceback at debug level.
    restore = run_cli(
        "--log-level",
        "debug",
        "restore",
        "app",
        "-c",
        str(cfg),
        "--storage",
        "offsite",
        "--globals",
        "--to",
        markers.role.dsn("postgres"),
        "--create",
    )
    assert restore.returncode == 2
    assert "Traceback" in restore.stderr
    # The password in the target DSN is refused, without echoing it.
    leaky = run_cli(
        "restore",
        "app",
        "-c",
        str(cfg),
        "--to",
        markers.role.dsn(sample_db, with_password=True),
    )
    assert leaky.returncode == 2
    assert "the --to DSN contains a password" in leaky.stderr
    for out in (failed, restore, leaky):
        markers.assert_absent(out.stdout + out.stderr, f"the output of {out.args[3:5]}")


def test_a_dsn_with_a_password_is_refused_by_check_without_echoing_it(
    tmp_path: Path, pg: PgCluster
) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        f'[source.main]\ntype = "postgres"\ndsn = "{pg.dsn(with_password=True)}"\n'
        f'[storage.local]\ntype = "filesystem"\npath = "{tmp_path}/store"\n'
        '[job.app]\nsource = "main"\nstorage = ["local"]\n'
    )
    out = run_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "source.main.dsn: the DSN contains a password" in out.stderr
    assert pg.password not in out.stdout + out.stderr


def test_check_show_prints_references_never_values(tmp_path: Path, markers: Markers) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        '[source.main]\ntype = "postgres"\ndsn = "postgresql://backup@db1/app"\n'
        f'password = {{ file = "{markers.pg_password_file}" }}\n'
        '[storage.offsite]\ntype = "s3"\nbucket = "b"\n'
        'access_key_id = { env = "BACKUPD_TEST_KEY_ID" }\n'
        f'secret_access_key = {{ file = "{markers.s3_secret_file}" }}\n'
        '[notify.hook]\ntype = "webhook"\nurl = { env = "BACKUPD_TEST_HOOK" }\n'
    )
    hook = "https://hooks.example/" + uuid.uuid4().hex
    out = run_cli(
        "check",
        "--show",
        "-c",
        str(cfg),
        env={"BACKUPD_TEST_KEY_ID": "AKIA", "BACKUPD_TEST_HOOK": hook},
    )
    assert out.returncode == 0, out.stderr
    shown = tomllib.loads(out.stdout)
    assert shown["source"]["main"]["password"] == {"file": str(markers.pg_password_file)}
    s3 = shown["storage"]["offsite"]
    assert s3["access_key_id"] == {"env": "BACKUPD_TEST_KEY_ID"}
    assert s3["secret_access_key"] == {"file": str(markers.s3_secret_file)}
    assert shown["notify"]["hook"]["url"] == {"env": "BACKUPD_TEST_HOOK"}
    markers.assert_absent(out.stdout + out.stderr, "check --show")
    assert hook not in out.stdout


# --- private files -----------------------------------------------------------------------


def _modes(root: Path) -> tuple[set[int], set[int]]:
    """The permission bits of every directory (root included) and of every file under root."""
    dirs = {stat.S_IMODE(root.stat().st_mode)}
    files: set[int] = set()
    for path in root.rglob("*"):
        (dirs if path.is_dir() else files).add(stat.S_IMODE(path.stat().st_mode))
    return dirs, files


def _under_umask_000(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", 'umask 000 && exec "$@"', "umask0", *BACKUPD, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_files_and_directories_are_private_even_under_umask_000(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    store = tmp_path / "backups" / "store"  # backupd creates both levels
    cfg = config_file(sample_db, fs_path=store, extra_job={"globals": True})
    out = _under_umask_000("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    dirs, files = _modes(tmp_path / "backups")
    assert dirs == {0o700} and files == {0o600}
    assert len(list(store.rglob("*.manifest.json"))) == 1

    dump = tmp_path / "out" / "app.dump"
    dump.parent.mkdir(mode=0o755)
    os.chmod(dump.parent, 0o755)
    out = _under_umask_000("download", "app", "-c", str(cfg), "-o", str(dump))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600


# --- the daemon --------------------------------------------------------------------------


def _socket_exchange(path: Path, request: dict) -> str:  # type: ignore[type-arg]
    """Send one request; return every reply line up to the final one (which has "ok")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while True:
            block = sock.recv(65536)
            if not block:
                break
            data += block
            lines = data.decode().splitlines()
            if data.endswith(b"\n") and "ok" in json.loads(lines[-1]):
                break
    return data.decode()


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[str]]]:
    """A local webhook receiver: its base URL, and the paths POSTed to it."""
    received: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_the_daemon_keeps_secrets_out_of_logs_metrics_socket_and_argv(
    tmp_path: Path,
    markers: Markers,
    sample_db: str,
    s3_server: str,
    s3_bucket: str,
    s3_client: Any,
    webhook: tuple[str, list[str]],
) -> None:
    port = free_port()
    bindir = _proc_snapshot_bin(tmp_path / "bin")
    cfg = _config_with_markers(
        tmp_path,
        markers,
        sample_db,
        (s3_server, s3_bucket),
        bindir,
        extra_daemon={"log_level": "debug"},
        http_listen=f"127.0.0.1:{port}",
    )
    # A third secret: the webhook URL's token, from a file.
    token = "hooktoken-" + uuid.uuid4().hex
    url_file = _private_file(tmp_path / "webhook-url", f"{webhook[0]}/hook/{token}")
    hook = {"type": "webhook", "url": {"file": str(url_file)}, "on": ["success"]}
    configs.edit(cfg, {"job.app.notify": ["hook"], "notify": {"hook": hook}})
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
    old_umask = os.umask(0)  # the daemon inherits it, and must not rely on it
    try:
        daemon.start()
    finally:
        os.umask(old_umask)
    try:
        sock = tmp_path / "run" / "control.sock"
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        replies = _socket_exchange(sock, {"cmd": "trigger", "job": "app", "wait": True})
        assert json.loads(replies.splitlines()[-1])["ok"] is True, replies
        replies += _socket_exchange(sock, {"cmd": "status"})
        replies += _socket_exchange(sock, {"cmd": "history", "job": "app", "limit": 5})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'backupd_job_runs_total{job="app",result="success"} 1.0' in metrics
        # The notification is sent, and logged at debug level, in the background.
        wait_for(lambda: '"notify_sent"' in daemon.logs(), 30, what="the webhook to be sent")
    finally:
        daemon.stop()
    assert webhook[1] == [f"/hook/{token}"]
    logs = daemon.logs()
    assert '"level": "debug"' in logs
    for text, where in [
        (replies, "a socket reply"),
        (metrics, "/metrics"),
        (logs, "the daemon's debug-level log"),
        ((bindir / "proc.txt").read_text(errors="replace"), "argv or environ"),
        (_stored_manifests(tmp_path / "store", s3_client, s3_bucket), "manifests"),
    ]:
        markers.assert_absent(text, where)
        assert token not in text, f"the webhook token leaked into {where}"
    dirs, files = _modes(tmp_path / "store")
    assert dirs == {0o700} and files == {0o600}


# --- CVE-2024-7348: pg_dump client version -------------------------------------------------


@pytest.mark.parametrize(
    ("version", "fixed_in"),
    [
        ("15.2", "15.8"),
        ("15.7", "15.8"),
        ("15.8", None),
        ("15.20", None),
        ("12.19", "12.20"),
        ("12.20", None),
        ("13.15", "13.16"),
        ("13.16", None),
        ("14.12", "14.13"),
        ("14.13", None),
        ("16.3", "16.4"),
        ("16.4", None),
        ("16beta2", "16.4"),
        ("17.0", None),
        ("17beta1", None),
        ("18.1", None),
        ("11.22", "a supported major release (12.20, 13.16, 14.13, 15.8, 16.4, or 17 and later)"),
        ("9.6", "a supported major release (12.20, 13.16, 14.13, 15.8, 16.4, or 17 and later)"),
    ],
)
def test_cve_2024_7348_fixed_releases(version: str, fixed_in: str | None) -> None:
    assert cve_2024_7348_fix(version) == fixed_in


async def test_an_outdated_pg_dump_is_warned_once_per_run(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "pg_dump").write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 15.2"; exit 0; fi\n'
        f'exec "{PG_BIN}/pg_dump" "$@"\n'
    )
    (bindir / "pg_dump").chmod(0o755)
    cfg = config_file(sample_db, extra_source={"pg_bin_dir": bindir})
    config = load_config(cfg)
    job, source = config.jobs["app"], config.sources["main"]
    pool = StorePool()
    try:
        stores = await pool.for_job(config, job)
        with structlog.testing.capture_logs() as first:
            await run_backup(job, source, stores, trigger=Trigger(), attempt=1)
        with structlog.testing.capture_logs() as retry:
            await run_backup(job, source, stores, trigger=Trigger(), attempt=2)
    finally:
        await pool.aclose()
    warnings = [e for e in first if e["event"] == "pg_dump_outdated"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["version"] == "15.2" and warnings[0]["fixed_in"] == "15.8"
    assert warnings[0]["cve"] == "CVE-2024-7348"
    assert not [e for e in retry if e["event"] == "pg_dump_outdated"]


async def test_a_current_pg_dump_is_not_warned_about(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    cfg = config_file(sample_db, extra_source={"pg_bin_dir": PG_BIN})
    config = load_config(cfg)
    job = config.jobs["app"]
    pool = StorePool()
    try:
        with structlog.testing.capture_logs() as events:
            manifest = await run_backup(
                job, config.sources["main"], await pool.for_job(config, job), trigger=Trigger()
            )
    finally:
        await pool.aclose()
    assert cve_2024_7348_fix(manifest.tool["version"]) is None  # the installed client is current
    assert "pg_dump_outdated" not in [e["event"] for e in events]


def test_check_notes_secrets_absent_here_and_connect_needs_them(
    tmp_path: Path, sample_db: str, config_file: ConfigFile
) -> None:
    """`check` by hand lacks the service's environment: absent secrets are noted, not errors;
    `check --connect` must reach the sources, so there they are errors."""
    cfg = config_file(sample_db)
    configs.edit(cfg, {"source.main.password": {"env": "BACKUPD_TEST_UNSET_SECRET"}})
    out = run_cli("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "not checked here: source.main.password: secret environment variable" in out.stderr
    out = run_cli("check", "--connect", "-c", str(cfg))
    assert out.returncode == 2
    assert (
        "source.main.password: secret environment variable BACKUPD_TEST_UNSET_SECRET" in out.stderr
    )
