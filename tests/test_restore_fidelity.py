# ruff: noqa: E501  (the SQL of the fidelity database reads best unwrapped)
"""Restore fidelity (issue 13): what backupd restores is what `pg_dump -Fc | pg_restore` restores.

Each database is backed up with backupd (filesystem or moto S3, custom or plain,
encrypted), restored with `restore --create`, and compared with a baseline made by
plain `pg_dump -Fc | pg_restore` on the same server: `pg_dump --schema-only
--create` and `--data-only` of both must be identical (database names aside).

The PostgreSQL regression database is built once (scripts/regression-build.sh,
then `make installcheck-parallel` against a throwaway cluster) and cached under
var/cache/ as a custom archive, so repeated runs are quick.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cli, write_config
from tests.pgcluster import PG_BIN, PgCluster, make_cluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BACKUPD_TEST_CACHE", ROOT / "var" / "cache"))

OWN_SQL = r"""
CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION pg_trgm; CREATE EXTENSION cube;
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (l text, r cube);
CREATE SCHEMA "Odd ""q"" Schema";
CREATE TABLE "Odd ""q"" Schema"."Tåble with spaces" (id posint PRIMARY KEY, "Ünïcode col" citext,
    attrs hstore, p pair);
INSERT INTO "Odd ""q"" Schema"."Tåble with spaces"
  SELECT g, 'Välue ' || g, hstore('k', g::text), ROW('x' || g, cube(g))::pair FROM generate_series(1, 300) g;
CREATE TABLE measurements (id bigint, at date NOT NULL, v numeric) PARTITION BY RANGE (at);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO measurements SELECT g, '2025-06-01'::date + (g % 400), g / 7.0 FROM generate_series(1, 2000) g;
CREATE TABLE blobs (id int PRIMARY KEY, data bytea, obj oid);
INSERT INTO blobs SELECT 1, decode(string_agg(md5(g::text), ''), 'hex'), lo_from_bytea(0, 'large object one')
  FROM generate_series(1, 200000) g;
INSERT INTO blobs VALUES (2, '\x00ff', lo_from_bytea(0, decode(repeat('ab', 100000), 'hex')));
CREATE INDEX trgm_idx ON "Odd ""q"" Schema"."Tåble with spaces" USING gin ("Ünïcode col" gin_trgm_ops);
CREATE VIEW v1 AS SELECT id, "Ünïcode col" FROM "Odd ""q"" Schema"."Tåble with spaces";
CREATE VIEW v2 AS SELECT count(*) AS n FROM v1;
CREATE MATERIALIZED VIEW mv AS SELECT at, sum(v) FROM measurements GROUP BY at;
CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql AS $$ SELECT x + 1 $$;
GRANT SELECT ON v2 TO {reader};
GRANT USAGE ON SCHEMA "Odd ""q"" Schema" TO {reader};
"""


def _pg_dump(pg: PgCluster, database: str, *args: str) -> str:
    out = subprocess.run(
        [str(PG_BIN / "pg_dump"), *args, "-d", pg.dsn(database)],
        env=pg.env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    keep = (
        line.replace(database, "DB")
        for line in out.splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped"))
    )
    return "\n".join(keep)


def _baseline(pg: PgCluster, source: str) -> str:
    """`pg_dump -Fc | pg_restore -C` into a new database: what a restore should give."""
    name = "base_" + uuid.uuid4().hex[:8]
    dump = subprocess.run(
        [str(PG_BIN / "pg_dump"), "-Fc", "--create", "-d", pg.dsn(source)],
        env=pg.env(),
        check=True,
        capture_output=True,
    ).stdout
    pg.createdb(name)
    t0 = time.monotonic()
    subprocess.run(
        [str(PG_BIN / "pg_restore"), "--exit-on-error", "-d", pg.dsn(name)],
        input=dump,
        env=pg.env(),
        check=True,
        capture_output=True,
    )
    print(
        f"baseline pg_dump -Fc | pg_restore of {source}: restored in {time.monotonic() - t0:.2f}s"
    )
    # pg_restore without -C: the database-level properties, as -C would set them
    comment = pg.psql(
        f"SELECT quote_literal(shobj_description(oid, 'pg_database')) FROM pg_database "
        f"WHERE datname = '{source}'"
    )
    if comment:
        pg.psql(f'COMMENT ON DATABASE "{name}" IS {comment}')
    for setting in pg.psql(
        "SELECT unnest(setconfig) FROM pg_db_role_setting s JOIN pg_database d "
        f"ON d.oid = s.setdatabase WHERE d.datname = '{source}' AND s.setrole = 0"
    ).splitlines():
        key, value = setting.split("=", 1)
        pg.psql(f"ALTER DATABASE \"{name}\" SET {key} = '{value}'")
    grants = pg.psql(
        "SELECT format('GRANT %s ON DATABASE %I TO %I', a.privilege_type, "
        f"'{name}', r.rolname) FROM pg_database d, aclexplode(d.datacl) a "
        "JOIN pg_roles r ON r.oid = a.grantee "
        f"WHERE d.datname = '{source}' AND a.grantee <> d.datdba"
    )
    for grant in grants.splitlines():
        pg.psql(grant)
    return name


def _compare(pg: PgCluster, restored: str, baseline: str) -> None:
    for args in (("--schema-only", "--create"), ("--data-only",)):
        got, want = _pg_dump(pg, restored, *args), _pg_dump(pg, baseline, *args)
        assert got == want, f"pg_dump {' '.join(args)} differs from the baseline"


@pytest.fixture
def own_db(pg: PgCluster) -> Iterator[str]:
    name = "own_" + uuid.uuid4().hex[:8]
    reader = "regress_reader_" + uuid.uuid4().hex[:6]
    pg.psql(f"CREATE ROLE {reader}")
    pg.createdb(name)
    pg.psql(OWN_SQL.replace("{reader}", reader), name)
    pg.psql(f"COMMENT ON DATABASE \"{name}\" IS 'own database, ''quoted'''")
    pg.psql(f"ALTER DATABASE \"{name}\" SET work_mem = '5MB'")
    pg.psql(f'GRANT CONNECT ON DATABASE "{name}" TO {reader}')
    yield name
    pg.dropdb(name)
    pg.psql(f"DROP OWNED BY {reader}; DROP ROLE {reader}")


def _round_trip(
    tmp_path: Path,
    pg: PgCluster,
    password_file: Path,
    source: str,
    fmt: str,
    where: str,
    s3: tuple[str, str] | None,
    keyfile: Path,
) -> tuple[float, str]:
    recipient = subprocess.run(
        ["age-keygen", "-y", str(keyfile)], check=True, capture_output=True, text=True
    ).stdout.strip()
    cfg = write_config(
        tmp_path / f"{fmt}-{where}.toml",
        pg,
        password_file=password_file,
        database=source,
        fs_path=tmp_path / "store" if where == "fs" else None,
        s3=s3 if where == "s3" else None,
        extra_job=f'format = "{fmt}"\nencryption = {{ recipients = ["{recipient}"] }}\n',
    )
    out = run_cli("backup", "app", "-c", str(cfg), timeout=600)
    assert out.returncode == 0, out.stderr
    restored = "rst_" + uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    out = run_cli(
        "restore",
        "app",
        "-c",
        str(cfg),
        "--to",
        pg.dsn(restored),
        "--create",
        "--identity",
        str(keyfile),
        env={"PGPASSWORD": pg.password},
        timeout=600,
    )
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    return took, restored


@pytest.fixture
def age_key(tmp_path: Path) -> Path:
    path = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    return path


@pytest.mark.parametrize(
    ("fmt", "where"), [("custom", "fs"), ("custom", "s3"), ("plain", "fs"), ("plain", "s3")]
)
@pytest.mark.timeout(600)
def test_own_database_round_trips_like_pg_restore(
    tmp_path: Path,
    pg: PgCluster,
    pg_password_file: Path,
    own_db: str,
    s3_server: str,
    s3_bucket: str,
    age_key: Path,
    fmt: str,
    where: str,
) -> None:
    baseline = _baseline(pg, own_db)
    took, restored = _round_trip(
        tmp_path, pg, pg_password_file, own_db, fmt, where, (s3_server, s3_bucket), age_key
    )
    try:
        _compare(pg, restored, baseline)
        print(f"own database {fmt}/{where}/age: restored in {took:.2f}s")
    finally:
        pg.dropdb(restored)
        pg.dropdb(baseline)


@pytest.fixture(scope="session")
def regression_archive() -> Path:
    """The `regression` database of `make installcheck-parallel`, as a cached custom archive."""
    archive = CACHE / "regression-15.dump"
    if archive.exists():
        return archive
    if shutil.which("bison") is None or shutil.which("dpkg-source") is None:
        pytest.skip("the regression database needs `make deps-system` (build tools, deb-src)")
    build = CACHE / "pg-regress"
    subprocess.run([str(ROOT / "scripts" / "regression-build.sh"), str(build)], check=True)
    src = next(build.glob("postgresql-15-*/"))
    base = Path(tempfile.mkdtemp(prefix="backupd-regress-"))
    os.chmod(base, 0o755)  # the cluster belongs to the postgres user when run as root
    cluster = make_cluster(base / "cluster")
    try:
        # Not an outer make's MAKELEVEL/MAKEFLAGS (CI runs this suite from `make`).
        outer_make = {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}
        env = {
            **{k: v for k, v in os.environ.items() if k not in outer_make},
            "PGHOST": "127.0.0.1",
            "PGPORT": str(cluster.port),
            "PGUSER": cluster.user,
            "PGPASSWORD": cluster.password,
        }
        # A few of the 217 tests depend on the machine (locale, timing): their
        # failures do not matter, the database they leave behind does.
        subprocess.run(
            [
                "make",
                "-C",
                str(src / "src/test/regress"),
                "installcheck-parallel",
                f"bindir={PG_BIN}",
                "MAXCONNOPT=--max-connections=4",
            ],
            env=env,
            check=False,
            capture_output=True,
            timeout=1800,
        )
        tmp = archive.with_suffix(".partial")
        subprocess.run(
            [
                str(PG_BIN / "pg_dump"),
                "-Fc",
                "--create",
                "-d",
                cluster.dsn("regression"),
                "-f",
                str(tmp),
            ],
            env=cluster.env(),
            check=True,
        )
        tmp.rename(archive)
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
    return archive


@pytest.mark.timeout(1800)
def test_regression_database_round_trips_like_pg_restore(
    tmp_path: Path,
    pg: PgCluster,
    pg_password_file: Path,
    regression_archive: Path,
    s3_server: str,
    s3_bucket: str,
    age_key: Path,
) -> None:
    source = "regression_" + uuid.uuid4().hex[:6]
    pg.createdb(source)
    # Loaded without owners and grants: the session cluster lacks the regress_* roles.
    subprocess.run(
        [
            str(PG_BIN / "pg_restore"),
            "--no-owner",
            "--no-privileges",
            "-d",
            pg.dsn(source),
            str(regression_archive),
        ],
        env=pg.env(),
        check=False,
        capture_output=True,
    )
    baseline = _baseline(pg, source)
    made = [source, baseline]
    try:
        for fmt, where in (("custom", "fs"), ("plain", "s3")):
            took, restored = _round_trip(
                tmp_path, pg, pg_password_file, source, fmt, where, (s3_server, s3_bucket), age_key
            )
            made.append(restored)
            _compare(pg, restored, baseline)
            print(f"regression {fmt}/{where}/age: restored in {took:.2f}s")
    finally:
        for name in made:
            pg.dropdb(name)
