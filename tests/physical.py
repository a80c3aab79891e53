"""Helpers for physical-backup tests: a replication-ready cluster and backupd run as its owner.

PostgreSQL runs `archive_command` and `restore_command` as the cluster's OS
user, and refuses to start as root; so when the tests run as root, every
`backupd` that touches a physical job runs as that user too (setpriv), with an
interpreter that user can execute and this checkout on PYTHONPATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backupd
from tests import configs
from tests.pgcluster import PASSWORD, PG_BIN, PgCluster, _owner, free_port, wait_for

CHECKOUT = str(Path(backupd.__file__).resolve().parent.parent)
REPL_USER = "backup"
REPL_PASSWORD = "repl-Pw-7c1e-secret"


def _python() -> list[str]:
    """An interpreter the cluster's owner can run, and the PYTHONPATH it needs."""
    if os.geteuid() != 0:
        return [sys.executable]
    own = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    return [own if os.access(own, os.X_OK) else sys.executable]


def pythonpath() -> str:
    return f"{CHECKOUT}:{sysconfig.get_paths()['purelib']}"


def backupd_argv() -> list[str]:
    """`backupd` as the cluster's owner would run it (for archive_command too)."""
    return ["/usr/bin/env", f"PYTHONPATH={pythonpath()}", *_python(), "-m", "backupd"]


def as_owner(argv: list[str]) -> list[str]:
    owner = _owner()
    if owner is None:
        return argv
    return ["setpriv", f"--reuid={owner[1]}", f"--regid={owner[2]}", "--clear-groups", *argv]


def chown_owner(path: Path) -> None:
    owner = _owner()
    if owner is not None:
        os.chown(path, owner[1], owner[2])


def mkdir_owned(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    chown_owner(path)
    return path


@dataclass
class PhysicalSetup:
    pg: PgCluster
    base: Path  # owned by the cluster's user
    config: Path
    store: Path
    job: str = "pitr"

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HOME"] = str(self.base)  # the owner's own, not root's (asyncpg reads ~/.postgresql)
        return subprocess.run(
            as_owner([*backupd_argv(), *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.base,
        )

    def ok(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        out = self.cli(*args, timeout=timeout)
        assert out.returncode == 0, f"backupd {' '.join(args)}: {out.stdout}\n{out.stderr}"
        return out

    def archive_command(self) -> str:
        argv = [*backupd_argv(), "wal-push", "-c", str(self.config), self.job]
        return " ".join(shlex.quote(a) for a in argv) + " %p"

    def use_archive_command(self) -> None:
        cmd = self.archive_command().replace("'", "''")
        self.pg.psql(f"ALTER SYSTEM SET archive_command = '{cmd}'")
        self.pg.psql("SELECT pg_reload_conf()")

    @contextmanager
    def archiving(self) -> Iterator[None]:
        """The cluster archives its WAL with `backupd wal-push` of this job, until the end."""
        self.use_archive_command()
        try:
            yield
        finally:
            self.pg.psql("ALTER SYSTEM SET archive_command = ''")
            self.pg.psql("SELECT pg_reload_conf()")

    def restored(self, name: str) -> Path:
        return self.base / "restores" / name

    def restore(
        self, name: str, *args: str, port: int | None = None, ok: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """`backupd restore` of the job into `restored(name)`; with `port`, started there;
        with `ok`, asserted to succeed (as `ok()` does)."""
        mkdir_owned(self.base / "restores")
        start = ["--start", "--port", str(port)] if port is not None else []
        data_dir = str(self.restored(name))
        argv = ["restore", "-c", str(self.config), self.job, "--data-dir", data_dir]
        return (self.ok if ok else self.cli)(*argv, *args, *start)

    def switch_and_wait_archived(self, timeout: float = 60) -> str:
        """Switch to a new WAL segment and wait until the old one is archived."""
        # pg_switch_wal() returns the end of the segment it closed: that segment's name.
        # (pg_current_wal_lsn() is the *written* position: with synchronous_commit = off
        # it can still be at the previous segment's end.)
        segment = self.pg.psql("SELECT pg_walfile_name(pg_switch_wal())")

        def archived() -> bool:
            row = self.pg.psql(
                "SELECT coalesce(last_archived_wal, ''), failed_count, "
                "coalesce(last_failed_wal, '') FROM pg_stat_archiver"
            )
            last = row.split("|")[0]
            # not "000000010000000000000002.00000028.backup": that one comes first
            return last == segment or last[:24] > segment

        try:
            wait_for(archived, timeout, what=f"{segment} archived")
        except TimeoutError:
            raise AssertionError(f"not archived: {self.archiver_state()}") from None
        return segment

    def archiver_state(self) -> str:
        return self.pg.psql("SELECT * FROM pg_stat_archiver")


def make_physical_cluster(base: Path) -> PgCluster:
    """A cluster ready for physical backups: wal_level replica, walsenders, a REPLICATION
    role (not a superuser), pg_hba replication lines, archive_mode on."""
    if base.exists():
        shutil.rmtree(base)
    cluster = PgCluster(base=base, port=free_port())
    cluster.init()
    with open(cluster.datadir / "postgresql.conf", "a") as f:
        f.write(
            "wal_level = replica\nmax_wal_senders = 10\nmax_replication_slots = 10\n"
            "archive_mode = on\narchive_command = ''\nwal_keep_size = 0\n"
        )
    # initdb's pg_hba already has `host replication all 127.0.0.1/32 scram-sha-256`
    hba = (cluster.datadir / "pg_hba.conf").read_text()
    assert "replication" in hba
    cluster.start()
    cluster.psql(
        f"CREATE ROLE {REPL_USER} LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}'; "
        f"GRANT pg_read_all_settings, pg_read_all_stats TO {REPL_USER}"
    )
    return cluster


def physical_setup(
    pg: PgCluster,
    base: Path,
    *,
    extra_job: Mapping[str, Any] | str = "",
    job: str = "pitr",
    http_listen: str = "",
) -> PhysicalSetup:
    mkdir_owned(base)
    os.chmod(base, 0o755)
    store = mkdir_owned(base / "store")
    mkdir_owned(base / "run")
    secret = base / "repl-password"
    secret.write_text(REPL_PASSWORD + "\n")
    secret.chmod(0o600)
    chown_owner(secret)
    config = base / "backupd.toml"
    extra, tail = configs.split_fragment(extra_job)
    doc = {
        "daemon": {"socket": f"{base}/run/control.sock", "http_listen": http_listen},
        "source": {
            "main": {
                "type": "postgres",
                "dsn": f"host=127.0.0.1 port={pg.port} user={REPL_USER} dbname=postgres",
                "password": {"file": str(secret)},
                "pg_bin_dir": str(PG_BIN),
            }
        },
        "storage": {"local": {"type": "filesystem", "path": str(store)}},
        "job": {
            job: configs.merge(
                {
                    "source": "main",
                    "kind": "physical",
                    "storage": ["local"],
                    "retry": dict(configs.ONE_ATTEMPT),
                },
                extra,
            )
        },
    }
    configs.write(config, configs.merge(doc, tail))
    chown_owner(config)
    return PhysicalSetup(pg=pg, base=base, config=config, store=store, job=job)


def batches(port: int, table: str) -> str:
    """`A100,B20`: the rows of `table` counted by its `batch` column, on the server at `port`."""
    return query(
        port,
        "SELECT string_agg(batch || count, ',') FROM "
        f"(SELECT batch, count(*) FROM {table} GROUP BY 1 ORDER BY 1) s",
    )


def wait_slot_streaming(pg: PgCluster, slot: str, timeout: float, logs: Callable[[], str]) -> None:
    """Until pg_receivewal streams through `slot` (the slot is active); `logs` for the failure."""
    wait_for(
        lambda: (
            pg.psql(
                f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
            )
            == "1"
        ),
        timeout,
        what=f"the slot {slot} streaming: {logs()[-2000:]}",
    )


def temp_base(prefix: str) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def physical_cluster(prefix: str) -> Iterator[PgCluster]:
    """A replication-ready cluster in a temporary directory, for a fixture to yield from."""
    for base in temp_base(prefix):
        cluster = make_physical_cluster(base / "cluster")
        try:
            yield cluster
        finally:
            cluster.stop("immediate")


def stop_server(data_dir: Path) -> None:
    subprocess.run(
        as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"]),
        capture_output=True,
        check=False,
    )


def query(port: int, sql: str, host: str = "127.0.0.1") -> str:
    out = subprocess.run(
        [
            str(PG_BIN / "psql"),
            "-X",
            "-At",
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        env={**os.environ, "PGPASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


class OwnedDaemon:
    """`backupd run` as the cluster's owner; kill -9 and restart at will."""

    def __init__(self, setup: PhysicalSetup) -> None:
        self.setup = setup
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = setup.base / "daemon.log"

    def start(self) -> OwnedDaemon:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HOME"] = str(self.setup.base)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                as_owner([*backupd_argv(), "run", "-c", str(self.setup.config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.setup.base,
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # setpriv execs: this is the daemon itself
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
