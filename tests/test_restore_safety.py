"""Restore safety (SPEC "Restore safety", issue 13): real backupd subprocesses, a real cluster."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configs import ConfigFile
from tests.helpers import run_cli
from tests.pgcluster import PG_BIN, SAMPLE_SQL, PgCluster


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def dbs(pg: PgCluster) -> Iterator[list[str]]:
    """Databases a test creates: dropped at the end, whatever happened."""
    made: list[str] = []
    yield made
    for name in made:
        pg.dropdb(name)


def _backup(config_file: ConfigFile, database: str, extra_job: str = "") -> Path:
    cfg = config_file(database, extra_job=extra_job)
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    return cfg


def _restore(cfg: Path, pg: PgCluster, *args: str):  # type: ignore[no-untyped-def]
    return run_cli("restore", "app", "-c", str(cfg), *args, env={"PGPASSWORD": pg.password})


@pytest.mark.parametrize(
    ("fmt", "prefix"),
    [
        ("custom", "src"),
        ("plain", "src"),
        pytest.param("custom", "Src Ü", marks=pytest.mark.slow),
        pytest.param("plain", "Src Ü", marks=pytest.mark.slow),
    ],
)
def test_create_makes_the_typed_database_and_never_touches_the_source(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, dbs: list[str], fmt: str, prefix: str
) -> None:
    src, new = _name(prefix), _name("new")
    dbs += [src, new]
    pg.createdb(src)
    pg.psql(SAMPLE_SQL, src)
    pg.psql(f"COMMENT ON DATABASE \"{src}\" IS 'the source''s comment'")
    pg.psql(f"ALTER DATABASE \"{src}\" SET work_mem = '7MB'")
    cfg = _backup(config_file, src, f'format = "{fmt}"\n')
    before = pg.row_counts(src)

    # The old README form (--to the maintenance database): refused, it exists.
    out = _restore(cfg, pg, "--to", pg.dsn("postgres"), "--create")
    assert out.returncode == 2, out.stderr
    assert "already exists" in out.stderr
    # Pointed at the source database itself: refused too.
    out = _restore(cfg, pg, "--to", pg.dsn(src), "--create")
    assert out.returncode == 2, out.stderr
    assert pg.row_counts(src) == before

    out = _restore(cfg, pg, "--to", pg.dsn(new), "--create")
    assert out.returncode == 0, out.stderr
    assert f"created database '{new}'" in out.stdout
    assert pg.row_counts(new) == before
    assert pg.row_counts(src) == before  # nothing went into the source
    # The database-level properties came along, under the new name (finding 5).
    comment = (
        f"SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '{new}'"
    )
    assert pg.psql(comment) == "the source's comment"
    settings = (
        "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s "
        f"JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = '{new}'"
    )
    assert pg.psql(settings) == "work_mem=7MB"
    assert pg.psql(comment.replace(new, src)) == "the source's comment"


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_restore_into_an_existing_database_skips_the_database_entries(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, dbs: list[str], fmt: str
) -> None:
    src, target = _name("src"), _name("tgt")
    dbs += [src, target]
    pg.createdb(src)
    pg.psql(SAMPLE_SQL, src)
    pg.psql(f"COMMENT ON DATABASE \"{src}\" IS 'source'")
    cfg = _backup(config_file, src, f'format = "{fmt}"\n')
    pg.createdb(target)
    out = _restore(cfg, pg, "--to", pg.dsn(target))
    assert out.returncode == 0, out.stderr
    assert pg.row_counts(target) == pg.row_counts(src)
    query = "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '{}'"
    assert pg.psql(query.format(target)) == ""


def test_a_failed_restore_leaves_the_target_as_it_was(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, dbs: list[str]
) -> None:
    src, target = _name("src"), _name("tgt")
    dbs += [src, target]
    pg.createdb(src)
    pg.psql(SAMPLE_SQL, src)
    cfg = _backup(config_file, src)
    pg.createdb(target)
    assert _restore(cfg, pg, "--to", pg.dsn(target)).returncode == 0
    pg.psql("CREATE VIEW customer_names AS SELECT name FROM customers", target)
    # DROP fails (a view depends on it), CREATE fails, COPY used to append anyway.
    out = _restore(cfg, pg, "--to", pg.dsn(target), "--table", "customers", "--clean")
    assert out.returncode == 1
    assert "one transaction" in out.stderr
    assert "1 error(s), the first:" in out.stderr
    assert "depend" in out.stderr
    assert pg.row_counts(target)["public.customers"] == 500


def test_table_patterns_schema_qualified_and_unmatched(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, dbs: list[str]
) -> None:
    src, target = _name("src"), _name("tgt")
    dbs += [src, target]
    pg.createdb(src)
    pg.psql(SAMPLE_SQL, src)
    cfg = _backup(config_file, src)
    pg.createdb(target)
    out = _restore(cfg, pg, "--to", pg.dsn(target), "--table", "public.custmers")
    assert out.returncode == 2
    assert "nothing in the backup matches --table public.custmers" in out.stderr
    assert "public.customers" in out.stderr  # a close match
    assert pg.row_counts(target) == {}
    out = _restore(
        cfg, pg, "--to", pg.dsn(target), "--table", "public.customers", "--schema", "reporting"
    )
    assert out.returncode == 0, out.stderr
    assert pg.row_counts(target) == {"public.customers": 500, "reporting.daily": 31}


def test_a_database_named_globals_and_the_roles_dump_stay_apart(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, dbs: list[str]
) -> None:
    target = _name("tgt")
    dbs += ["globals", target]
    pg.createdb("globals")
    pg.psql(
        "CREATE TABLE only_in_globals_db (id int); INSERT INTO only_in_globals_db VALUES (1)",
        "globals",
    )
    cfg = _backup(config_file, "globals", 'format = "plain"\nglobals = true\n')
    manifest = json.loads(run_cli("list", "-c", str(cfg), "--json").stdout)[0]
    objects = {(o["database"], o["kind"]): o["key"] for o in manifest["objects"]}
    assert set(objects) == {("globals", "database"), ("", "globals")}
    assert len(set(objects.values())) == 2  # two distinct stored objects
    pg.createdb(target)
    out = _restore(cfg, pg, "--database", "globals", "--to", pg.dsn(target))
    assert out.returncode == 0, out.stderr
    assert pg.row_counts(target) == {"public.only_in_globals_db": 1}
    out = _restore(cfg, pg, "--globals", "--to", pg.dsn(target))
    assert out.returncode == 0, out.stderr
    assert "existing roles, left as they are: postgres" in out.stdout


def test_globals_into_a_cluster_with_existing_roles(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, sample_db: str
) -> None:
    tag = uuid.uuid4().hex[:6]
    kept, lost = f"regress_kept_{tag}", f"regress_lost_{tag}"
    pg.psql(f"CREATE ROLE {kept} LOGIN; CREATE ROLE {lost} NOLOGIN")
    pg.psql(f"GRANT {kept} TO {lost}; ALTER ROLE {lost} SET work_mem = '3MB'")
    try:
        cfg = _backup(config_file, sample_db, "globals = true\n")
        pg.psql(f"DROP ROLE {lost}")
        out = _restore(cfg, pg, "--globals", "--to", pg.dsn("postgres"))
        assert out.returncode == 0, out.stderr
        assert f"created roles: {lost}" in out.stdout
        assert kept in out.stdout.split("existing roles, left as they are:")[1]
        member = f"SELECT pg_has_role('{lost}', '{kept}', 'MEMBER')"
        assert pg.psql(member) == "t"
        settings = (
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s "
            f"JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = '{lost}'"
        )
        assert pg.psql(settings) == "work_mem=3MB"
    finally:
        pg.psql(f"DROP ROLE IF EXISTS {lost}; DROP ROLE IF EXISTS {kept}")


def test_verify_restore_counts_rows_of_user_defined_types(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, dbs: list[str]
) -> None:
    src = _name("src")
    dbs.append(src)
    pg.createdb(src)
    pg.psql(
        "CREATE EXTENSION cube; CREATE TYPE boxed AS (c cube);"
        "CREATE TABLE shapes (id int, b boxed); INSERT INTO shapes VALUES (1, ROW('(1,2)'))",
        src,
    )
    cfg = _backup(config_file, src, f'verify = {{ target = "{pg.dsn("postgres")}" }}\n')
    out = run_cli("verify", "app", "-c", str(cfg), "--restore")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "smoke query answered by all 1 tables" in out.stdout


def test_errors_show_the_first_ones_and_a_count() -> None:
    from backupd.operations.pgclient import error_summary as _summary

    stderr = "\n".join(
        [f'psql:<stdin>:{i}: ERROR:  relation "t{i}" already exists' for i in range(191)]
        + ["x" * 5000]
    )
    text = _summary("psql", 3, stderr)
    assert "191 error(s), the first:" in text
    assert 'relation "t0" already exists' in text
    assert "and 186 more error(s)" in text


def test_globals_plan_skips_statements_about_existing_roles() -> None:
    from backupd.operations.globals_restore import plan_globals

    dump = (
        b"CREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER PASSWORD 'x';\n"
        b'CREATE ROLE "New Role";\nALTER ROLE "New Role" WITH NOLOGIN;\n'
        b"COMMENT ON ROLE postgres IS 'a;\nb';\nGRANT \"New Role\" TO postgres;\n"
    )
    plan = plan_globals(dump, {("r", "postgres")})
    assert plan.created == ["New Role"] and plan.existing == ["postgres"]
    assert plan.skipped == 3
    assert b"postgres WITH" not in plan.sql and b'GRANT "New Role" TO postgres;' in plan.sql


def test_globals_with_a_tablespace_say_they_are_not_atomic_and_what_was_applied(
    tmp_path: Path, pg: PgCluster, config_file: ConfigFile, sample_db: str
) -> None:
    tag = uuid.uuid4().hex[:6]
    role, space = f"regress_role_{tag}", f"regress_space_{tag}"
    pg.psql(f"CREATE ROLE {role}")
    subprocess.run(
        [
            str(PG_BIN / "psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            pg.dsn(),
            "-c",
            "SET allow_in_place_tablespaces = on",
            "-c",
            f"CREATE TABLESPACE {space} LOCATION ''",
        ],
        env=pg.env(),
        check=True,
        capture_output=True,
    )
    try:
        cfg = _backup(config_file, sample_db, "globals = true\n")
        pg.psql(f"DROP ROLE {role}")
        pg.psql(f"DROP TABLESPACE {space}")
        # An in-place tablespace is dumped with a relative location, which CREATE
        # TABLESPACE refuses: the restore fails after the roles were created.
        out = _restore(cfg, pg, "--globals", "--to", pg.dsn("postgres"))
        assert out.returncode == 1, out.stdout + out.stderr
        before, _, after = out.stderr.partition("psql exited")
        assert "not one transaction" in before  # said before it started
        assert f"applied before the failure (not one transaction): created roles: {role}" in after
        assert pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'") == "1"
    finally:
        pg.psql(f"DROP ROLE IF EXISTS {role}")
        pg.psql(f"DROP TABLESPACE IF EXISTS {space}")


def test_old_manifests_still_name_their_globals() -> None:
    from backupd.catalog.manifest import Manifest, globals_name

    stem = "app-20260101T000000Z-1a2b3c4d"
    old = {
        "format_version": 1, "id": "1a2b3c4d", "job": "app", "kind": "full", "format": "custom",
        "compression": "zstd", "encryption": None, "source": {}, "tool": {},
        "started_at": "2026-01-01T00:00:00.000000Z", "finished_at": "2026-01-01T00:00:01.000000Z",
        "duration_seconds": 1.0, "trigger": "manual", "triggered_by": None, "attempts": 1,
        "backupd_version": "0", "objects": [
            {"database": "globals", "key": f"{stem}/globals.dump", "size_bytes": 1,
             "raw_bytes": 1, "sha256": "a" * 64, "format": "custom"},
            {"database": "globals", "key": f"{stem}/globals.sql", "size_bytes": 1,
             "raw_bytes": 1, "sha256": "b" * 64, "format": "plain"},
        ],
    }  # fmt: skip
    manifest = Manifest.from_json(json.dumps(old).encode())
    assert manifest.object_for("globals").key == f"{stem}/globals.dump"
    assert manifest.globals_object().key == f"{stem}/globals.sql"
    assert globals_name(["app"], "plain") == "globals"
    assert globals_name(["globals", "globals-2"], "plain") == "globals-3"
    assert globals_name(["globals"], "custom") == "globals"  # globals.dump vs globals.sql
