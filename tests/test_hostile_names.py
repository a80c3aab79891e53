"""Database names are hostile input (issue 12, findings 1 and 7; issue 13, finding 4).

With `databases = ["*"]` any role with CREATEDB chooses names that backupd
passes to libpq. These tests run `backupd backup` against a cluster of their
own (every database in it is backed up) and check that each name reaches the
server as itself, that the password goes nowhere else, and that one database
that cannot be dumped does not stop the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import configs
from tests.fakepg import fake_postgres
from tests.helpers import run_cli, write_config
from tests.pgcluster import PG_BIN, PgCluster, make_cluster, temp_cluster


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgCluster]:
    """A cluster for this module alone: `databases = ["*"]` sees only what these tests made."""
    yield from temp_cluster("backupd-hostile-")


def conninfo(pg: PgCluster, database: str) -> str:
    """The test's own keyword=value quoting (independent of backupd's)."""
    quoted = database.replace("\\", "\\\\").replace("'", "\\'")
    return f"host=127.0.0.1 port={pg.port} user={pg.user} dbname='{quoted}'"


def psql(pg: PgCluster, sql: str, database: str = "postgres") -> str:
    out = subprocess.run(
        [str(PG_BIN / "psql"), "-X", "-q", "-At", "-d", conninfo(pg, database), "-c", sql],
        env=pg.env(),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def marker(name: str) -> str:
    return "row-of-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def make_database(pg: PgCluster, name: str) -> None:
    """A database holding one row that only it has."""
    psql(pg, f"CREATE DATABASE {ident(name)}")
    psql(pg, f"CREATE TABLE t (v text); INSERT INTO t VALUES ({literal(marker(name))})", name)


def config(tmp_path: Path, pg: PgCluster, extra_job: str, name: str = "b.toml") -> Path:
    password_file = tmp_path / "pg-password"
    password_file.write_text(pg.password + "\n")
    password_file.chmod(0o600)
    return write_config(
        tmp_path / name,
        pg,
        password_file=password_file,
        database="postgres",
        fs_path=tmp_path / "store",
        extra_job=extra_job,
    )


def backups(cfg: Path) -> list[dict[str, Any]]:
    out = run_cli("list", "app", "-c", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def downloaded(cfg: Path, tmp_path: Path, database: str, backup: str = "latest") -> str:
    target = tmp_path / f"download-{hashlib.sha256(database.encode()).hexdigest()[:12]}.sql"
    target.unlink(missing_ok=True)
    out = run_cli(
        "download", "app", "-c", str(cfg), "--backup", backup, "--database", database,
        "-o", str(target),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    if target.read_bytes().startswith(b"PGDMP"):  # custom format: as SQL
        return subprocess.run(
            [str(PG_BIN / "pg_restore"), "-f", "-", str(target)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return target.read_text()


def test_a_database_name_cannot_send_the_password_to_another_server(
    own_pg: PgCluster, tmp_path: Path
) -> None:
    with fake_postgres() as fake:
        evil = f"x?host=127.0.0.1&port={fake.port}&application_name="
        make_database(own_pg, evil)
        try:
            cfg = config(tmp_path, own_pg, 'databases = ["*"]\n')
            out = run_cli("backup", "app", "-c", str(cfg))
            assert out.returncode == 0, out.stderr
            # The attacker's server never saw a connection, let alone the password.
            assert fake.connections == 0
            assert fake.passwords == []
            (manifest,) = backups(cfg)
            assert evil in [o["database"] for o in manifest["objects"]]
            # ...and what was backed up under that name is that database.
            assert marker(evil) in downloaded(cfg, tmp_path, evil)
        finally:
            psql(own_pg, f"DROP DATABASE {ident(evil)}")


def test_a_percent_sign_is_not_decoded_with_a_table_filter(
    own_pg: PgCluster, tmp_path: Path
) -> None:
    make_database(own_pg, "a%41b")
    make_database(own_pg, "aAb")  # what libpq would read "a%41b" as in a URL
    try:
        cfg = config(tmp_path, own_pg, 'databases = ["a%41b"]\ntables = ["t"]\nformat = "plain"\n')
        out = run_cli("backup", "app", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        dump = downloaded(cfg, tmp_path, "a%41b")
        assert marker("a%41b") in dump
        assert marker("aAb") not in dump
    finally:
        psql(own_pg, 'DROP DATABASE "a%41b"')
        psql(own_pg, 'DROP DATABASE "aAb"')


HOSTILE = [
    "it's",
    "back\\slash",
    'dou"ble',
    "sp ace",
    "eq=uals dbname=postgres",
    "postgresql://127.0.0.1/postgres",
    "sl/ash",
    "../../escape",
    "..",
    "%2e%2e",
    "ünïcödé ✓",
    "new\nline",
    "tab\tand:colon",
    "x" * 63,
]


def test_every_name_postgres_allows_is_backed_up_as_itself(
    own_pg: PgCluster, tmp_path: Path
) -> None:
    for name in HOSTILE:
        make_database(own_pg, name)
    try:
        cfg = config(tmp_path, own_pg, 'databases = ["*"]\nformat = "plain"\n')
        out = run_cli("backup", "app", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        (manifest,) = backups(cfg)
        by_name = {o["database"]: o for o in manifest["objects"]}
        assert set(HOSTILE) <= set(by_name)
        stem_dir = tmp_path / "store" / "app"
        for name in HOSTILE:
            key = by_name[name]["key"]
            # one object directly in the backup's folder, whatever the name holds
            assert key.startswith(manifest["stem"] + "/")
            assert "/" not in key[len(manifest["stem"]) + 1 :]
            assert ".." not in key.split("/")
            assert marker(name) in downloaded(cfg, tmp_path, name), name
        assert all(p.resolve().is_relative_to(stem_dir) for p in stem_dir.rglob("*"))
        # template1 accepts connections: it is backed up too (template0 does not)
        assert "template1" in by_name and "template0" not in by_name
    finally:
        for name in HOSTILE:
            psql(own_pg, f"DROP DATABASE IF EXISTS {ident(name)}")


def test_a_user_template_database_is_backed_up(own_pg: PgCluster, tmp_path: Path) -> None:
    make_database(own_pg, "tpl_app")
    psql(own_pg, "ALTER DATABASE tpl_app IS_TEMPLATE true")
    psql(own_pg, "CREATE DATABASE closed")
    psql(own_pg, "ALTER DATABASE closed ALLOW_CONNECTIONS false")
    try:
        cfg = config(tmp_path, own_pg, 'databases = ["*"]\nformat = "plain"\n')
        out = run_cli("backup", "app", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        (manifest,) = backups(cfg)
        names = [o["database"] for o in manifest["objects"]]
        assert "tpl_app" in names and "closed" not in names
        assert marker("tpl_app") in downloaded(cfg, tmp_path, "tpl_app")
        # what was left out is said
        skipped = [
            json.loads(line)
            for line in out.stderr.splitlines()
            if line.startswith("{") and "databases_skipped" in line
        ]
        assert skipped and "closed" in skipped[0]["databases"]
    finally:
        psql(own_pg, "ALTER DATABASE tpl_app IS_TEMPLATE false")
        psql(own_pg, "DROP DATABASE tpl_app")
        psql(own_pg, "DROP DATABASE closed")


def test_an_empty_database_does_not_fail_a_star_job(tmp_path: Path) -> None:
    """A fresh cluster's `postgres` database dumps to ~700 bytes of SQL, below the
    default min_size: with `databases = ["*"]` min_size guards the run's total."""
    base = Path(tempfile.mkdtemp(prefix="backupd-fresh-"))
    os.chmod(base, 0o755)
    fresh = make_cluster(base / "cluster")
    try:
        psql(fresh, "CREATE DATABASE empty_one")
        cfg = config(tmp_path, fresh, 'databases = ["*"]\nformat = "plain"\n')
        out = run_cli("backup", "app", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        (manifest,) = backups(cfg)
        assert {"postgres", "template1", "empty_one"} <= {
            o["database"] for o in manifest["objects"]
        }
    finally:
        fresh.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def reject_database(pg: PgCluster, database: str) -> None:
    """pg_hba.conf refuses every connection to `database` (a permanent, per-database error)."""
    hba = pg.datadir / "pg_hba.conf"
    hba.write_text(f"host {database} all 127.0.0.1/32 reject\n" + hba.read_text())
    subprocess.run(
        pg._as_owner([str(PG_BIN / "pg_ctl"), "-D", str(pg.datadir), "reload"]),
        check=True,
        capture_output=True,
    )


def accept_database(pg: PgCluster, database: str) -> None:
    hba = pg.datadir / "pg_hba.conf"
    lines = hba.read_text().splitlines(keepends=True)
    hba.write_text("".join(line for line in lines if not line.startswith(f"host {database} ")))
    subprocess.run(
        pg._as_owner([str(PG_BIN / "pg_ctl"), "-D", str(pg.datadir), "reload"]),
        check=True,
        capture_output=True,
    )


def test_one_failing_database_does_not_stop_the_others(own_pg: PgCluster, tmp_path: Path) -> None:
    make_database(own_pg, "fine_db")
    make_database(own_pg, "refused_db")
    cfg = config(
        tmp_path, own_pg, 'databases = ["*"]\nformat = "plain"\nretention = { keep_last = 1 }\n'
    )
    try:
        first = run_cli("backup", "app", "-c", str(cfg))
        assert first.returncode == 0, first.stderr
        (complete,) = backups(cfg)

        reject_database(own_pg, "refused_db")
        out = run_cli("backup", "app", "-c", str(cfg))
        # The run fails (alerts fire)...
        assert out.returncode == 1
        assert "refused_db" in out.stderr and "1 of" in out.stderr
        # ...and still publishes every database that could be dumped.
        partial = backups(cfg)[0]
        assert partial["id"] != complete["id"]
        names = [o["database"] for o in partial["objects"]]
        assert "fine_db" in names and "refused_db" not in names
        (failure,) = partial["failed"]
        assert failure["database"] == "refused_db" and "reject" in failure["error"]
        assert marker("fine_db") in downloaded(cfg, tmp_path, "fine_db")

        # Asking the partial backup for what it lacks names the backup that has it.
        missing = run_cli(
            "download", "app", "-c", str(cfg), "--database", "refused_db",
            "-o", str(tmp_path / "x.sql"),
        )  # fmt: skip
        assert missing.returncode == 1
        assert "failed in this run" in missing.stderr
        assert f"newest backup holding it is {complete['stem']}" in missing.stderr

        # keep_last = 1 never deletes the only backup that has refused_db.
        pruned = run_cli("prune", "app", "-c", str(cfg))
        assert pruned.returncode == 0, pruned.stderr
        assert {b["id"] for b in backups(cfg)} == {complete["id"], partial["id"]}
    finally:
        accept_database(own_pg, "refused_db")
        psql(own_pg, "DROP DATABASE fine_db")
        psql(own_pg, "DROP DATABASE refused_db")


def test_keyword_value_dsn_works_at_run_time(own_pg: PgCluster, tmp_path: Path) -> None:
    make_database(own_pg, "kv_db")
    try:
        cfg = config(tmp_path, own_pg, 'format = "plain"\n')
        keyword = f"host=127.0.0.1 port={own_pg.port} user={own_pg.user} dbname=kv_db"
        configs.edit(cfg, {"source.main.dsn": keyword})
        assert keyword in cfg.read_text()
        out = run_cli("backup", "app", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        assert marker("kv_db") in downloaded(cfg, tmp_path, "kv_db")
    finally:
        psql(own_pg, "DROP DATABASE kv_db")
