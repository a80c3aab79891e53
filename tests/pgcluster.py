"""A throwaway PostgreSQL cluster made with initdb, for tests and benchmarks.

initdb refuses to run as root, so when the tests run as root the cluster
belongs to the `postgres` (or `nobody`) user. It listens on a free loopback
TCP port with scram-sha-256 password authentication, and on a Unix socket in
its own directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("BACKUPD_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
PASSWORD = "s3cr3t-Test-Pw-9f2c"  # tests assert this string never leaks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _owner() -> tuple[str, int, int] | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, pw.pw_uid, pw.pw_gid
    raise RuntimeError("running as root and no postgres/nobody user to own the cluster")


@dataclass
class PgCluster:
    base: Path
    port: int
    user: str = SUPERUSER
    password: str = PASSWORD

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    def dsn(
        self, database: str = "postgres", with_password: bool = False, port: int | None = None
    ) -> str:
        """The cluster's DSN; `port` points it elsewhere (a proxy, a port nobody listens on)."""
        auth = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql://{auth}@127.0.0.1:{port or self.port}/{database}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        owner = _owner()
        if owner is None:
            return argv
        return ["setpriv", f"--reuid={owner[1]}", f"--regid={owner[2]}", "--clear-groups", *argv]

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        owner = _owner()
        if owner is not None:
            for p in (self.base, self.sockdir, pwfile):
                os.chown(p, owner[1], owner[2])
            os.chmod(self.base, 0o755)
        subprocess.run(
            self._as_owner(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    self.user,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.sockdir}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
            )

    def start(self) -> None:
        subprocess.run(
            self._as_owner(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.base / "log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            self._as_owner(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]
            ),
            check=False,
            capture_output=True,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password}

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(database),
                "-c",
                sql,
            ],
            env=self.env(),
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def createdb(self, name: str) -> None:
        self.psql(f'CREATE DATABASE "{name}"')

    def dropdb(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def row_counts(self, database: str) -> dict[str, int]:
        tables = self.psql(
            "SELECT schemaname||'.'||tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog','information_schema') ORDER BY 1",
            database,
        ).split()
        return {t: int(self.psql(f"SELECT count(*) FROM {t}", database)) for t in tables}

    def schema(self, database: str) -> str:
        out = subprocess.run(
            [str(PG_BIN / "pg_dump"), "--schema-only", "--no-owner", "-d", self.dsn(database)],
            env=self.env(),
            check=True,
            capture_output=True,
            text=True,
        )
        return "\n".join(
            line
            for line in out.stdout.splitlines()
            # \restrict carries a random key per dump (CVE-2025-8714 fix)
            if line and not line.startswith(("--", "\\restrict", "\\unrestrict"))
        )


SAMPLE_SQL = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int REFERENCES customers(id),
                     total numeric(10,2), placed_at timestamptz DEFAULT now());
CREATE TABLE audit_log (id bigserial PRIMARY KEY, payload text);
CREATE SCHEMA reporting;
CREATE TABLE reporting.daily (day date PRIMARY KEY, revenue numeric);
INSERT INTO customers (name, email)
  SELECT 'customer ' || g, 'c' || g || '@example.test' FROM generate_series(1, 500) g;
INSERT INTO orders (customer_id, total)
  SELECT 1 + (g % 500), (g % 997) / 10.0 FROM generate_series(1, 5000) g;
INSERT INTO audit_log (payload) SELECT md5(g::text) FROM generate_series(1, 2000) g;
INSERT INTO reporting.daily
  SELECT d::date, 100 FROM generate_series('2026-01-01'::date, '2026-01-31', '1 day') d;
CREATE INDEX orders_customer ON orders (customer_id);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 50;
"""


def make_cluster(base: Path) -> PgCluster:
    if base.exists():
        shutil.rmtree(base)
    cluster = PgCluster(base=base, port=free_port())
    cluster.init()
    cluster.start()
    return cluster


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def temp_cluster(prefix: str) -> Iterator[PgCluster]:
    """A cluster of its own in a new temporary folder, stopped and removed afterwards
    (`yield from` it in a fixture)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)  # the cluster belongs to the postgres user when run as root
    cluster = make_cluster(base / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def scratch_database(pg: PgCluster, sql: str, prefix: str) -> Iterator[str]:
    """A new database filled by `sql`, dropped afterwards (`yield from` it in a fixture)."""
    name = prefix + uuid.uuid4().hex[:8]
    pg.createdb(name)
    pg.psql(sql, name)
    yield name
    pg.dropdb(name)
